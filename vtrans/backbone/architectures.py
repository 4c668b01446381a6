"""The one place that knows architectures: where each family's parts are, in one table.

Everything else in vtrans asks this module for "the blocks", "the final norm", "the
unembedding", "the residual branches" or "the dropout sites" of a model, and never looks at
attribute names or branches on a family itself. :data:`ARCHITECTURES` holds one
:class:`Architecture` per family; the accessors below read it. A model whose config's
``model_type`` no entry lists is refused with a one-line ``BackboneError`` naming the supported
ones. Where transformers names a part for every architecture (``base_model``,
``get_input_embeddings``, ``get_output_embeddings``), its accessor is used.

Adding a family is one entry in :data:`ARCHITECTURES` and a tiny random model of it in
``vtrans.backbone.random_weights.TINY`` (``tests/backbone/test_architectures.py`` runs every entry's).

Every change this module makes to a model (running some blocks only, another attention
implementation) is a context manager that restores the model in ``finally``.

The masks of how each block attends read the same table (``vtrans.backbone.attention``). What it
does not know: where models come from (``vtrans.backbone.loading``) and how a frozen prefix is
cached (``vtrans.backbone.frozen``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from vtrans.errors import BackboneError


@dataclass(frozen=True)
class Architecture:
    """Where one family's parts are.

    Paths are attribute names, dotted where they go deeper: ``blocks``, ``final_norm``,
    ``position_embedding`` and ``embedding_dropout`` from the trunk (``model.base_model``); the
    block fields from one block. The defaults are Llama's.

    Attributes:
        name: the family, as ``Backbone.family`` reports it.
        model_types: the configs' ``model_type`` values it covers.
        blocks: the ``nn.ModuleList`` of transformer blocks.
        final_norm: the norm between the last block and the unembedding.
        position_embedding: a learned absolute position embedding added to the token embedding
            before block 0 (GPT-2's ``wpe``); None where positions enter inside attention (rotary).
        embedding_scale: the attribute of the token embedding module that holds the factor it
            multiplies its output by (Gemma: √d_model); None for none. The factor is applied inside
            the embedding module, so ``hidden_states[0]`` and any ``inputs_embeds`` fed to the trunk
            are already scaled: the trunk never scales them again.
        attention, mlp: a block's attention and MLP modules.
        residual_branches: the block modules whose outputs are added to the residual stream, in
            order; None: the attention and MLP modules themselves (Gemma adds them after a norm of
            their own, ``post_attention_layernorm`` and ``post_feedforward_layernorm``).
        embedding_dropout: the dropout on the embeddings (GPT-2, GPT-NeoX); None for none.
        branch_dropout: the dropout modules on a block's residual branches (GPT-2, GPT-NeoX,
            Phi-3); empty for a family without them, which MC dropout then inserts on
            ``residual_branches``.
        attention_dropout: the dropout module on a block's attention probabilities (GPT-2); the
            attention module's own ``training`` flag switches it on.
        logit_softcap: the config field of a tanh soft-cap on the final logits,
            cap · tanh(logits / cap) (Gemma 2's ``final_logit_softcapping``); None for none.
        sliding_window: every block attends only to the last ``config.sliding_window``
            positions when the config sets one (Mistral, Phi-3).
        layer_types: each block attends as ``config.layer_types`` says (``full_attention`` or
            ``sliding_attention``, the window ``config.sliding_window``), and the trunk takes a
            ready mask per layer type, as a dict (Qwen2, Qwen3, Gemma 2, Gemma 3).
        gpt2_tokenizer: the family's tokenizer is GPT-2's BPE (a saved model without tokenizer
            files is given it).
        non_text_tokens: tokens of the family's tokenizer that stand for something other than text
            and that its models can emit (Gemma 3's image markers, which its tokenizer does not mark
            as special): completions never contain them (:func:`non_text_ids`).
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str = "layers"
    final_norm: str = "norm"
    position_embedding: str | None = None
    embedding_scale: str | None = None
    attention: str = "self_attn"
    mlp: str = "mlp"
    residual_branches: tuple[str, ...] | None = None
    embedding_dropout: str | None = None
    branch_dropout: tuple[str, ...] = ()
    attention_dropout: str | None = None
    logit_softcap: str | None = None
    sliding_window: bool = False
    layer_types: bool = False
    gpt2_tokenizer: bool = False
    non_text_tokens: tuple[str, ...] = ()


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        "gpt2",
        ("gpt2",),
        blocks="h",
        final_norm="ln_f",
        position_embedding="wpe",
        attention="attn",
        embedding_dropout="drop",
        branch_dropout=("attn.resid_dropout", "mlp.dropout"),
        attention_dropout="attn.attn_dropout",
        gpt2_tokenizer=True,
    ),
    Architecture("llama", ("llama",)),
    Architecture("mistral", ("mistral",), sliding_window=True),
    Architecture("qwen2", ("qwen2",), layer_types=True),
    Architecture("qwen3", ("qwen3",), layer_types=True),  # its q/k norms live inside self_attn
    Architecture(
        "phi3", ("phi3",), branch_dropout=("resid_attn_dropout", "resid_mlp_dropout"), sliding_window=True
    ),  # fused qkv_proj and gate_up_proj live inside self_attn and mlp
    Architecture(
        "gemma2",
        ("gemma2",),
        embedding_scale="embed_scale",
        residual_branches=("post_attention_layernorm", "post_feedforward_layernorm"),
        logit_softcap="final_logit_softcapping",
        layer_types=True,
    ),
    Architecture(
        "gemma3",
        ("gemma3_text",),  # Gemma3ForCausalLM; the multimodal gemma3 is not a causal LM of this shape
        embedding_scale="embed_scale",
        residual_branches=("post_attention_layernorm", "post_feedforward_layernorm"),
        logit_softcap="final_logit_softcapping",
        layer_types=True,
        # the text-only models share the multimodal tokenizer; Gemma 3 270M emits <start_of_image> after bare prompts
        non_text_tokens=("<start_of_image>", "<end_of_image>", "<image_soft_token>"),
    ),
    Architecture(
        "gpt_neox",
        ("gpt_neox",),  # Pythia; attention and MLP both read the block input (parallel residual)
        final_norm="final_layer_norm",
        attention="attention",
        embedding_dropout="emb_dropout",
        branch_dropout=("post_attention_dropout", "post_mlp_dropout"),
    ),
)
BY_MODEL_TYPE: dict[str, Architecture] = {t: a for a in ARCHITECTURES for t in a.model_types}


