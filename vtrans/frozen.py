"""What the frozen backbone computes for a training item, kept across epochs.

The backbone never changes, and z enters only at the scored position and after it. So for each
item the stream after block k (all its tokens) and the upper blocks' keys/values for the prompt
tokens before the scored one are the same in every epoch: they are computed once and reused.
Each later step runs only the suffix (the scored position and the target tokens) with z.

A batch is reassembled from the cached items in a two-region layout:

    [ prefix region: P columns, left-padded ][ suffix region: M columns, left-padded ]

Attention is causal by column index and padding is masked, so the layout computes exactly what
one right-aligned sequence per item would, with explicit position ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtrans import backbones
from vtrans.tokens import Encoded


@dataclass
class ItemState:
    """The frozen computation for one item.

    Attributes:
        h: (n_tokens, C) stream after block k for the prompt and target tokens.
        kv: {layer: (keys, values)}, each (H, n_prompt - 1, D): upper blocks, positions before the scored one.
        target: the target token ids.
    """

    h: torch.Tensor
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    target: tuple[int, ...]


class FrozenCache:
    """Per-item frozen states, keyed by (prompt, target ids)."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, tuple[int, ...]], ItemState] = {}

    def __len__(self) -> int:
        return len(self.items)

    def clear(self) -> None:
        self.items.clear()

    @torch.no_grad()
    def _fill(self, module, prompts: list[str], targets: list[list[int]]) -> None:
        enc = module.encode(prompts, targets)
        h = module.lower(enc)  # (B, T, C)
        width = h.shape[1]
        full = backbones.upper_prefix(
            module.backbone.model, module.layer, h, enc.attention_mask, enc.position_ids, split=width
        )
        lengths = enc.attention_mask.sum(1).tolist()
        for b, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
            first, scored = width - int(lengths[b]), int(enc.scored[b])
            kv = {i: (k[b, :, first:scored].clone(), v[b, :, first:scored].clone()) for i, (k, v) in full.kv.items()}
            self.items[(prompt, tuple(target))] = ItemState(h[b, first:].clone(), kv, tuple(target))

    def batch(self, module, prompts: list[str], targets: list[list[int]]):
        """``(enc, h, prefix)`` for ``module.decode`` and ``module.distributions``, from cached states."""
        if self.items and next(iter(self.items.values())).h.device != module.device:
            self.clear()  # the module moved: states computed elsewhere are stale
        keys = [(p, tuple(t)) for p, t in zip(prompts, targets, strict=True)]
        todo = [k for k in dict.fromkeys(keys) if k not in self.items]
        if todo:
            self._fill(module, [p for p, _ in todo], [list(t) for _, t in todo])
        states = [self.items[k] for k in keys]
        return assemble(states, module.tokenizer.pad_token_id)


def assemble(states: list[ItemState], pad_id: int):
    """Batch cached items into the two-region layout; returns ``(enc, h, prefix)``."""
    ref = states[0].h
    device, dtype, width_c = ref.device, ref.dtype, ref.shape[-1]
    n_prefix = [next(iter(s.kv.values()))[0].shape[1] if s.kv else 0 for s in states]
    n_suffix = [s.h.shape[0] - p for s, p in zip(states, n_prefix, strict=True)]
    big_p, big_m = max(n_prefix), max(n_suffix)
    n_max = max(1, max(len(s.target) for s in states))
    batch = len(states)
    h = torch.zeros(batch, big_p + big_m, width_c, dtype=dtype, device=device)
    mask = torch.zeros(batch, big_p + big_m, dtype=torch.long, device=device)
    pos = torch.zeros(batch, big_p + big_m, dtype=torch.long, device=device)
    targets = torch.full((batch, n_max), pad_id, dtype=torch.long, device=device)
    target_mask = torch.zeros(batch, n_max, dtype=torch.bool, device=device)
    layers = sorted(states[0].kv)
    kv = {}
    for layer in layers:
        k0, _ = states[0].kv[layer]
        shape = (batch, k0.shape[0], big_p, k0.shape[-1])
        kv[layer] = (k0.new_zeros(shape), k0.new_zeros(shape))
    for b, (s, p, m) in enumerate(zip(states, n_prefix, n_suffix, strict=True)):
        mask[b, big_p - p : big_p] = 1
        mask[b, big_p + big_m - m :] = 1
        pos[b, big_p - p : big_p] = torch.arange(p, device=device)
        pos[b, big_p + big_m - m :] = torch.arange(p, p + m, device=device)
        h[b, big_p + big_m - m :] = s.h[p:]
        for layer in layers:
            k, v = s.kv[layer]
            kv[layer][0][b, :, big_p - p :] = k
            kv[layer][1][b, :, big_p - p :] = v
        if s.target:
            targets[b, n_max - len(s.target) :] = torch.tensor(s.target, device=device)
            target_mask[b, n_max - len(s.target) :] = True
    scored = torch.tensor([big_p + big_m - 1 - len(s.target) for s in states], device=device)
    ids = torch.full_like(mask, pad_id)
    enc = Encoded(ids, mask, pos, scored, targets, target_mask)
    return enc, h, backbones.FrozenPrefix(kv, big_p)
