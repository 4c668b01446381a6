"""Cost of each estimator path and of a training step, as ratios to a plain forward, measured side by side.

Every path runs on the same batch, interleaved round by round (so a slow moment of a noisy
machine hits all paths alike), and the ratio of medians is reported as JSON:

    python benchmarks/costs.py                      # the embedded SmolLM2, batch of 32 built-in idioms
    python benchmarks/costs.py --model tiny-gpt2 --rounds 3
    python benchmarks/costs.py --ckpt CKPT --against REV   # + vtrans score and MC dropout, this tree vs git revision REV

Paths (all through ``vtrans.estimators.runner.Runner``, the completions made beforehand):

* ``single_pass``: every single-pass estimator together (msp, entropy, margin, attention_entropy,
  lens_ce, lens_area and the lens by layer, posterior_var, latent_kl), x one forward;
* ``latent_mi_S32``: ``latent_mi`` and ``latent_nll`` at S = 32, their shared forward included, x one forward;
* ``mc_dropout_T16``: the 16 dropout passes added to the shared forward, x 16 forwards;
* ``elbo_step``: a training step of the latent, x one full fine-tuning step of the model;
* ``score`` (with ``--against`` and ``--ckpt``): prompts per second of ``vtrans score`` with its
  default estimators, this tree and the other revision run alternately in fresh processes;
* ``mc_dropout_T16_against`` (with ``--against``): the 16 dropout passes x 16 forwards, each
  tree in its own processes, alternately (the same call in both trees).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from vtrans.backbone.loading import Backbone
from vtrans.backbone.tokens import encode
from vtrans.config import EstimatorConfig
from vtrans.data import DEFAULT_TEMPLATE, load_idioms, load_split, render_prompt
from vtrans.estimators import mc_dropout
from vtrans.estimators.base import context_for, run_forward
from vtrans.estimators.runner import Runner
from vtrans.latent.module import LatentLM

SINGLE_PASS = (
    "msp",
    "entropy",
    "margin",
    "attention_entropy",
    "lens_ce",
    "lens_area",
    "posterior_var",
    "latent_kl",
)
TARGETS = {
    "single_pass": 1.6,  # x one forward
    "latent_mi_S32": 3.0,  # x one forward
    "mc_dropout_T16": 1.0,  # x 16 forwards
    "elbo_step": 0.6,  # x one full fine-tuning step
}
ROOT = Path(__file__).resolve().parents[1]


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def load_seconds(model: str) -> dict[str, float]:
    """Loading the backbone in a fresh process, after a first load filled the cache.

    ``imports``: importing torch, transformers and vtrans; ``load``: building the model and
    tokenizer from the cache; ``total``: both (what a user waits for before the first score).
    """
    code = (
        "import time; t0 = time.perf_counter(); from vtrans.backbone.loading import Backbone; t1 = time.perf_counter(); "
        f"Backbone({model!r}); t2 = time.perf_counter(); print(t1 - t0, t2 - t1)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)  # fills the cache
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    imports, load = map(float, out.stdout.strip().splitlines()[-1].split())
    return {"imports": imports, "load": load, "total": imports + load}


@contextlib.contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """A temporary worktree of git revision ``rev`` (removed afterwards)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), rev], check=True
        )
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)


def alternate(
    trees: dict[str, Path], rounds: int, command: list[str], cwd: str
) -> dict[str, list[tuple[str, float]]]:
    """Run ``command`` with each tree's package on ``PYTHONPATH``, tree after tree, ``rounds`` times:
    the stdout and the wall-clock seconds of each run."""
    out: dict[str, list[tuple[str, float]]] = {name: [] for name in trees}
    for _ in range(rounds):
        for name, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": str(tree)}
            start = time.perf_counter()
            done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, cwd=cwd)
            if done.returncode != 0:
                raise RuntimeError(f"{name} tree failed:\n{done.stderr[-2000:]}")
            out[name].append((done.stdout, time.perf_counter() - start))
    return out