def _get(root: nn.Module, path: str):
    for name in path.split("."):
        root = getattr(root, name)
    return root


def architecture_of_type(model_type: str | None) -> Architecture:
    """The table entry of a config's ``model_type``; an unsupported one raises ``BackboneError``."""
    if model_type not in BY_MODEL_TYPE:
        raise BackboneError(f"unsupported architecture {model_type!r}: vtrans supports {', '.join(BY_MODEL_TYPE)}")
    return BY_MODEL_TYPE[model_type]


def architecture(model: nn.Module) -> Architecture:
    """The table entry of a Hugging Face causal LM (by its config's ``model_type``)."""
    return architecture_of_type(getattr(getattr(model, "config", None), "model_type", None))


def family(model: nn.Module) -> str:
    """The architecture family of a Hugging Face causal LM: its table entry's name (``"gpt2"``, ``"llama"``, ...)."""
    return architecture(model).name


def family_of_type(model_type: str | None) -> str:
    """The family of a config's ``model_type``; an unsupported one raises ``BackboneError``."""
    return architecture_of_type(model_type).name


def trunk(model: nn.Module) -> nn.Module:
    """The model without its unembedding: embeddings, blocks and final norm."""
    architecture(model)  # an unsupported architecture fails here, not on a missing attribute
    return model.base_model


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks, in order."""
    return _get(trunk(model), architecture(model).blocks)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the residual stream before the unembedding."""
    return _get(trunk(model), architecture(model).final_norm)


