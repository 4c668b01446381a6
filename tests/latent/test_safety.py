"""Loading a checkpoint never runs code from it, and a checkpoint is tied to its base model.

Every refusal is a ``CheckpointError`` (a user error: one line on stderr and exit code 2 from
the command line), never a traceback.
"""

from __future__ import annotations

import builtins
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from vtrans.cli import main
from vtrans.latent import checkpoint
from vtrans.latent.checkpoint import CheckpointError
from vtrans.latent.checkpoint_io import AtomicCheckpointIO
from vtrans.scoring.scorer import Scorer


class OpenFile:
    """Unpickling this calls ``open(marker, "w")``: the file appears iff the payload ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


class ExecCode:
    """Unpickling this calls ``exec``: arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


PAYLOADS = [OpenFile, ExecCode]


def _evil_checkpoint(path: Path, payload, tiny_ckpt: Path) -> Path:
    """A real checkpoint, with a payload hidden in its hyper-parameters."""
    ckpt = checkpoint.read(tiny_ckpt)
    ckpt["hyper_parameters"]["note"] = payload
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("payload_class", PAYLOADS, ids=lambda c: c.__name__)
def test_checkpoint_that_runs_code_when_unpickled_is_refused(tmp_path, tiny_ckpt, payload_class, capsys) -> None:
    # the payload is live: an unsafe load of a copy does create its marker
    live_marker = tmp_path / "live-marker"
    live = _evil_checkpoint(tmp_path / "live.ckpt", payload_class(live_marker), tiny_ckpt)
    torch.load(live, weights_only=False)
    assert live_marker.exists()

    marker = tmp_path / "marker"
    evil = _evil_checkpoint(tmp_path / "evil.ckpt", payload_class(marker), tiny_ckpt)
    with pytest.raises(CheckpointError, match=r"was refused: .*(Unsupported global|objects other).*nothing from it was run"):
        checkpoint.read(evil)
    with pytest.raises(CheckpointError, match="was refused"):
        Scorer.from_checkpoint(evil, device="cpu")
    with pytest.raises(Exception, match="Unsupported global|Weights only"):
        AtomicCheckpointIO().load_checkpoint(evil)  # the resume path (--ckpt_path) reads weights only too
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--ckpt", str(evil), "--quiet", "a prompt"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "refused" in err[0]
    assert not marker.exists(), "the checkpoint's payload ran"


@pytest.mark.parametrize("payload_class", PAYLOADS, ids=lambda c: c.__name__)
def test_legacy_pickle_file_is_refused_unread(tmp_path, payload_class) -> None:
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"vtrans": payload_class(marker), "state_dict": {}}))
    with pytest.raises(CheckpointError, match="not the zip archive"):
        checkpoint.read(evil)
    from vtrans.latent.checkpoint import CheckpointError as Refused

    with pytest.raises(Refused):
        AtomicCheckpointIO().load_checkpoint(evil)
    assert not marker.exists()


# --------------------------------------------------------------------------- tied to the base model


def test_checkpoint_of_another_base_model_is_refused_naming_both(tiny_ckpt, tiny_llama) -> None:
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(tiny_ckpt, backbone=tiny_llama)
    message = str(info.value)
    assert "'tiny-gpt2'" in message and "'tiny-llama'" in message
    assert tiny_llama.fingerprint() in message
    with pytest.raises(CheckpointError, match="tiny-llama"):
        Scorer.from_checkpoint(tiny_ckpt, device="cpu", backbone=tiny_llama)


def test_tampered_fingerprint_is_refused_naming_both(tmp_path, tiny_ckpt, tiny_gpt2) -> None:
    ckpt = checkpoint.read(tiny_ckpt)
    ckpt["vtrans"]["fingerprint"] = "0123456789abcdef"
    torch.save(ckpt, tmp_path / "tampered.ckpt")
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(tmp_path / "tampered.ckpt", backbone=tiny_gpt2)
    assert "0123456789abcdef" in str(info.value) and tiny_gpt2.fingerprint() in str(info.value)


def test_matching_base_model_loads(tiny_ckpt, tiny_gpt2) -> None:
    module = checkpoint.load(tiny_ckpt, backbone=tiny_gpt2)
    assert module.backbone is tiny_gpt2 and module.backbone.model.config.n_layer == 4
    assert not any(k.startswith("backbone.") for k in checkpoint.read(tiny_ckpt)["state_dict"])


