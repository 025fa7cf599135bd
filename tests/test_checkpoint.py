import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from app.registry import (
    FORMAT,
    MAX_FILE_BYTES,
    MAX_HIDDEN,
    MLP,
    CheckpointError,
    list_versions,
    load_checkpoint,
    load_model,
    read_pointer,
    save_checkpoint,
    weights_sha256,
    write_pointer,
)

ROOT = Path(__file__).resolve().parent.parent


def _saved(tmp_path: Path, **meta: object) -> tuple[MLP, Path]:
    torch.manual_seed(1)
    model = MLP()
    return model, save_checkpoint(tmp_path, model, {"test_accuracy": 0.5, **meta})


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model, path = _saved(tmp_path, seed=7)
    loaded, ckpt = load_model(path)
    x = torch.rand(8, 784)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))
    assert not loaded.training
    assert ckpt.version == path.stem
    assert ckpt.model_args == {"in_features": 784, "hidden": 256, "num_classes": 10}
    meta = ckpt.meta
    assert meta["seed"] == 7
    assert meta["weights_sha256"] == weights_sha256(model.state_dict())
    assert meta["torch_version"] == str(torch.__version__)
    assert meta["input"]["range"] == [0.0, 1.0]
    assert "created_at" in meta


def test_file_loads_with_weights_only(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    raw = torch.load(path, weights_only=True)  # plain data only: no pickled classes
    assert raw["format"] == FORMAT
    assert set(raw["state_dict"]) == {"lin_1.weight", "lin_1.bias", "lin_2.weight", "lin_2.bias"}


def test_versions_sit_side_by_side_and_never_overwrite(tmp_path: Path) -> None:
    _, first = _saved(tmp_path)
    torch.manual_seed(2)
    second = save_checkpoint(tmp_path, MLP(), {})
    assert first != second
    assert list_versions(tmp_path) == sorted([first.stem, second.stem])
    with pytest.raises(FileExistsError):
        save_checkpoint(tmp_path, MLP(), {}, version=first.stem)


def test_pointer_is_atomic_and_validated(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    assert read_pointer(tmp_path) is None
    write_pointer(tmp_path, path.stem)
    assert read_pointer(tmp_path) == path.stem
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    with pytest.raises(FileNotFoundError):
        write_pointer(tmp_path, "20990101T000000Z-deadbeef")
    with pytest.raises(ValueError, match="invalid model version"):
        write_pointer(tmp_path, "../../etc/passwd")


def test_interrupted_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, MLP(), {})
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_foreign_file_is_a_clear_error(tmp_path: Path) -> None:
    png = tmp_path / "picture.pt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    with pytest.raises(CheckpointError, match="picture.pt"):
        load_model(png)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="not an mnist-mlp/1 checkpoint"):
        load_model(other)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt"):
        load_model(empty)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_model(tmp_path / "missing.pt")


def test_wrong_shapes_are_a_clear_error(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    raw = torch.load(path, weights_only=True)
    raw["state_dict"]["lin_1.weight"] = torch.zeros(128, 784)
    raw["meta"].pop("weights_sha256")
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match=r"wrong shape for lin_1.weight: expected \[256, 784\].*got \[128, 784\]"):
        load_model(path)


def test_missing_keys_and_bad_args_are_clear_errors(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    raw = torch.load(path, weights_only=True)
    del raw["state_dict"]["lin_2.bias"]
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match=r"missing \['lin_2.bias'\]"):
        load_model(path)
    raw["model_args"]["hidden"] = 10**9
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="hidden=1000000000 must be an integer"):
        load_checkpoint(path)


def test_nan_weights_and_tampered_weights_are_refused(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    raw = torch.load(path, weights_only=True)
    raw["state_dict"]["lin_2.weight"][0, 0] = 0.123
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="do not match the sha256"):
        load_model(path)
    raw["state_dict"]["lin_2.weight"][0, 0] = float("nan")
    raw["meta"].pop("weights_sha256")
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_model(path)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


