"""A callback for the multi-process tests: each rank writes its final latent weights."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class DumpLatent(L.Callback):
    """Save ``pl_module.model.latent``'s state dict to ``out_dir/rank{N}.pt`` when fitting ends."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.model.latent.state_dict().items()}
        torch.save({"state": state, "world_size": trainer.world_size}, self.out_dir / f"rank{trainer.global_rank}.pt")


def score_on_rank(ckpt: str, prompts: list[str], out_dir: str) -> None:
    """Score ``prompts`` with the checkpoint; each rank writes every record it yields to ``rank{N}.json``."""
    import json

    from vtrans.estimators.distributed import current
    from vtrans.scoring.scorer import Scorer

    records = list(Scorer.from_checkpoint(ckpt, device="cpu", batch_size=2, samples=4, quiet=True).score(prompts))
    (Path(out_dir) / f"rank{current().rank}.json").write_text(json.dumps(records))


def evaluate_on_rank(ckpt: str, config, out_dir: str) -> None:
    """``vtrans evaluate`` in each rank of a process group; rank 0 writes the run into ``out_dir``."""
    from vtrans.evaluation.evaluate import evaluate

    evaluate(config, out_dir, ckpt=ckpt, device="cpu", progress=False)