# --------------------------------------------------------------------------- files that are not checkpoints


def _files(tmp_path: Path, tiny_ckpt: Path) -> dict[str, Path]:
    data = tiny_ckpt.read_bytes()
    files = {
        "empty": b"",
        "text": b"the early bird catches the worm\n",
        "random": bytes(range(256)) * 64,
        "truncated-1%": data[: len(data) // 100],
        "truncated-50%": data[: len(data) // 2],
        "truncated-99%": data[: len(data) * 99 // 100],
        "truncated-last-byte": data[:-1],
    }
    out = {}
    for name, content in files.items():
        out[name] = tmp_path / f"{name}.ckpt"
        out[name].write_bytes(content)
    with zipfile.ZipFile(tmp_path / "zip.ckpt", "w") as z:
        z.writestr("hello.txt", "not a checkpoint")
    out["zip"] = tmp_path / "zip.ckpt"
    torch.save({"weights": torch.ones(3)}, tmp_path / "plain.ckpt")
    out["torch-not-vtrans"] = tmp_path / "plain.ckpt"
    torch.save(torch.ones(3), tmp_path / "tensor.ckpt")
    out["tensor"] = tmp_path / "tensor.ckpt"
    damaged = bytearray(data)
    middle = len(damaged) // 2
    damaged[middle : middle + 4096] = b"\x00" * 4096
    out["zeroed-middle"] = tmp_path / "zeroed.ckpt"
    out["zeroed-middle"].write_bytes(bytes(damaged))
    out["missing"] = tmp_path / "missing.ckpt"
    out["folder"] = tmp_path
    return out


def test_files_that_are_not_checkpoints_are_refused(tmp_path, tiny_ckpt, tiny_gpt2) -> None:
    for name, path in _files(tmp_path, tiny_ckpt).items():
        with pytest.raises(CheckpointError) as info:
            checkpoint.load(path, backbone=tiny_gpt2)
        message = str(info.value)
        assert "\n" not in message and str(path) in message, (name, message)


def _rewrite(tmp_path: Path, tiny_ckpt: Path, change) -> Path:
    ckpt = checkpoint.read(tiny_ckpt)
    change(ckpt)
    path = tmp_path / "changed.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize(
    "change",
    [
        lambda c: c.update(vtrans="gpt2"),
        lambda c: c["vtrans"].update(backbone=["tiny-gpt2"]),
        lambda c: c["vtrans"]["backbone"].update(name=7),
        lambda c: c["vtrans"].pop("fingerprint"),
        lambda c: c.update(state_dict=[1, 2]),
        lambda c: c["hyper_parameters"].update(no_such_setting=1),
        lambda c: c["hyper_parameters"].update(d_z=-3),
        lambda c: c["state_dict"].pop("latent.proj.weight"),
        lambda c: c["state_dict"].update({"latent.proj.weight": torch.ones(2, 2)}),
        lambda c: c["state_dict"].update({"backbone.model.lm_head.weight": torch.ones(2)}),
    ],
    ids=["record", "spec", "name", "fingerprint", "state", "hparam", "range", "missing", "shape", "backbone"],
)
def test_damaged_records_are_refused(tmp_path, tiny_ckpt, tiny_gpt2, change) -> None:
    with pytest.raises(CheckpointError):
        checkpoint.load(_rewrite(tmp_path, tiny_ckpt, change), backbone=tiny_gpt2)


@pytest.mark.parametrize("name", ["missing", "truncated-50%", "text", "torch-not-vtrans", "folder"])
def test_cli_bad_checkpoint_exit_2_one_line(tmp_path, tiny_ckpt, name, capsys) -> None:
    path = _files(tmp_path, tiny_ckpt)[name]
    with pytest.raises(SystemExit) as info:
        main(["score", "--ckpt", str(path), "--quiet", "a prompt"])
    assert info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert captured.out == ""


def test_cli_truncated_checkpoint_no_traceback(tmp_path, tiny_ckpt) -> None:
    """The whole program, as a user runs it: exit code 2, one line, no traceback."""
    path = _files(tmp_path, tiny_ckpt)["truncated-99%"]
    proc = subprocess.run(
        [sys.executable, "-c", "from vtrans.cli import main; main()", "score", "--ckpt", str(path), "x"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr
