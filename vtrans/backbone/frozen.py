"""What the frozen backbone computes for a training item, kept across epochs.

The backbone never changes, and z enters only at the scored position and after it. So for each
item the stream after block k (all its tokens) and the upper blocks' keys/values for the prompt
tokens before the scored one are the same in every epoch: they are computed once and reused.
Each later step runs only the suffix (the scored position and the target tokens) with z.

A batch is reassembled from the cached items in a two-region layout:

    [ prefix region: P columns, left-padded ][ suffix region: M columns, left-padded ]

Attention is causal by column index and padding is masked, so the layout computes exactly what
one right-aligned sequence per item would, with explicit position ids.

The machinery beneath, used by training and scoring alike: a prompt's upper-block keys and
values are recorded once (:func:`upper_prefix`, a :class:`FrozenPrefix`) and every suffix pass
(each sample of z) attends to them read-only (:func:`upper_suffix`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from vtrans.backbone import architectures, attention, tokens
from vtrans.backbone.tokens import Encoded

# --------------------------------------------------------------------------- frozen prefixes


def additive_mask(
    model, attention_mask: torch.Tensor, position_ids: torch.Tensor, q_start: int, q_end: int, dtype: torch.dtype
):
    """Causal + padding mask for queries ``q_start..q_end-1`` over keys ``0..q_end-1``, as the trunk takes it.

    Attention is causal by column; a sliding-window block's window is on ``position_ids`` (see
    :func:`vtrans.backbone.attention.attention_mask`). A (B, 1, Q, K) tensor of 0 or −big, or one per layer type.
    """
    keys = torch.arange(q_end, device=attention_mask.device)
    queries = torch.arange(q_start, q_end, device=attention_mask.device)
    allowed = (keys.view(1, -1) <= queries.view(-1, 1)).unsqueeze(0)  # (1, Q, K)
    allowed = allowed & attention_mask[:, :q_end].bool().unsqueeze(1)  # (B, Q, K)
    return attention.attention_mask(model, allowed, position_ids[:, q_start:q_end], position_ids[:, :q_end], dtype)


class _Recorder(DynamicCache):
    """A cache that records each layer's keys and values and returns them unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.kv[layer_idx] = (key_states, value_states)
        return key_states, value_states


class FrozenPrefix(DynamicCache):
    """Keys and values of a prefix, shared read-only by any number of suffix passes.

    ``update`` returns prefix + new states without storing them, so one prefix serves every
    sample of z (the suffix differs, the prefix never does).
    """

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        super().__init__()
        self.kv, self.length = kv, length

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.kv[layer_idx]
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def rows(self, start: int, stop: int) -> FrozenPrefix:
        """Items ``start..stop-1`` of the batch."""
        return FrozenPrefix({i: (k[start:stop], v[start:stop]) for i, (k, v) in self.kv.items()}, self.length)

    def repeat(self, times: int) -> FrozenPrefix:
        """Each row repeated ``times`` times in a row, like ``Encoded.repeat``."""
        kv = {i: (k.repeat_interleave(times, 0), v.repeat_interleave(times, 0)) for i, (k, v) in self.kv.items()}
        return FrozenPrefix(kv, self.length)


def upper_prefix(model, start: int, h: torch.Tensor, attention_mask, position_ids, split: int) -> FrozenPrefix:
    """Run blocks ``start..L-1`` on positions ``0..split-1`` of the stream h (B, T, C) and keep their K/V."""
    recorder = _Recorder()
    if split > 0:
        mask = additive_mask(model, attention_mask, position_ids, 0, split, h.dtype)
        with architectures.blocks_from(model, start) as m:
            architectures.trunk(m)(
                inputs_embeds=h[:, :split],
                attention_mask=mask,
                position_ids=position_ids[:, :split],
                cache=recorder,
                use_cache=False,
            )
    return FrozenPrefix(recorder.kv, split)


def upper_suffix(
    model, start: int, h: torch.Tensor, attention_mask, position_ids, prefix: FrozenPrefix, logits_to_keep: int = 0
) -> torch.Tensor:
    """Logits of blocks ``start..L-1`` on the suffix h (B, T-split, C), attending to a frozen prefix."""
    split = prefix.length
    mask = additive_mask(model, attention_mask, position_ids, split, attention_mask.shape[1], h.dtype)
    with architectures.blocks_from(model, start) as m:
        out = m(
            inputs_embeds=h,
            attention_mask=mask,
            position_ids=position_ids[:, split:],
            cache=prefix if split > 0 else None,
            use_cache=False,
            logits_to_keep=logits_to_keep,
        )
    return out.logits


# --------------------------------------------------------------------------- the per-item cache


@torch.no_grad()
def lower(model, layer: int, enc: Encoded) -> torch.Tensor:
    """The raw residual stream after the first ``layer`` blocks of ``model``, (B, T, C); no autograd."""
    with architectures.blocks_until(model, layer) as body:
        out = body(**enc.inputs, use_cache=False)
    return out.last_hidden_state


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
    """Per-item frozen states, keyed by (prompt, target ids).

    Each item's states are computed on their own, in a batch of one: in a batch with others they
    would carry float rounding that depends on which items share it (its padding, its matrix
    shapes), and so on the order in which a run first met them. Computed alone, an item's states
    are the same in a run resumed mid-epoch, in every fold of a cross-fitted run and in a run of
    ``train.py``, which is what makes those trainings equal to the bit.
    """

    def __init__(self) -> None:
        self.items: dict[tuple[str, tuple[int, ...]], ItemState] = {}

    def __len__(self) -> int:
        return len(self.items)

    def clear(self) -> None:
        self.items.clear()

    @torch.no_grad()
    def _fill(self, backbone, layer: int, prompts: list[str], targets: list[list[int]]) -> None:
        enc = tokens.encode(backbone.tokenizer, prompts, targets, backbone.device)
        h = lower(backbone.model, layer, enc)  # (B, T, C)
        width = h.shape[1]
        full = upper_prefix(backbone.model, layer, h, enc.attention_mask, enc.position_ids, split=width)
        lengths = enc.attention_mask.sum(1).tolist()
        for b, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
            first, scored = width - int(lengths[b]), int(enc.scored[b])
            kv = {i: (k[b, :, first:scored].clone(), v[b, :, first:scored].clone()) for i, (k, v) in full.kv.items()}
            self.items[(prompt, tuple(target))] = ItemState(h[b, first:].clone(), kv, tuple(target))

    def batch(self, backbone, layer: int, prompts: list[str], targets: list[list[int]]):
        """``(enc, h, prefix)`` of these items for the latent after block ``layer`` of ``backbone``
        (a ``vtrans.backbone.loading.Backbone``), from cached states: what ``LatentModel.decode``
        and ``LatentModel.distributions`` read."""
        if self.items and next(iter(self.items.values())).h.device != backbone.device:
            self.clear()  # the backbone moved: states computed elsewhere are stale
        keys = [(p, tuple(t)) for p, t in zip(prompts, targets, strict=True)]
        for prompt, target in (k for k in dict.fromkeys(keys) if k not in self.items):
            self._fill(backbone, layer, [prompt], [list(target)])  # one item at a time: see the class docstring
        states = [self.items[k] for k in keys]
        return assemble(states, backbone.tokenizer.pad_token_id)


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
    return enc, h, FrozenPrefix(kv, big_p)
