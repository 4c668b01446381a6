"""The one place that knows architectures: the names of a causal LM's parts.

Everything else in vtrans asks this module for "the blocks", "the final norm", "the
unembedding" or "the dropout sites" of a model, and never looks at attribute names itself.
Two families are supported: GPT-2 (the paper's GPT-2 XL) and Llama (the embedded default,
SmolLM2-135M-Instruct). An unknown family fails loudly. Where transformers names a part for
every architecture (``base_model``, ``get_output_embeddings``), its accessor is used.

Every change this module makes to a model (running some blocks only, another attention
implementation) is a context manager that restores the model in ``finally``.

What it does not know: where models come from (``vtrans.loading``) and how a frozen prefix is
cached (``vtrans.frozen``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from vtrans.errors import BackboneError

GPT2_FAMILY = ("gpt2",)
LLAMA_FAMILY = ("llama", "mistral", "qwen2")


def family(model: nn.Module) -> str:
    """The architecture family of a Hugging Face causal LM: ``"gpt2"`` or ``"llama"``."""
    return family_of_type(getattr(getattr(model, "config", None), "model_type", None))


def family_of_type(model_type: str | None) -> str:
    """The family of a config's ``model_type``; an unsupported one raises ``BackboneError``."""
    if model_type in GPT2_FAMILY:
        return "gpt2"
    if model_type in LLAMA_FAMILY:
        return "llama"
    raise BackboneError(
        f"unsupported architecture {model_type!r}: vtrans knows GPT-2 ({', '.join(GPT2_FAMILY)}) "
        f"and Llama ({', '.join(LLAMA_FAMILY)}) models"
    )


def trunk(model: nn.Module) -> nn.Module:
    """The model without its unembedding: embeddings, blocks and final norm."""
    family(model)  # an unsupported architecture fails here, not on a missing attribute
    return model.base_model


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks, in order."""
    body = trunk(model)
    return body.h if family(model) == "gpt2" else body.layers


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the residual stream before the unembedding."""
    body = trunk(model)
    return body.ln_f if family(model) == "gpt2" else body.norm


def unembedding(model: nn.Module) -> nn.Module:
    """The linear map from the (normed) residual stream to vocabulary logits."""
    family(model)
    return model.get_output_embeddings()


def n_layers(model: nn.Module) -> int:
    return len(blocks(model))


def d_model(model: nn.Module) -> int:
    return model.config.hidden_size


def block_output(output: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden states a block returns: a tensor in recent transformers, a tuple in older ones."""
    return output[0] if isinstance(output, tuple) else output


def residual_branches(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are added to the residual stream (attention and MLP, per block)."""
    if family(model) == "gpt2":
        return [m for block in blocks(model) for m in (block.attn, block.mlp)]
    return [m for block in blocks(model) for m in (block.self_attn, block.mlp)]


def native_dropout(model: nn.Module) -> list[nn.Module]:
    """Modules whose ``training`` flag switches the architecture's own dropout on.

    GPT-2: the embedding dropout, every attention module (attention-probability dropout and
    output dropout read ``attn.training``) and every MLP dropout. Llama has none.
    """
    if family(model) != "gpt2":
        return []
    body = trunk(model)
    sites: list[nn.Module] = [body.drop]
    for block in body.h:
        sites += [block.attn, block.attn.attn_dropout, block.attn.resid_dropout, block.mlp.dropout]
    return sites


def lens_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logit lens: unembed a residual-stream state after the final norm. hidden: (..., C)."""
    return unembedding(model)(final_norm(model)(hidden))  # (..., V)


class _Zero(nn.Module):
    """Stands in for GPT-2's position embedding when the stream already carries it."""

    def __init__(self, like: nn.Embedding) -> None:
        super().__init__()
        self.dim, self.dtype = like.embedding_dim, like.weight.dtype

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return position_ids.new_zeros(*position_ids.shape, self.dim, dtype=self.dtype)


@contextlib.contextmanager
def blocks_until(model: nn.Module, stop: int) -> Iterator[nn.Module]:
    """Within the context, ``trunk(model)(...).last_hidden_state`` is the raw stream after block ``stop - 1``.

    Only blocks ``0..stop-1`` run and the final norm is skipped; both are restored in ``finally``.
    """
    body = trunk(model)
    attr = "h" if family(model) == "gpt2" else "layers"
    norm_attr = "ln_f" if family(model) == "gpt2" else "norm"
    full, norm = getattr(body, attr), getattr(body, norm_attr)
    try:
        setattr(body, attr, nn.ModuleList(list(full)[:stop]))
        setattr(body, norm_attr, nn.Identity())
        yield body
    finally:
        setattr(body, attr, full)
        setattr(body, norm_attr, norm)


@contextlib.contextmanager
def blocks_from(model: nn.Module, start: int) -> Iterator[nn.Module]:
    """Within the context, ``model(inputs_embeds=h)`` runs only blocks ``start..L-1`` on ``h``.

    ``h`` is the residual stream after block ``start - 1`` (``hidden_states[start]`` of a full
    forward). The swap is restored in ``finally``. GPT-2 adds position embeddings to its
    inputs, which ``h`` already holds, so they are replaced by zeros for the duration.
    """
    body = trunk(model)
    fam = family(model)
    attr = "h" if fam == "gpt2" else "layers"
    full = getattr(body, attr)
    saved_wpe = body.wpe if fam == "gpt2" else None
    try:
        setattr(body, attr, nn.ModuleList(list(full)[start:]))
        if fam == "gpt2":
            body.wpe = _Zero(saved_wpe)
        yield model
    finally:
        setattr(body, attr, full)
        if fam == "gpt2":
            body.wpe = saved_wpe



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
