import gc
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app.config import get_settings
from app.registry import MLP, list_versions, load_model, read_pointer
from training import evaluate as evaluate_cli
from training import publish as publish_cli
from training import train as train_cli
from training.data import DataUnavailableError, MnistTensors, load_mnist
from training.train import evaluate, fit, fit_epochs


def _slice(data: MnistTensors, n: int) -> MnistTensors:
    return MnistTensors(data.x[:n], data.y[:n], data.sha256)


@pytest.fixture(scope="module")
def small(mnist_root: Path) -> tuple[MnistTensors, MnistTensors]:
    return load_mnist(mnist_root, train=True, limit=4096), _slice(load_mnist(mnist_root, train=False), 2000)


def test_data_is_scaled_like_totensor(small: tuple[MnistTensors, MnistTensors]) -> None:
    train, test = small
    assert train.x.shape == (4096, 784)
    assert train.x.dtype == torch.float32
    assert float(train.x.min()) == 0.0
    assert float(train.x.max()) == 1.0
    assert train.y.dtype == torch.int64
    assert len(test) == 2000


def test_short_training_improves_accuracy(small: tuple[MnistTensors, MnistTensors]) -> None:
    train, test = small
    torch.manual_seed(0)
    before = evaluate(MLP(), test)
    model, history = fit(train, test, epochs=3, progress=False, log=lambda _: None)
    after = evaluate(model, test)
    assert before < 0.3
    assert after > 0.8
    assert after > before + 0.5
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[2]["loss"] < history[0]["loss"]


def test_same_seed_same_weights(small: tuple[MnistTensors, MnistTensors]) -> None:
    train, test = small
    a, _ = fit(train, test, epochs=1, seed=3, progress=False, log=lambda _: None)
    b, _ = fit(train, test, epochs=1, seed=3, progress=False, log=lambda _: None)
    c, _ = fit(train, test, epochs=1, seed=4, progress=False, log=lambda _: None)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lin_1.weight, c.lin_1.weight)


def test_training_freezes_the_garbage_collector_only_while_an_epoch_runs(
    small: tuple[MnistTensors, MnistTensors],
) -> None:
    train, test = small
    frozen_by_others = gc.get_freeze_count() > 0  # the in-process service tests freeze at startup
    gc.unfreeze()
    try:
        steps = fit_epochs(_slice(train, 512), _slice(test, 256), epochs=3, progress=False)
        model, _ = next(steps)
        assert gc.get_freeze_count() == 0  # not while the caller has control between epochs
        seen: list[int] = []
        hook = model.register_forward_hook(lambda module, inputs, output: seen.append(gc.get_freeze_count()))
        next(steps)
        assert seen
        assert all(count > 0 for count in seen)  # frozen while the epoch ran
        assert gc.get_freeze_count() == 0
        hook.remove()

        def fail(module: object, inputs: object, output: object) -> None:
            raise RuntimeError("stop")

        model.register_forward_hook(fail)
        with pytest.raises(RuntimeError, match="stop"):
            next(steps)
        assert gc.get_freeze_count() == 0  # and unfrozen when an epoch failed

        gc.freeze()  # a caller that froze the GC itself is left alone
        before = gc.get_freeze_count()
        fit(_slice(train, 512), _slice(test, 256), epochs=1, progress=False, log=lambda _: None)
        assert 0 < gc.get_freeze_count() <= before  # neither unfrozen nor frozen again (frozen objects can die)
    finally:
        gc.unfreeze()
        if frozen_by_others:
            gc.freeze()


def test_fit_epochs_yields_each_epoch_as_it_ends(small: tuple[MnistTensors, MnistTensors]) -> None:
    train, test = small
    steps = fit_epochs(_slice(train, 1024), _slice(test, 256), epochs=3, progress=False)
    model, first = next(steps)
    assert first["epoch"] == 1
    assert set(first) == {"epoch", "loss", "train_accuracy", "test_accuracy"}
    rest = list(steps)
    assert [entry["epoch"] for _, entry in rest] == [2, 3]
    assert all(trained is model for trained, _ in rest)  # one model, trained on
    assert rest[-1][1]["loss"] < first["loss"]
    assert 0.0 < first["test_accuracy"] <= rest[-1][1]["test_accuracy"] <= 1.0


def test_fit_refuses_zero_epochs(small: tuple[MnistTensors, MnistTensors]) -> None:
    with pytest.raises(ValueError, match="epochs must be at least 1, got 0"):
        fit(*small, epochs=0, log=lambda _: None)


