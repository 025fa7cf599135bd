"""The versions folder and its repair tools: pointers, last good, publish, rollback, the publish CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.registry import (
    CheckpointError,
    PointerError,
    atomic_write,
    canary_gate,
    current_checkpoint,
    inspect_folder,
    publish,
    read_last_good,
    read_pointer,
    rollback,
    rollback_target,
    version_path,
)
from tests.helpers import publish_variant, write_bad_version
from training import publish as publish_cli

ROOT = Path(__file__).resolve().parent.parent
BROKEN_POINTERS = {"undecodable": b"\xff\n", "empty": b"", "missing-file": b"v999-gone\n"}


def _point(models_dir: Path, content: bytes) -> None:
    atomic_write(models_dir / "CURRENT", lambda fh: fh.write(content))


@pytest.fixture
def three(models_dir: Path, bundled_checkpoint: Path) -> tuple[Path, list[str]]:
    """Three good versions, oldest first; the middle one published (current and last good)."""
    versions = [bundled_checkpoint.stem]
    versions += [publish_variant(models_dir, bundled_checkpoint, seed=s, publish=False) for s in (1, 2)]
    publish(models_dir, versions[1], canary_gate())
    return models_dir, versions


def test_pointer_reading_names_the_problem(tmp_path: Path) -> None:
    assert read_pointer(tmp_path) is None
    for content, problem in [
        (b"\xff\n", "holds bytes that are not UTF-8 text"),
        (b"../../etc/passwd\n", "does not name a version"),
        (b"a\nb\n", "does not name a version"),
        (b"x" * 5000, "is over 4096 bytes"),
    ]:
        _point(tmp_path, content)
        with pytest.raises(PointerError, match=problem) as info:
            read_pointer(tmp_path)
        assert info.value.path == tmp_path / "CURRENT"
        assert isinstance(info.value, ValueError)  # what callers caught before
    _point(tmp_path, b"  \n")
    assert read_pointer(tmp_path) is None


def test_publish_runs_the_gate_before_moving_either_pointer(
    three: tuple[Path, list[str]], bundled_checkpoint: Path
) -> None:
    models_dir, versions = three
    write_bad_version(models_dir, bundled_checkpoint, "inaccurate", "v500-bad")
    _point(models_dir, f"{versions[1]}\n".encode())
    with pytest.raises(CheckpointError, match="below the minimum"):
        publish(models_dir, "v500-bad", canary_gate())
    assert (read_pointer(models_dir), read_last_good(models_dir)) == (versions[1], versions[1])
    model, ckpt, accuracy = publish(models_dir, versions[2], canary_gate())
    assert ckpt.version == versions[2]
    assert accuracy > 0.9
    assert (read_pointer(models_dir), read_last_good(models_dir)) == (versions[2], versions[2])


def test_rollback_targets(three: tuple[Path, list[str]]) -> None:
    models_dir, versions = three
    assert rollback_target(models_dir) == (versions[0], f"the version before {versions[1]}")
    _point(models_dir, b"v999-gone\n")  # sorts after every stored version
    assert rollback_target(models_dir) == (versions[2], "the version before v999-gone (its file is missing)")
    _point(models_dir, b"\xff\n")
    target = rollback_target(models_dir)
    assert target.version == versions[1]  # the last good one
    assert target.reason.startswith(f"the last good version, as {models_dir / 'CURRENT'}: holds bytes")
    (models_dir / "LAST_GOOD").unlink()
    assert rollback_target(models_dir).version == versions[2]  # the newest
    _point(models_dir, f"{versions[0]}\n".encode())
    with pytest.raises(CheckpointError, match="no version older than"):
        rollback_target(models_dir)
    _point(models_dir, f"{versions[2]}\n".encode())
    target, (_, ckpt, _) = rollback(models_dir, canary_gate())
    assert target.version == ckpt.version == versions[1]
    assert (read_pointer(models_dir), read_last_good(models_dir)) == (versions[1], versions[1])


def test_current_checkpoint_is_what_benches_and_tools_load(three: tuple[Path, list[str]]) -> None:
    models_dir, versions = three
    assert current_checkpoint(models_dir) == version_path(models_dir, versions[1])
    _point(models_dir, b"v999-gone\n")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        current_checkpoint(models_dir)


# -- the publish CLI on broken folders -------------------------------------------------------


@pytest.mark.parametrize("broken", sorted(BROKEN_POINTERS))
def test_listing_works_on_a_broken_folder(
    three: tuple[Path, list[str]], broken: str, capsys: pytest.CaptureFixture[str]
) -> None:
    models_dir, versions = three
    _point(models_dir, BROKEN_POINTERS[broken])
    assert publish_cli.main(["--models-dir", str(models_dir)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"  {versions[0]}", f"  {versions[1]}  (last good)", f"  {versions[2]}"]
    (warning,) = err.splitlines()
    expected = {
        "undecodable": f"warning: {models_dir / 'CURRENT'}: holds bytes that are not UTF-8 text",
        "empty": f"warning: {models_dir / 'CURRENT'}: is empty",
        "missing-file": f"warning: {models_dir / 'v999-gone.pt'}: no such checkpoint file (CURRENT names v999-gone)",
    }[broken]
    assert warning.startswith(expected)


@pytest.mark.parametrize("broken", sorted(BROKEN_POINTERS))
def test_publish_version_works_on_a_broken_folder(
    three: tuple[Path, list[str]], broken: str, capsys: pytest.CaptureFixture[str]
) -> None:
    models_dir, versions = three
    _point(models_dir, BROKEN_POINTERS[broken])
    assert publish_cli.main([versions[2], "--models-dir", str(models_dir)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"published {versions[2]};")
    assert err == ""
    assert (read_pointer(models_dir), read_last_good(models_dir)) == (versions[2], versions[2])


@pytest.mark.parametrize(
    ("broken", "target", "why"),
    [
        ("undecodable", 1, "the last good version, as"),
        ("empty", 1, "the last good version, as"),
        ("missing-file", 2, "the version before v999-gone (its file is missing)"),
    ],
)
def test_previous_works_on_a_broken_folder(
    three: tuple[Path, list[str]], broken: str, target: int, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    models_dir, versions = three
    _point(models_dir, BROKEN_POINTERS[broken])
    assert publish_cli.main(["--previous", "--models-dir", str(models_dir)]) == 0
    out, _ = capsys.readouterr()
    (line,) = out.splitlines()
    assert line.startswith(f"published {versions[target]} ({why}")
    assert read_pointer(models_dir) == versions[target]


def test_cli_errors_are_one_line(
    three: tuple[Path, list[str]], bundled_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models_dir, versions = three
    # The oldest version, and the current one.
    write_bad_version(models_dir, bundled_checkpoint, "truncated", "00000000T000000Z-truncated")
    cases = [
        (["v404-nothere"], "v404-nothere.pt: no such checkpoint file"),
        (["../x"], "invalid model version '../x'"),
        (["00000000T000000Z-truncated"], "truncated or corrupt"),
        (["--previous"], "no version older than 00000000T000000Z-truncated"),
    ]
    for argv, message in cases:
        assert publish_cli.main([*argv, "--models-dir", str(models_dir)]) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert len(err.splitlines()) == 1, err
        assert err.startswith("error: ")
        assert message in err
    empty = models_dir.parent / "empty"
    empty.mkdir()
    assert publish_cli.main(["--previous", "--models-dir", str(empty)]) == 1
    assert "no stored versions" in capsys.readouterr().err
    assert read_pointer(models_dir) == "00000000T000000Z-truncated"  # no failure moved anything


def test_cli_reads_the_services_threshold(
    three: tuple[Path, list[str]],
    bundled_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    models_dir, versions = three
    write_bad_version(models_dir, bundled_checkpoint, "inaccurate", "v600-untrained")
    monkeypatch.setenv("MNIST_CANARY_MIN_ACCURACY", "0")
    assert publish_cli.main(["v600-untrained", "--models-dir", str(models_dir)]) == 0
    monkeypatch.setenv("MNIST_CANARY_MIN_ACCURACY", "1.5")
    assert publish_cli.main([versions[0], "--models-dir", str(models_dir)]) == 1
    assert "MNIST_CANARY_MIN_ACCURACY='1.5' must be a number from 0 to 1" in capsys.readouterr().err
    assert publish_cli.main([versions[0], "--models-dir", str(models_dir), "--min-accuracy", "0.5"]) == 0


def test_the_cli_runs_as_a_program(three: tuple[Path, list[str]]) -> None:
    models_dir, versions = three
    _point(models_dir, b"\xff\n")
    done = subprocess.run(
        [sys.executable, "-m", "training.publish", "--previous", "--models-dir", str(models_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"published {versions[1]} (the last good version")
    assert "Traceback" not in done.stderr


# -- the trainer and the tools stay clear of the service ---------------------------------------

_IMPORTS_SCRIPT = """
import json, sys
import training.data, training.evaluate, training.publish, training.train
print(json.dumps(sorted(name for name in sys.modules if name == "app" or name.startswith("app."))))
"""


def test_training_imports_only_the_registry() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTS_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    modules = json.loads(done.stdout)
    assert "app.registry" in modules
    outside = [m for m in modules if m != "app" and not m.startswith("app.registry")]
    assert outside == [], f"training pulls in the service: {outside}"


@pytest.mark.parametrize("module", ["training.train", "training.evaluate", "training.publish"])
def test_every_cli_option_shows_its_default(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "1000"},  # one line per argument
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    arguments: list[str] = []
    for section in done.stdout.split("\n\n"):
        if section.startswith(("options:", "positional arguments:")):
            for line in section.splitlines()[1:]:
                if line.startswith("  ") and not line.startswith("   "):
                    arguments.append(line.strip())  # a new argument
                else:
                    arguments[-1] += " " + line.strip()  # its help, on the next line
    arguments = [a for a in arguments if not a.startswith("-h, --help")]
    assert len(arguments) >= 3
    for line in arguments:
        assert "(default: " in line, f"{module}: {line}"


def test_a_copied_folder_keeps_its_last_good(three: tuple[Path, list[str]], tmp_path: Path) -> None:
    """LAST_GOOD travels with the folder (a backup, a volume seeded from the image)."""
    models_dir, versions = three
    copy = tmp_path / "copy"
    shutil.copytree(models_dir, copy)
    assert inspect_folder(copy).last_good == versions[1]
