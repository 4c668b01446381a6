"""Prompts and targets as token tensors, left-padded so that every sequence ends at index T-1.

With every sequence right-aligned, target slot j (of N) is always predicted at position
T-1-N+j, so one ``logits_to_keep=N+1`` slice serves a whole batch of mixed lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Encoded:
    """A batch of prompts and (optional) targets.

    Attributes:
        input_ids, attention_mask, position_ids: (B, T).
        scored: (B,) index of the last prompt token (it predicts the first target token).
        targets: (B, N) target ids, right-aligned; ``target_mask`` (B, N) marks the real ones.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    scored: torch.Tensor
    targets: torch.Tensor
    target_mask: torch.Tensor

    @property
    def after_scored(self) -> torch.Tensor:
        """(B, T) bool: the scored position and every later one."""
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return positions.unsqueeze(0) >= self.scored.unsqueeze(1)

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of a Hugging Face forward: ids, attention mask, position ids."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}

    @property
    def first_slot(self) -> torch.Tensor:
        """(B,) index of each item's first real target slot (its first target token)."""
        n = self.targets.shape[1]
        return n - self.target_mask.sum(-1).clamp(min=1)

    def to(self, device: torch.device | str) -> Encoded:
        return Encoded(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def slice(self, start: int, stop: int) -> Encoded:
        """Items ``start..stop-1``."""
        return Encoded(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})

    def repeat(self, times: int) -> Encoded:
        """Each item repeated ``times`` times in a row: (B, ...) -> (B*times, ...)."""
        return Encoded(**{f.name: getattr(self, f.name).repeat_interleave(times, 0) for f in fields(self)})


def target_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """Token ids of each word as it follows a prompt (with its leading space)."""
    return [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words]


def encode(
    tokenizer,
    prompts: list[str],
    targets: list[list[int]] | None = None,
    device: torch.device | str = "cpu",
) -> Encoded:
    """Tokenise prompts and append target ids; left-pad to a common length."""
    prompt_ids = tokenizer(list(prompts))["input_ids"]
    targets = targets if targets is not None else [[] for _ in prompt_ids]
    seqs = [list(p) + list(t) for p, t in zip(prompt_ids, targets, strict=True)]
    width, n_max = max(map(len, seqs)), max(1, max(map(len, targets)))
    pad = tokenizer.pad_token_id
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    tgt = torch.full((len(seqs), n_max), pad, dtype=torch.long)
    tgt_mask = torch.zeros((len(seqs), n_max), dtype=torch.bool)
    for i, (seq, t) in enumerate(zip(seqs, targets, strict=True)):
        ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[i, width - len(seq) :] = 1
        if t:
            tgt[i, n_max - len(t) :] = torch.tensor(t, dtype=torch.long)
            tgt_mask[i, n_max - len(t) :] = True
    scored = torch.tensor([width - 1 - len(t) for t in targets], dtype=torch.long)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return Encoded(ids, mask, position_ids, scored, tgt, tgt_mask).to(device)


def shift_positions(x: torch.Tensor, shift: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Move each item's positions along ``dim``: ``out[b, ..., p] = x[b, ..., p + shift[b]]``, 0 where that is out of range.

    Args:
        x: (B, ...) a batch of per-position values.
        shift: (B,) how far each item's positions move.
        length: the positions of the result along ``dim``.
    """
    source = torch.arange(length, device=x.device).unsqueeze(0) + shift.to(x.device).unsqueeze(1)  # (B, length)
    valid = (source >= 0) & (source < x.shape[dim])
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = length
    size = list(x.shape)
    size[dim] = length
    index = source.clamp(0, x.shape[dim] - 1).view(shape).expand(size)
    return x.gather(dim, index).masked_fill(~valid.view(shape), 0)


def slot_positions(x: torch.Tensor, enc: Encoded) -> torch.Tensor:
    """The positions that predict the target slots: (B, T, ...) -> (B, N, ...)."""
    n = enc.targets.shape[1]
    return x[:, -n - 1 : -1]


def aggregate(values: torch.Tensor, enc: Encoded, how: str = "first") -> torch.Tensor:
    """Reduce per-slot values (B, N) to one per item (B,): the first token, mean/max over the
    answer's tokens, or its last token (slot N − 1: the slots are right-aligned)."""
    if how == "first":
        return values.gather(1, enc.first_slot.unsqueeze(1)).squeeze(1)
    if how == "last":
        return values[:, -1]
    mask = enc.target_mask
    if how == "mean":
        return (values * mask).sum(1) / mask.sum(1).clamp(min=1)
    if how == "max":
        return values.masked_fill(~mask, float("-inf")).amax(1)
    raise ValueError(f"aggregate must be first, mean, max or last, got {how!r}")
