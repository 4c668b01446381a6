"""``margin``: 1 − (p(top-1) − p(top-2)), how close the runner-up token comes; read off the shared forward's logits."""

from __future__ import annotations

import torch

from vtrans.backbone.tokens import aggregate
from vtrans.estimators.base import Context, Family, Forward, Shown


def read(forward: Forward, context: Context) -> dict[str, torch.Tensor]:
    top = torch.softmax(forward.logits.float(), -1).topk(2, dim=-1).values  # (B, N, 2)
    return {"margin": aggregate(1 - (top[..., 0] - top[..., 1]), forward.enc, context.config.aggregate)}


FAMILY = Family("margin", {"margin": "1 − (p(top-1) − p(top-2)): a close runner-up"}, read, shown=Shown(reference=True))