def unembedding(model: nn.Module) -> nn.Module:
    """The linear map from the (normed) residual stream to vocabulary logits (before any soft-cap)."""
    architecture(model)
    return model.get_output_embeddings()


def embedding_scale(model: nn.Module) -> float:
    """The factor the token embedding multiplies its output by (1 for most families, √d_model for Gemma)."""
    attr = architecture(model).embedding_scale
    return 1.0 if attr is None else float(getattr(model.get_input_embeddings(), attr))


def position_embedding(model: nn.Module) -> nn.Module | None:
    """The learned absolute position embedding added before block 0 (GPT-2's), or None (rotary)."""
    attr = architecture(model).position_embedding
    return None if attr is None else _get(trunk(model), attr)


def logit_softcap(model: nn.Module) -> float | None:
    """The cap of the final logits' tanh soft-capping, cap · tanh(logits / cap), or None."""
    attr = architecture(model).logit_softcap
    cap = None if attr is None else getattr(model.config, attr, None)
    return None if cap is None else float(cap)


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap · tanh(logits / cap) in the logits' dtype, as the model computes it; the logits unchanged for ``None``."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def n_layers(model: nn.Module) -> int:
    return len(blocks(model))


def d_model(model: nn.Module) -> int:
    return model.config.hidden_size