def test_crafted_pickle_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "20990101T000000Z-evil.pt"
    # Inside a real torch zip, next to a genuine-looking state_dict...
    torch.save({"format": FORMAT, "state_dict": {}, "model_args": {}, "meta": {"x": _RunsCode(marker)}}, evil)
    with pytest.raises(CheckpointError, match="refused by the safe loader"):
        load_model(evil)
    # ...and as a bare pickle stream.
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError):
        load_model(legacy)
    assert not marker.exists()
    # Sanity: the payload does run when unpickled without protection.
    pickle.loads(legacy.read_bytes())
    assert marker.exists()


def test_checkpoint_is_a_zip_with_no_code(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    assert zipfile.is_zipfile(path)
    assert path.stat().st_size < 1_000_000


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants:UserWarning")
def test_exotic_tensors_and_non_json_meta_are_refused(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    raw = torch.load(path, weights_only=True)
    raw["meta"].pop("weights_sha256")
    sparse = dict(raw, state_dict={**raw["state_dict"], "lin_2.bias": raw["state_dict"]["lin_2.bias"].to_sparse()})
    torch.save(sparse, path)
    with pytest.raises(CheckpointError, match="lin_2.bias is not a dense CPU tensor"):
        load_model(path)
    tensor_meta = dict(raw, meta={**raw["meta"], "extra": torch.zeros(2)})
    torch.save(tensor_meta, path)
    with pytest.raises(CheckpointError, match="'meta' must hold plain JSON data"):
        load_model(path)


def test_model_args_are_checked_before_anything_is_built(tmp_path: Path) -> None:
    """784 in, 10 out and a bounded hidden size, from model_args alone: the tensors are never looked at."""
    path = tmp_path / "args.pt"
    tiny = {"lin_1.weight": torch.zeros(1, 1), "lin_1.bias": torch.zeros(1), "lin_2.weight": torch.zeros(1, 1),
            "lin_2.bias": torch.zeros(1)}  # fmt: skip
    cases = [
        ({"in_features": 65536, "hidden": 65536, "num_classes": 4096}, "do not take 784 pixels to 10 classes"),
        ({"in_features": 784, "hidden": 256, "num_classes": 11}, "do not take 784 pixels to 10 classes"),
        ({"in_features": 784, "hidden": MAX_HIDDEN + 1, "num_classes": 10}, f"hidden={MAX_HIDDEN + 1} must be"),
        ({"hidden": True}, "hidden=True must be an integer"),
        ({"hidden": 256, "layers": 3}, "unknown model argument 'layers'"),
    ]
    for args, reason in cases:
        torch.save({"format": FORMAT, "state_dict": tiny, "model_args": args, "meta": {}}, path)
        assert path.stat().st_size < 5000
        with pytest.raises(CheckpointError, match=reason):
            load_checkpoint(path)


def _expanded_state(hidden: int, in_features: int = 784) -> dict[str, torch.Tensor]:
    """Full-shape parameters that are stride-0 views of one element: a few bytes on disk each."""
    return {
        "lin_1.weight": torch.zeros(1).expand(hidden, in_features),
        "lin_1.bias": torch.zeros(1).expand(hidden),
        "lin_2.weight": torch.zeros(1).expand(10, hidden),
        "lin_2.bias": torch.zeros(10),
    }


def test_expanded_and_oversized_storage_tensors_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "expanded.pt"
    torch.save({"format": FORMAT, "state_dict": _expanded_state(256), "model_args": {"hidden": 256}, "meta": {}}, path)
    assert path.stat().st_size < 5000
    with pytest.raises(CheckpointError, match=r"lin_1.weight is not a contiguous tensor.*stride \[0, 0\]"):
        load_model(path)
    # A view into a bigger storage: the extra bytes are refused as well (saved parameters never share).
    model = MLP()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["lin_2.bias"] = torch.zeros(20)[:10]
    torch.save({"format": FORMAT, "state_dict": state, "model_args": model.model_args(), "meta": {}}, path)
    with pytest.raises(CheckpointError, match="lin_2.bias is not a contiguous tensor in a storage of its own size"):
        load_model(path)


def test_oversized_and_compressed_files_are_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "big.pt"
    with big.open("wb") as fh:
        fh.write(b"PK\x03\x04")
        fh.truncate(MAX_FILE_BYTES + 1)  # sparse: nothing is written, and nothing may be read
    with pytest.raises(CheckpointError, match="over the .*-byte limit"):
        load_model(big)
    _, path = _saved(tmp_path)
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with pytest.raises(CheckpointError, match="compressed records"):
        load_model(deflated)
    # Thousands of empty records: a directory zipfile would parse into thousands of objects.
    crowded = tmp_path / "crowded.pt"
    with zipfile.ZipFile(crowded, "w") as archive:
        for index in range(3000):
            archive.writestr(f"archive/x{index}", b"")
    with pytest.raises(CheckpointError, match=r"zip directory of \d+ bytes"):
        load_model(crowded)
    # Megabytes of metadata: unpickled, it would take several times that.
    bulky = tmp_path / "bulky.pt"
    torch.save({"format": FORMAT, "state_dict": {}, "model_args": {}, "meta": {"x": list(range(300_000))}}, bulky)
    with pytest.raises(CheckpointError, match=r"a data.pkl of \d+ bytes"):
        load_model(bulky)


_PEAK_RSS_SCRIPT = """
import json, sys
from pathlib import Path
from app.registry import CheckpointError, load_model, validate_candidate
import torch

def peak_kb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

load_model(sys.argv[1])  # warm up: lazy imports and allocator pools are not the crafted file's doing
results = []
for path in sys.argv[2:]:
    before = peak_kb()
    try:
        validate_candidate(Path(path), torch.device("cpu"), 0.9)
        results.append({"path": path, "error": None})
    except CheckpointError as exc:
        results.append({"path": path, "error": exc.problem, "grew_kb": peak_kb() - before})
print(json.dumps(results))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc")
def test_crafted_stride0_checkpoints_are_refused_before_allocating(tmp_path: Path) -> None:
    """~2 KB files declaring 17 GB (huge model_args) or 0.8 MB (MLP-sized) of expanded weights.

    Before the checks ran on metadata first, ``isfinite``, the sha256 and the model constructor
    each allocated the declared size (tens of GB for the first file).
    """
    _, good = _saved(tmp_path)
    huge = tmp_path / "huge.pt"
    args = {"in_features": 65536, "hidden": 65536, "num_classes": 10}
    state = _expanded_state(65536, in_features=65536)  # 16 GB of float32 weights, as declared
    torch.save({"format": FORMAT, "state_dict": state, "model_args": args, "meta": {"weights_sha256": "0" * 64}}, huge)
    in_limits = tmp_path / "in-limits.pt"
    args = {"in_features": 784, "hidden": MAX_HIDDEN, "num_classes": 10}
    torch.save({"format": FORMAT, "state_dict": _expanded_state(MAX_HIDDEN), "model_args": args, "meta": {}}, in_limits)
    for path in (huge, in_limits):
        assert path.stat().st_size < 3000
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_SCRIPT, str(good), str(huge), str(in_limits)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    huge_result, in_limits_result = json.loads(result.stdout)
    assert "do not take 784 pixels to 10 classes" in huge_result["error"]
    assert "lin_1.weight is not a contiguous tensor" in in_limits_result["error"]
    for outcome in (huge_result, in_limits_result):
        assert outcome["grew_kb"] < 50 * 1024, outcome


def test_unreadable_files_are_transient_and_refused_files_are_not(tmp_path: Path) -> None:
    """A file that cannot be read now (here a symlink loop: ELOOP even for root) is worth a retry."""
    loop = tmp_path / "loop.pt"
    loop.symlink_to(loop)
    with pytest.raises(CheckpointError, match="could not be read, will retry") as info:
        load_model(loop)
    assert info.value.transient
    for refused in (tmp_path / "missing.pt", tmp_path):
        with pytest.raises(CheckpointError) as info:
            load_model(refused)
        assert not info.value.transient
    _, path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_model(path)
    assert not info.value.transient


def test_version_names_are_checked_whole() -> None:
    from app.registry import check_version

    assert check_version("20261126T143950Z-fef0f007") == "20261126T143950Z-fef0f007"
    for bad in ("abc\n", "../x", "", ".hidden", "a/b", "x" * 200):
        with pytest.raises(ValueError, match="invalid model version"):
            check_version(bad)
