"""Two CPU processes (DDP over gloo) train the tiny config and end with the same latent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ddp_two_cpu_processes_end_with_identical_latents(tmp_path: Path) -> None:
    extra = tmp_path / "ddp.yaml"
    extra.write_text(
        f"""
trainer:
  accelerator: cpu
  devices: 2
  strategy: ddp
  max_epochs: 2
  default_root_dir: {tmp_path}
  logger: false
  enable_progress_bar: false
  callbacks:
    - class_path: tests.ddp_helpers.DumpLatent
      init_args: {{out_dir: {tmp_path / "weights"}}}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {tmp_path / "ckpt"}, save_last: true}}
data:
  max_items: 32
  batch_size: 8
"""
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "train.py", "fit", "--config", "configs/tiny.yaml", "--config", str(extra)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    ranks = [torch.load(tmp_path / "weights" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"ranks differ in {key}")
    # the latent trained (the zero-initialised projection moved) and a checkpoint was written
    assert a["proj.weight"].abs().sum() > 0
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