def score_speed(other: Path, ckpt: str, lines: int, rounds: int, device: str) -> dict:
    """Prompts per second of ``vtrans score --input FILE`` (default estimators), this tree vs ``other``.

    Both run in fresh processes with the same interpreter, alternately, ``rounds`` times; the
    ratio of median rates is reported. The time is the whole process: imports, loading, scoring.
    """
    prompts = [render_prompt(DEFAULT_TEMPLATE, it.prefix) for it in load_idioms("builtin")][:lines]
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "prompts.txt"
        file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
        code = "import sys; from vtrans.cli import main; main(sys.argv[1:])"
        command = [
            sys.executable,
            "-c",
            code,
            "score",
            "--ckpt",
            ckpt,
            "--input",
            str(file),
            "--quiet",
            "--device",
            device,
        ]
        runs = alternate({"this": ROOT, "against": other}, rounds, command, tmp)
    for name, v in runs.items():
        assert all(out.count("\n") == len(prompts) for out, _ in v), f"{name}: not one record per prompt"
    seconds = {name: [t for _, t in v] for name, v in runs.items()}
    rate = {name: len(prompts) / statistics.median(v) for name, v in seconds.items()}
    return {
        "prompts": len(prompts),
        "rounds": rounds,
        "seconds": seconds,
        "prompts_per_second": rate,
        "ratio": rate["this"] / rate["against"],
        "note": "whole process: imports, loading and scoring",
    }


MC_SNIPPET = """
import statistics, sys, time, torch
from vtrans.data import DEFAULT_TEMPLATE, load_split, render_prompt
from vtrans.estimators import mc_dropout
try:
    from vtrans.backbone.loading import Backbone
    from vtrans.backbone.tokens import encode
except ImportError:  # a revision from before the layout by layer (vtrans.loading, vtrans.tokens)
    from vtrans.tokens import encode
    try:
        from vtrans.loading import Backbone
    except ImportError:  # a revision from before vtrans.loading
        from vtrans.backbones import Backbone
model_name, device, batch, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
backbone = Backbone(model_name, attn_implementation="sdpa").to(device)
model, tok = backbone.model, backbone.tokenizer
prompts = [render_prompt(DEFAULT_TEMPLATE, it.prefix) for it in load_split("builtin", "test")[:batch]]
with torch.no_grad():
    first = model(**tok(prompts, return_tensors="pt", padding=True).to(device)).logits[:, -1].argmax(-1).tolist()
enc = encode(tok, prompts, [[t] for t in first], device)
def sync():
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
def forward():
    with torch.no_grad():
        model(**enc.inputs)
def passes():
    mc_dropout.sample_logits(model, enc, passes=16, p=0.1)
seconds = {"forward": [], "passes": []}
forward(); passes()
for _ in range(rounds):
    for name, fn in (("forward", forward), ("passes", passes)):
        sync(); t = time.perf_counter(); fn(); sync(); seconds[name].append(time.perf_counter() - t)
med = {k: statistics.median(v) for k, v in seconds.items()}
print(med["passes"], med["passes"] / (16 * med["forward"]))
"""


