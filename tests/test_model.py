import numpy as np
import pytest
import torch

from app.decode import unit_scale
from app.inference import CPU_CHUNK, predict_proba
from app.registry import MLP


def test_layers_and_shapes() -> None:
    model = MLP()
    assert [name for name, _ in model.named_children()] == ["lin_1", "lin_2"]
    assert model.lin_1.weight.shape == (256, 784)
    assert model.lin_2.weight.shape == (10, 256)
    assert model(torch.zeros(5, 784)).shape == (5, 10)


def test_sizes_are_constructor_arguments() -> None:
    model = MLP(in_features=16, hidden=8, num_classes=3)
    assert model(torch.zeros(2, 16)).shape == (2, 3)
    assert model.model_args() == {"in_features": 16, "hidden": 8, "num_classes": 3}


def test_init_is_kaiming_normal_with_zero_biases() -> None:
    torch.manual_seed(0)
    model = MLP(hidden=4096)  # many weights, so the sample std is close to the target
    assert torch.count_nonzero(model.lin_1.bias) == 0
    assert torch.count_nonzero(model.lin_2.bias) == 0
    # kaiming_normal_ (fan_in, gain sqrt(2)): std = sqrt(2 / fan_in), mean 0
    for layer, fan_in in ((model.lin_1, 784), (model.lin_2, 4096)):
        w = layer.weight
        assert w.mean().item() == pytest.approx(0.0, abs=0.01)
        assert w.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.05)


def test_init_param_resets() -> None:
    model = MLP()
    with torch.no_grad():
        model.lin_1.bias.fill_(1.0)
    model.init_param()
    assert torch.count_nonzero(model.lin_1.bias) == 0


def test_relu_between_layers() -> None:
    model = MLP(in_features=2, hidden=2, num_classes=1)
    with torch.no_grad():
        model.lin_1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        model.lin_2.weight.fill_(1.0)
    # negative hidden activations are clipped: -5 contributes nothing
    assert model(torch.tensor([[-5.0, 2.0]])).item() == pytest.approx(2.0)


def test_uint8_rows_predict_exactly_like_their_scaled_floats() -> None:
    # Big uint8 batches are scaled chunk by chunk inside predict_proba: the same numbers.
    model = MLP().eval()
    rng = np.random.default_rng(0)
    for n in (1, CPU_CHUNK, CPU_CHUNK + 1, 2 * CPU_CHUNK + 17):
        pixels = rng.integers(0, 256, (n, 784), dtype=np.uint8)
        assert np.array_equal(predict_proba(model, pixels), predict_proba(model, unit_scale(pixels)))