def block_output(output: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden states a block returns: a tensor in recent transformers, a tuple in older ones."""
    return output[0] if isinstance(output, tuple) else output


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Every block's attention module, in order."""
    attr = architecture(model).attention
    return [_get(block, attr) for block in blocks(model)]


def mlp_modules(model: nn.Module) -> list[nn.Module]:
    """Every block's MLP, in order."""
    attr = architecture(model).mlp
    return [_get(block, attr) for block in blocks(model)]


def residual_branches(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are added to the residual stream (the attention and MLP branch of every block)."""
    arch = architecture(model)
    names = arch.residual_branches or (arch.attention, arch.mlp)
    return [_get(block, name) for block in blocks(model) for name in names]


def embedding_dropout(model: nn.Module) -> nn.Module | None:
    """The dropout on the embeddings, or None."""
    attr = architecture(model).embedding_dropout
    return None if attr is None else _get(trunk(model), attr)


def attention_dropout(model: nn.Module) -> list[nn.Module]:
    """Every block's dropout on the attention probabilities (GPT-2's); empty for a family without it."""
    attr = architecture(model).attention_dropout
    return [] if attr is None else [_get(block, attr) for block in blocks(model)]


def native_dropout(model: nn.Module) -> list[nn.Module]:
    """Modules whose ``training`` flag switches the architecture's own dropout on; empty for none.

    The embedding dropout, every block's residual-branch dropout and, where the family has it,
    the attention-probability dropout with the attention module whose ``training`` flag it reads
    (GPT-2). Llama, Mistral, Qwen and Gemma have none.
    """
    arch = architecture(model)
    sites: list[nn.Module] = [m for m in [embedding_dropout(model)] if m is not None]
    for block in blocks(model):
        if arch.attention_dropout is not None:
            sites += [_get(block, arch.attention), _get(block, arch.attention_dropout)]
        sites += [_get(block, name) for name in arch.branch_dropout]
    return sites


def non_text_ids(model: nn.Module, tokenizer) -> list[int]:
    """Token ids the model can emit that are not text: generation suppresses them (``vtrans.backbone.generate``).

    The family's ``non_text_tokens`` that the tokenizer has, and every row of the unembedding past
    the tokenizer's vocabulary (a head padded to a round size has rows no token decodes from).
    """
    ids = set(range(len(tokenizer), unembedding(model).weight.shape[0]))
    for token in architecture(model).non_text_tokens:
        i = tokenizer.convert_tokens_to_ids(token)  # the unknown token's id (or None) where it has none
        if isinstance(i, int) and tokenizer.convert_ids_to_tokens(i) == token:
            ids.add(i)
    return sorted(ids)


def lens_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logit lens: unembed a residual-stream state after the final norm, soft-capped as the model's logits are. hidden: (..., C)."""
    return softcap(unembedding(model)(final_norm(model)(hidden)), logit_softcap(model))  # (..., V)


# --------------------------------------------------------------------------- block surgery


class _Zero(nn.Module):
    """Stands in for an absolute position embedding when the stream already carries it."""

    def __init__(self, like: nn.Embedding) -> None:
        super().__init__()
        self.dim, self.dtype = like.embedding_dim, like.weight.dtype

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return position_ids.new_zeros(*position_ids.shape, self.dim, dtype=self.dtype)


def _set(root: nn.Module, path: str, value) -> None:
    *parents, last = path.split(".")
    for name in parents:
        root = getattr(root, name)
    setattr(root, last, value)


@contextlib.contextmanager
def _swapped(model: nn.Module, swaps: dict[str, object]) -> Iterator[None]:
    """Within the context the trunk's attributes ``swaps`` names hold the values given (``config.*``
    paths the trunk's config's); every one is put back in ``finally``."""
    body = trunk(model)

    def root(path: str) -> tuple[object, str]:
        return (body.config, path.removeprefix("config.")) if path.startswith("config.") else (body, path)

    saved = {}
    try:
        for path, value in swaps.items():
            obj, rest = root(path)
            saved[path] = _get(obj, rest)
            _set(obj, rest, value)
        yield
    finally:
        for path, value in saved.items():
            obj, rest = root(path)
            _set(obj, rest, value)


@contextlib.contextmanager
def blocks_until(model: nn.Module, stop: int) -> Iterator[nn.Module]:
    """Within the context, ``trunk(model)(...).last_hidden_state`` is the raw stream after block ``stop - 1``.

    Only blocks ``0..stop-1`` run and the final norm is skipped; both are restored in ``finally``.
    """
    arch = architecture(model)
    swaps = {arch.blocks: nn.ModuleList(list(blocks(model))[:stop]), arch.final_norm: nn.Identity()}
    with _swapped(model, swaps):
        yield trunk(model)


@contextlib.contextmanager
def blocks_from(model: nn.Module, start: int) -> Iterator[nn.Module]:
    """Within the context, ``model(inputs_embeds=h)`` runs only blocks ``start..L-1`` on ``h``.

    ``h`` is the residual stream after block ``start - 1`` (``hidden_states[start]`` of a full
    forward). The swap is restored in ``finally``. An absolute position embedding (GPT-2's),
    which ``h`` already holds, is replaced by zeros for the duration; a family with per-layer
    attention types reads ``config.layer_types`` by the index among the blocks that run, so it is
    cut to blocks ``start..L-1`` too. Rotary positions come from ``position_ids`` as always, and
    the embedding scale (Gemma's) is applied inside the embedding module, which does not run.
    Pass ``use_cache=False`` or a cache of your own: the one transformers would make is laid out
    from the config of the whole model.
    """
    arch = architecture(model)
    swaps: dict[str, object] = {arch.blocks: nn.ModuleList(list(blocks(model))[start:])}
    if arch.position_embedding is not None:
        swaps[arch.position_embedding] = _Zero(position_embedding(model))
    if arch.layer_types:
        swaps["config.layer_types"] = list(model.config.layer_types)[start:]
    with _swapped(model, swaps):
        yield model


@contextlib.contextmanager
def attention_implementation(model: nn.Module, name: str | None) -> Iterator[nn.Module]:
    """Within the context the model runs attention implementation ``name`` (``eager``, ``sdpa``, ...).

    ``eager`` is the one that returns attention weights. ``None`` leaves the model as it is. The
    implementation the model had is restored in ``finally``.
    """
    saved = model.config._attn_implementation
    try:
        if name is not None and name != saved:
            model.set_attn_implementation(name)
        yield model
    finally:
        if model.config._attn_implementation != saved:
            model.set_attn_implementation(saved)
