"""A callback for the multi-process tests: each rank writes its final latent weights."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class DumpLatent(L.Callback):
    """Save ``pl_module.latent``'s state dict to ``out_dir/rank{N}.pt`` when fitting ends."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.latent.state_dict().items()}
        torch.save({"state": state, "world_size": trainer.world_size}, self.out_dir / f"rank{trainer.global_rank}.pt")