@pytest.mark.parametrize(
    ("argument", "problem"),
    [
        (["--epochs", "0"], "--epochs: must be a finite number above zero, got 0"),
        (["--batch-size", "-8"], "--batch-size: must be a finite number above zero, got -8"),
        (["--lr", "inf"], "--lr: must be a finite number above zero, got inf"),
        (["--limit", "ten"], "--limit: not a whole number: 'ten'"),
        (["--epochs", "2.5"], "--epochs: not a whole number: '2.5'"),
        (["--lr", "fast"], "--lr: not a number: 'fast'"),
    ],
)
def test_train_cli_refuses_bad_numbers_up_front(
    argument: list[str], problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        train_cli.main([*argument, "--dry-run"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(problem)


@pytest.fixture
def low_canary_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A 2-epoch model on 2,048 images reaches ~80 % on the canary digits: lower the gate."""
    monkeypatch.setenv("MNIST_CANARY_MIN_ACCURACY", "0.5")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.usefixtures("low_canary_gate")
def test_train_cli_writes_and_publishes_versions(
    mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    args = [
        "--data-dir",
        str(mnist_root),
        "--models-dir",
        str(models),
        "--epochs",
        "2",
        "--limit",
        "2048",
        "--no-progress",
    ]
    assert train_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "epoch  1/2  loss" in out
    assert "train_acc" in out
    assert "test_acc" in out
    first = read_pointer(models)
    assert first is not None
    assert list_versions(models) == [first]
    _, ckpt = load_model(models / f"{first}.pt")
    assert len(ckpt.meta["history"]) == 2
    assert ckpt.meta["dataset"]["train_sha256"] != ckpt.meta["dataset"]["test_sha256"]
    assert ckpt.meta["seed"] == train_cli.DEFAULT_SEED

    # --no-publish keeps the new version aside; publish (and roll back) by name.
    assert train_cli.main([*args, "--seed", "1", "--no-publish"]) == 0
    versions = list_versions(models)
    assert len(versions) == 2
    assert read_pointer(models) == first
    second = next(v for v in versions if v != first)
    assert publish_cli.main([second, "--models-dir", str(models)]) == 0
    assert read_pointer(models) == second
    assert publish_cli.main([first, "--models-dir", str(models)]) == 0
    assert read_pointer(models) == first


def test_a_model_that_fails_the_canary_is_stored_but_not_published(
    mnist_root: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = read_pointer(models_dir)
    args = ["--data-dir", str(mnist_root), "--models-dir", str(models_dir), "--no-progress"]
    assert train_cli.main([*args, "--epochs", "1", "--limit", "256"]) == 1
    assert "not published, the new version failed validation: canary accuracy" in capsys.readouterr().err
    assert read_pointer(models_dir) == before
    assert len(list_versions(models_dir)) == 2  # kept aside for inspection


def test_publish_refuses_a_broken_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "20990101T000000Z-broken.pt").write_bytes(b"not a checkpoint")
    assert publish_cli.main(["20990101T000000Z-broken", "--models-dir", str(tmp_path)]) == 1
    assert "20990101T000000Z-broken.pt" in capsys.readouterr().err
    assert read_pointer(tmp_path) is None


def test_missing_data_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets.mnist as tv_mnist

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    with pytest.raises(DataUnavailableError, match="could not be downloaded"):
        load_mnist(tmp_path / "nothing-here", train=True)
    assert train_cli.main(["--data-dir", str(tmp_path / "nothing-here"), "--models-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--data-dir" in err


def test_evaluate_cli_prints_confusion_and_writes_png(
    mnist_root: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert evaluate_cli.main(["--models-dir", str(models_dir), "--data-dir", str(mnist_root)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out
    assert "true\\pred" in out
    pngs = list(models_dir.glob("*.png"))
    assert len(pngs) == 1
    assert pngs[0].read_bytes().startswith(b"\x89PNG")


def test_bundled_model_meets_the_recipe_target(bundled_checkpoint: Path, mnist_test: MnistTensors) -> None:
    model, ckpt = load_model(bundled_checkpoint)
    accuracy = evaluate(model, mnist_test)
    assert accuracy >= 0.98
    assert ckpt.meta["test_accuracy"] == pytest.approx(accuracy)
    assert bundled_checkpoint.stat().st_size < 1_000_000


def test_dataset_checksums_match_the_ones_the_bundled_model_recorded(
    bundled_checkpoint: Path, mnist_test: MnistTensors, small: tuple[MnistTensors, MnistTensors]
) -> None:
    # The digest covers the whole file's images and labels (a --limit slice does not change it).
    _, ckpt = load_model(bundled_checkpoint)
    assert small[0].sha256 == ckpt.meta["dataset"]["train_sha256"]
    assert mnist_test.sha256 == ckpt.meta["dataset"]["test_sha256"]


@pytest.mark.parametrize(("module", "missing"), [("training.train", "tqdm"), ("training.data", "torchvision")])
def test_a_serving_only_install_gets_a_clear_training_error(module: str, missing: str) -> None:
    # The service's install has no `train` extra; training then says what to install.
    code = (
        f"import sys; sys.modules[{missing!r}] = None\n"
        f"import {module}\n"
        "from training.data import mnist_dataset\n"
        "mnist_dataset('.', train=False)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert f"{missing} is not installed" in last
    assert "pip install -e '.[train]'" in last


def test_training_does_not_leave_its_openmp_policy_to_child_processes() -> None:
    code = "import os, training, torch; print(os.environ.get('OMP_WAIT_POLICY', 'unset'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.stdout.strip() == "unset"


@pytest.mark.parametrize("order", [[], ["--sequential"]], ids=["interleaved", "sequential"])
def test_train_bench_runs_both_trainers_and_prints_the_table(mnist_root: Path, order: list[str]) -> None:
    # One epoch each way on the real data: the script a person runs still works (no timing asserted).
    script = Path(__file__).resolve().parent.parent / "bench" / "train_bench.py"
    result = subprocess.run(
        [sys.executable, str(script), "--data-dir", str(mnist_root), "--epochs", "1", "--device", "cpu", *order],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "in-memory  epoch  1/1" in result.stdout
    assert "dataloader epoch  1/1" in result.stdout
    rows = [
        line for line in result.stdout.splitlines() if line.startswith("| in-memory") or line.startswith("| DataLoader")
    ]
    assert len(rows) == 2
    for row in rows:
        accuracy = float(row.split("|")[3].strip().rstrip("%"))
        assert accuracy > 90.0  # one epoch of the recipe reaches ~94.5 %
