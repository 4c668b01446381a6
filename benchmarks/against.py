"""A hot path of this tree against the same path of another git revision, side by side.

Run it before committing a change to a path that ``benchmarks/costs.py`` measures, and give its
before/after ratio in the commit or the note:

    python benchmarks/against.py HEAD~1                       # latent_mi_S32 and single_pass, smollm2
    python benchmarks/against.py 7001bfc --paths latent_mi_S32 --processes 4 --rounds 7
    python benchmarks/against.py main --model tiny-llama --paths mc_dropout_T16

Each process loads one tree's package (``PYTHONPATH``), times a plain forward and each path on
the same batch, interleaved round by round, and reports each path as a ratio to the forward
measured in that process: a slow moment of a noisy machine hits the forward and the path alike.
The processes alternate between the two trees (this, other, this, other, ...), so both see the
same machine; the medians of each tree's ratios and their quotient are printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from costs import checkout  # noqa: E402  (a sibling script)

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("single_pass", "latent_mi_S32", "mc_dropout_T16")

CHILD = r"""
import json, statistics, sys, time
import torch
from vtrans.config import EstimatorConfig
from vtrans.data import DEFAULT_TEMPLATE, load_split, render_prompt
try:
    from vtrans.backbone.loading import Backbone
    from vtrans.estimators.runner import Runner
    from vtrans.latent.model import LatentModel
except ModuleNotFoundError:  # a revision of the flat layout (before vtrans.backbone, vtrans.latent)
    from vtrans.loading import Backbone
    from vtrans.model import LatentModel
    from vtrans.runner import Runner

model_name, batch, rounds, paths = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
torch.manual_seed(0)
backbone = Backbone(model_name, attn_implementation="sdpa")
module = LatentModel(backbone, d_z=16, prior="conditional")
torch.nn.init.normal_(module.latent.proj.weight, std=0.02)  # a latent that does something
module.eval()
prompts = [render_prompt(DEFAULT_TEMPLATE, it.prefix) for it in load_split("builtin", "test")[:batch]]
runner = Runner(backbone, module, EstimatorConfig(batch_size=batch, samples=32, passes=16), progress=False)
completions = runner.complete(prompts)
inputs = backbone.tokenizer(prompts, return_tensors="pt", padding=True)
NAMES = {
    "single_pass": ["msp", "entropy", "margin", "attention_entropy", "lens_ce", "lens_area", "posterior_var", "latent_kl"],
    "latent_mi_S32": ["latent_mi", "latent_nll"],
    "mc_dropout_T16": ["mc_dropout_var", "mc_dropout_entropy", "mc_dropout_mi"],
}
def forward():
    with torch.no_grad():
        backbone.model(**inputs)
fns = {"forward": forward, **{p: (lambda names=NAMES[p]: runner.scores(prompts, completions, names)) for p in paths}}
for fn in fns.values():
    fn()  # warm-up
seconds = {name: [] for name in fns}
for _ in range(rounds):
    for name, fn in fns.items():
        start = time.perf_counter(); fn(); seconds[name].append(time.perf_counter() - start)
med = {name: statistics.median(v) for name, v in seconds.items()}
unit = {"mc_dropout_T16": 16}
print(json.dumps({p: med[p] / (unit.get(p, 1) * med["forward"]) for p in paths} | {"forward_s": med["forward"]}))
"""


def run(trees: dict[str, Path], args: argparse.Namespace) -> dict[str, list[dict]]:
    """Each tree's child processes, alternately: the parsed JSON line of each."""
    out: dict[str, list[dict]] = {name: [] for name in trees}
    command = [sys.executable, "-c", CHILD, args.model, str(args.batch_size), str(args.rounds), ",".join(args.paths)]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            for name, tree in trees.items():
                env = {**os.environ, "PYTHONPATH": str(tree)}
                done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp, check=False)
                if done.returncode != 0:
                    raise SystemExit(f"{name} tree ({tree}) failed:\n{done.stderr[-3000:]}")
                out[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"process {i + 1}/{args.processes}, {name}: {out[name][-1]}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the git revision to compare this tree with")
    parser.add_argument("--paths", type=lambda s: s.split(","), default=["latent_mi_S32", "single_pass"])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per process")
    parser.add_argument("--processes", type=int, default=3, help="processes per tree")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.paths) - set(PATHS))
    if unknown:
        parser.error(f"unknown path(s) {', '.join(unknown)}: choose from {', '.join(PATHS)}")
    with checkout(args.rev) as other:
        runs = run({"this": ROOT, "against": other}, args)
    ratios = {name: {p: statistics.median(r[p] for r in rs) for p in args.paths} for name, rs in runs.items()}
    result = {
        "against": args.rev,
        "model": args.model,
        "batch_size": args.batch_size,
        "processes_per_tree": args.processes,
        "rounds_per_process": args.rounds,
        "threads": int(os.environ.get("OMP_NUM_THREADS", 0)) or None,
        "x_one_forward": ratios,
        "this_over_against": {p: ratios["this"][p] / ratios["against"][p] for p in args.paths},
        "runs": runs,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
