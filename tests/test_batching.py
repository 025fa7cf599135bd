"""The micro-batcher: shared forwards give each request exactly what it would get alone."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import torch

from app.batching import MicroBatcher
from app.config import Settings
from app.inference import predict_proba
from app.main import create_app
from app.registry import MLP

FIXTURES = Path(__file__).parent / "fixtures"
SEVEN_PIXELS = orjson.loads((FIXTURES / "seven.json").read_bytes())["pixels"]


@dataclass(frozen=True)
class Served:
    """What the batcher reads of a ServedModel (the real one needs a checkpoint on disk)."""

    model: torch.nn.Module
    device: torch.device


def _model(seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


class Recorder:
    """predict_proba, recording which model saw how many rows; optionally failing on a marked row."""

    def __init__(self, poison: float | None = None) -> None:
        self.calls: list[tuple[torch.nn.Module, int]] = []
        self.poison = poison

    def __call__(self, model: torch.nn.Module, x: np.ndarray, device: torch.device) -> np.ndarray:
        self.calls.append((model, len(x)))
        if self.poison is not None and (x[:, 0] == self.poison).any():
            raise RuntimeError("poisoned row")
        return predict_proba(model, x, device)  # type: ignore[arg-type]


def _inputs(sizes: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((n, 784), dtype=np.float32) for n in sizes]


async def _gather(batcher: MicroBatcher, jobs: list[tuple[Served, np.ndarray]]) -> list[np.ndarray | BaseException]:
    return await asyncio.gather(*(batcher.predict(s, x) for s, x in jobs), return_exceptions=True)


def test_concurrent_requests_share_one_forward_and_get_their_own_rows() -> None:
    served = Served(_model(0), torch.device("cpu"))
    forward = Recorder()
    batcher = MicroBatcher(forward, max_rows=64)
    xs = _inputs([1, 3, 1, 2, 5])
    results = asyncio.run(_gather(batcher, [(served, x) for x in xs]))
    assert forward.calls == [(served.model, 12)]
    for x, result in zip(xs, results, strict=True):
        assert isinstance(result, np.ndarray)
        alone = predict_proba(served.model, x)  # type: ignore[arg-type]
        assert result.shape == (len(x), 10)
        np.testing.assert_allclose(result, alone, rtol=1e-5, atol=1e-6)
        assert (result.argmax(axis=1) == alone.argmax(axis=1)).all()
        assert result.base is None  # its own copy, not a view of the whole batch


def test_two_model_versions_never_share_a_forward() -> None:
    old, new = Served(_model(1), torch.device("cpu")), Served(_model(2), torch.device("cpu"))
    forward = Recorder()
    batcher = MicroBatcher(forward, max_rows=64)
    xs = _inputs([1, 1, 1, 1])
    jobs = [(old, xs[0]), (new, xs[1]), (old, xs[2]), (new, xs[3])]
    results = asyncio.run(_gather(batcher, jobs))
    assert sorted((id(m), n) for m, n in forward.calls) == sorted([(id(old.model), 2), (id(new.model), 2)])
    for (served, x), result in zip(jobs, results, strict=True):
        np.testing.assert_allclose(result, predict_proba(served.model, x), rtol=1e-5, atol=1e-6)  # type: ignore[arg-type]


def test_a_failing_request_fails_alone() -> None:
    served = Served(_model(3), torch.device("cpu"))
    forward = Recorder(poison=0.123)
    batcher = MicroBatcher(forward, max_rows=64)
    xs = _inputs([1, 2, 1])
    xs[1][1, 0] = 0.123  # the second request carries a row the forward rejects
    results = asyncio.run(_gather(batcher, [(served, x) for x in xs]))
    assert isinstance(results[1], RuntimeError)
    for index in (0, 2):
        result = results[index]
        assert isinstance(result, np.ndarray)
        np.testing.assert_allclose(result, predict_proba(served.model, xs[index]), rtol=1e-5, atol=1e-6)  # type: ignore[arg-type]
    # one shared attempt of 4 rows, then each request alone
    assert [n for _, n in forward.calls] == [4, 1, 2, 1]


def test_max_rows_bounds_every_forward() -> None:
    served = Served(_model(4), torch.device("cpu"))
    forward = Recorder()
    batcher = MicroBatcher(forward, max_rows=4)
    xs = _inputs([1, 2, 1, 3, 1, 5])
    results = asyncio.run(_gather(batcher, [(served, x) for x in xs]))
    sizes = [n for _, n in forward.calls]
    assert sum(sizes) == 13
    assert sizes == [4, 4, 5]  # flushed as soon as full; a request over max_rows runs alone
    for x, result in zip(xs, results, strict=True):
        np.testing.assert_allclose(result, predict_proba(served.model, x), rtol=1e-5, atol=1e-6)  # type: ignore[arg-type]


def test_max_wait_holds_the_batch_open_until_it_is_full() -> None:
    """With a long max_wait, a request that comes a loop turn later still joins; a full batch goes at once."""
    served = Served(_model(5), torch.device("cpu"))
    forward = Recorder()
    batcher = MicroBatcher(forward, max_rows=2, max_wait=60.0)
    first, second = _inputs([1, 1])

    async def staggered() -> list[np.ndarray]:
        early = asyncio.ensure_future(batcher.predict(served, first))
        await asyncio.sleep(0)  # the first request is queued, and its batch is not flushed yet
        assert batcher.pending == 1
        late = await batcher.predict(served, second)  # fills the batch: flushed without waiting 60 s
        return [await early, late]

    results = asyncio.run(staggered())
    assert [n for _, n in forward.calls] == [2]
    np.testing.assert_allclose(results[0], predict_proba(served.model, first), rtol=1e-5, atol=1e-6)  # type: ignore[arg-type]


def test_without_max_wait_each_loop_turn_is_its_own_batch() -> None:
    served = Served(_model(6), torch.device("cpu"))
    forward = Recorder()
    batcher = MicroBatcher(forward, max_rows=64)
    first, second = _inputs([1, 1])

    async def sequential() -> None:
        await batcher.predict(served, first)
        await batcher.predict(served, second)

    asyncio.run(sequential())
    assert [n for _, n in forward.calls] == [1, 1]


def test_a_cancelled_request_is_skipped() -> None:
    served = Served(_model(7), torch.device("cpu"))
    forward = Recorder()
    batcher = MicroBatcher(forward, max_rows=64)
    xs = _inputs([1, 2, 1])

    async def one_gives_up() -> list[np.ndarray]:
        tasks = [asyncio.ensure_future(batcher.predict(served, x)) for x in xs]
        await asyncio.sleep(0)  # all three queued
        tasks[1].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[1]
        return [await tasks[0], await tasks[2]]

    kept = asyncio.run(one_gives_up())
    assert [n for _, n in forward.calls] == [2]  # the cancelled request's rows were not computed
    np.testing.assert_allclose(kept[1], predict_proba(served.model, xs[2]), rtol=1e-5, atol=1e-6)  # type: ignore[arg-type]


def test_observe_sees_each_forward() -> None:
    served = Served(_model(8), torch.device("cpu"))
    seen: list[int] = []
    batcher = MicroBatcher(Recorder(), max_rows=64, observe=seen.append)
    asyncio.run(_gather(batcher, [(served, x) for x in _inputs([1, 1, 3])]))
    assert seen == [5]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_rows"):
        MicroBatcher(Recorder(), max_rows=0)
    with pytest.raises(ValueError, match="max_wait"):
        MicroBatcher(Recorder(), max_wait=-1)


# -- the switch, through the app ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def _client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.lifespan():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def _concurrent_predictions(settings: Settings, bodies: list[bytes]) -> tuple[list[httpx.Response], list[int]]:
    sizes: list[int] = []
    async with _client(settings) as client:
        served = client._transport.app.state.store.current  # type: ignore[attr-defined]
        handle = served.model.register_forward_hook(lambda module, inputs, output: sizes.append(len(output)))
        try:
            headers = {"content-type": "application/json"}
            responses = await asyncio.gather(*(client.post("/predict", content=b, headers=headers) for b in bodies))
        finally:
            handle.remove()
    return list(responses), sizes


@pytest.mark.parametrize("microbatch", [True, False])
def test_switch_on_and_off_gives_the_same_answers(models_dir: Path, microbatch: bool) -> None:
    rng = np.random.default_rng(9)
    digits = [np.asarray(SEVEN_PIXELS)] + [rng.random(784) for _ in range(7)]
    bodies = [orjson.dumps({"pixels": d.tolist()}) for d in digits]
    settings = Settings(model_dir=models_dir, reload_interval=0, microbatch=microbatch)
    responses, sizes = asyncio.run(_concurrent_predictions(settings, bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    store_model = _bundled_model(models_dir)
    for digit, response in zip(digits, responses, strict=True):
        expected = predict_proba(store_model, digit.astype(np.float32).reshape(1, 784))[0]
        np.testing.assert_allclose(response.json()["probabilities"], expected, rtol=1e-4, atol=1e-6)
        assert response.json()["label"] == int(expected.argmax())
    assert responses[0].json()["label"] == 7
    assert sum(sizes) == len(bodies)
    if microbatch:
        assert len(sizes) < len(bodies)  # concurrent requests shared forwards
    else:
        assert sizes == [1] * len(bodies)  # one forward per request


def _bundled_model(models_dir: Path) -> MLP:
    from app.registry import load_model, read_pointer, version_path

    version = read_pointer(models_dir)
    assert version
    model, _ = load_model(version_path(models_dir, version))
    return model


# -- the other direction: big CPU batches are split into chunks --------------------------------


def test_big_batches_are_computed_in_chunks_with_identical_answers() -> None:
    import app.inference as inference

    model = _model(10)
    chunk = inference.CPU_CHUNK
    x = np.random.default_rng(10).random((2 * chunk + 5, 784), dtype=np.float32)
    sizes: list[int] = []
    handle = model.register_forward_hook(lambda module, inputs, output: sizes.append(len(output)))
    try:
        chunked = inference.predict_proba(model, x)
        whole = inference.predict_proba(model, x, chunk_rows=len(x))
    finally:
        handle.remove()
    assert sizes == [chunk, chunk, 5, len(x)]
    assert chunked.shape == (len(x), 10)
    assert chunked.dtype == np.float32
    np.testing.assert_array_equal(chunked, whole)
