"""How each block attends: its layer type, the ready masks the trunk takes, and a cache that keeps every position.

A family whose blocks attend through a sliding window (Mistral, Phi-3) or by per-layer types
(Qwen2, Qwen3, Gemma 2, Gemma 3) says so in its table entry (``vtrans.backbone.architectures``);
the masks here read it, so that a layout whose columns are not its positions (the frozen cache's
two regions, the z samples' own keys) attends as the plain sequence does.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from vtrans.backbone.architectures import architecture, n_layers


def layer_types(model: nn.Module) -> list[str]:
    """How each block attends: ``full_attention`` or ``sliding_attention`` (the last ``config.sliding_window`` positions)."""
    arch, config = architecture(model), model.config
    if arch.layer_types:
        return list(config.layer_types)[: n_layers(model)]
    sliding = arch.sliding_window and getattr(config, "sliding_window", None) is not None
    return ["sliding_attention" if sliding else "full_attention"] * n_layers(model)


def attention_mask(
    model: nn.Module,
    allowed: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The ready attention mask the trunk takes for the pattern ``allowed``: 0 where a query may attend, −big elsewhere.

    A sliding-window block sees only keys fewer than ``config.sliding_window`` positions back: the
    window is taken on positions, not columns, so a layout whose columns are not its positions
    (the frozen cache's two regions, the z samples' own keys) is masked as the plain sequence is.

    Args:
        allowed: (B, Q, K) which keys each query may see (causality and padding).
        query_positions: (B, Q) and ``key_positions`` (B, K): the positions of the queries and keys.

    Returns:
        a (B, 1, Q, K) mask, or for a family with per-layer attention types one per type, as the
        dict its trunk reads by ``config.layer_types``.
    """
    masks = {}
    for kind in dict.fromkeys(layer_types(model)):
        ok = allowed
        if kind == "sliding_attention":
            ok = ok & (query_positions.unsqueeze(-1) - key_positions.unsqueeze(-2) < model.config.sliding_window)
        mask = torch.zeros(ok.shape, dtype=dtype, device=ok.device)
        masks[kind] = mask.masked_fill(~ok, torch.finfo(dtype).min).unsqueeze(1)  # (B, 1, Q, K)
    if architecture(model).layer_types:
        return masks
    (mask,) = masks.values()
    return mask


def full_cache() -> DynamicCache:
    """A key/value cache that keeps every position of every block.

    What transformers makes by default for a family with sliding-window blocks keeps only the
    window in those; a forward whose keys and values are read afterwards (the z samples attend to
    the whole prompt, the one-pass scoring lays them out again) is given this one instead. The
    masks, not the cache, keep a sliding-window block within its window.
    """
    return DynamicCache()
