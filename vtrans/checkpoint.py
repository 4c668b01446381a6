"""Loading a trained latent back, safely.

A checkpoint is read with ``torch.load(weights_only=True)``: tensors and plain containers only,
so a file crafted to run code when unpickled is refused and nothing in it runs. The checkpoint
names its backbone (spec and fingerprint); the backbone is loaded from that spec, or checked
against the one given, and a mismatch is refused with both named.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from vtrans.backbones import Backbone
from vtrans.errors import UserError


class CheckpointError(UserError):
    """A file that is missing, truncated, unsafe, or not a vtrans checkpoint."""


def read(path: str | Path) -> dict:
    """The checkpoint's contents as plain data; never executes code from the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} was refused: it holds objects other than tensors and plain data ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or another format): {err}") from None
    if not isinstance(ckpt, dict) or "vtrans" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a vtrans checkpoint (no 'vtrans' record): train one with train.py fit")
    return ckpt


def load(path: str | Path, device: str | torch.device = "cpu", backbone: Backbone | None = None):
    """A ``LatentLM`` with the checkpoint's latent weights, on ``device``, in eval mode."""
    from vtrans.module import LatentLM

    ckpt = read(path)
    record = ckpt["vtrans"]
    if backbone is None:
        backbone = Backbone(**record["backbone"])
    expected, actual = record.get("fingerprint"), backbone.fingerprint()
    if expected != actual:
        raise CheckpointError(
            f"{path} was trained on backbone {record['backbone'].get('name')!r} (fingerprint {expected}), "
            f"not on {backbone.name!r} (fingerprint {actual})"
        )
    hparams = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if not k.startswith("_")}
    module = LatentLM(backbone, **hparams)
    module._fingerprint = actual
    try:
        module.load_state_dict(ckpt["state_dict"])
    except (KeyError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path} does not fit this latent: {err}") from None
    return module.to(device).eval()


def template_of(path: str | Path) -> str | None:
    """The prompt template the latent was trained with, if the checkpoint records one."""
    return read(path).get("datamodule_hyper_parameters", {}).get("template")