def mc_dropout_speed(other: Path, model: str, batch: int, rounds: int, device: str) -> dict:
    """The 16 dropout passes of ``mc_dropout.sample_logits`` (the same call in both trees), this tree vs ``other``.

    Each tree times the passes and a plain forward interleaved in one process; the processes
    alternate between the trees. Reported: the median of each tree's passes/(16 forwards).
    """
    command = [sys.executable, "-c", MC_SNIPPET, model, device, str(batch), str(rounds)]
    with tempfile.TemporaryDirectory() as tmp:
        runs = alternate({"this": ROOT, "against": other}, 2, command, tmp)
    parsed = {
        name: [tuple(map(float, out.strip().splitlines()[-1].split())) for out, _ in v]
        for name, v in runs.items()
    }
    ratio = {name: statistics.median(r for _, r in v) for name, v in parsed.items()}
    return {
        "rounds_per_process": rounds,
        "processes_per_tree": 2,
        "seconds": {name: [s for s, _ in v] for name, v in parsed.items()},
        "x_16_forwards": ratio,
        "this_over_against": ratio["this"] / ratio["against"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip-load", action="store_true", help="skip the fresh-process load timing")
    parser.add_argument("--ckpt", default=None, help="a checkpoint of --model, for the vtrans score row")
    parser.add_argument(
        "--against",
        "--score-against",
        default=None,
        metavar="REV",
        help="git revision to compare vtrans score (needs --ckpt) and the MC dropout passes with",
    )
    parser.add_argument("--score-lines", type=int, default=128, help="prompts scored per vtrans score run")
    parser.add_argument("--score-rounds", type=int, default=3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    backbone = Backbone(args.model, dtype=args.dtype, attn_implementation="sdpa").to(device)
    model, tok = backbone.model, backbone.tokenizer
    lm = LatentLM(backbone, d_z=16, prior="conditional").to(device)
    module = lm.model  # what scoring reads
    torch.nn.init.normal_(module.latent.proj.weight, std=0.02)  # a latent that does something

    items = load_split("builtin", "test")[: args.batch_size]
    prompts = [render_prompt(DEFAULT_TEMPLATE, it.prefix) for it in items]
    batch = {"prompt": prompts, "target": [it.target for it in items]}
    config = EstimatorConfig(batch_size=args.batch_size, samples=32, passes=16)
    runner = Runner(backbone, module, config, progress=False)
    completions = runner.complete(prompts)
    enc = encode(tok, prompts, [[c.first_token] for c in completions], device)  # scored position + ŷ
    forward_mc = run_forward(model, enc)
    context = context_for(model, config, module, len(prompts))

    finetune_model = Backbone(args.model, dtype=args.dtype, attn_implementation="sdpa").model.to(device)
    finetune_model.requires_grad_(True).train()
    for m in finetune_model.modules():  # same arithmetic as the frozen model: no dropout
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    finetune_opt = torch.optim.AdamW(finetune_model.parameters(), lr=1e-6)
    ft_enc = module.encode(batch["prompt"], module.target_ids(batch["target"]))
    lm.log = lambda *a, **k: None  # no trainer attached
    elbo_opt = lm.configure_optimizers()

    def forward():
        with torch.no_grad():
            model(**enc.inputs)

    def single_pass():
        runner.scores(prompts, completions, SINGLE_PASS)

    def latent_mi():
        runner.scores(prompts, completions, ["latent_mi", "latent_nll"])

    def mc16():
        mc_dropout.FAMILY.read(forward_mc, context)

    def elbo_step():
        lm.train()
        elbo_opt.zero_grad()
        lm._shared_step(batch, "train").backward()
        elbo_opt.step()

    def finetune_step():
        finetune_opt.zero_grad()
        out = finetune_model(
            input_ids=ft_enc.input_ids, attention_mask=ft_enc.attention_mask, position_ids=ft_enc.position_ids
        )
        n = ft_enc.targets.shape[1]
        logits = out.logits[:, -n - 1 : -1].float()
        loss = torch.nn.functional.cross_entropy(
            logits[ft_enc.target_mask], ft_enc.targets[ft_enc.target_mask]
        )
        loss.backward()
        finetune_opt.step()

    paths = {
        "forward": forward,
        "single_pass": single_pass,
        "latent_mi_S32": latent_mi,
        "mc_dropout_T16": mc16,
        "elbo_step": elbo_step,
        "finetune_step": finetune_step,
    }
    for fn in paths.values():  # warm-up
        fn()
    seconds = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, fn in paths.items():
            seconds[name].append(timed(fn, device))
    med = {name: statistics.median(v) for name, v in seconds.items()}
    ratios = {
        "single_pass": med["single_pass"] / med["forward"],
        "latent_mi_S32": med["latent_mi_S32"] / med["forward"],
        "mc_dropout_T16": med["mc_dropout_T16"] / (16 * med["forward"]),
        "elbo_step": med["elbo_step"] / med["finetune_step"],
    }
    result = {
        "model": args.model,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "batch_size": args.batch_size,
        "seq_len": int(enc.input_ids.shape[1]),
        "rounds": args.rounds,
        "median_seconds": med,
        "ratios": ratios,
        "units": {
            "single_pass": "x one forward",
            "latent_mi_S32": "x one forward",
            "mc_dropout_T16": "x 16 forwards",
            "elbo_step": "x one full fine-tuning step",
        },
        "targets": TARGETS,
        "met": {k: ratios[k] <= TARGETS[k] for k in TARGETS},
    }
    if not args.skip_load:
        result["load_seconds_after_first"] = load_seconds(args.model)
        result["met"]["load"] = result["load_seconds_after_first"]["load"] <= 5.0
    if args.against:
        with checkout(args.against) as other:
            result["against"] = args.against
            result["mc_dropout_T16_against"] = mc_dropout_speed(
                other, args.model, args.batch_size, args.rounds, args.device
            )
            if args.ckpt:
                result["score"] = score_speed(
                    other, args.ckpt, args.score_lines, args.score_rounds, args.device
                )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
