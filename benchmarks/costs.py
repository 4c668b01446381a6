"""Cost of each estimator and of a training step, as ratios to a plain forward, measured side by side.

Every path runs on the same batch, interleaved round by round (so a slow moment of a noisy
machine hits all paths alike), and the ratio of medians is reported as JSON:

    python benchmarks/costs.py                      # the embedded SmolLM2, batch of 32 built-in idioms
    python benchmarks/costs.py --model tiny-gpt2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from vtrans.data import DEFAULT_TEMPLATE, load_split, render_prompt
from vtrans.estimators import latent as latent_estimators
from vtrans.estimators import lens, mc_dropout
from vtrans.loading import Backbone
from vtrans.module import LatentLM
from vtrans.tokens import encode, target_ids

TARGETS = {
    "lens": 1.10,  # lens_ce + the whole trajectory, x one forward
    "latent_mi_S32": 1.5,  # x one forward
    "mc_dropout_T16": 1.1,  # x 16 forwards
    "elbo_step": 0.6,  # x one full fine-tuning step
}


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
        "import time; t0 = time.perf_counter(); from vtrans.loading import Backbone; t1 = time.perf_counter(); "
        f"Backbone({model!r}); t2 = time.perf_counter(); print(t1 - t0, t2 - t1)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)  # fills the cache
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    imports, load = map(float, out.stdout.strip().splitlines()[-1].split())
    return {"imports": imports, "load": load, "total": imports + load}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip-load", action="store_true", help="skip the fresh-process load timing")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    backbone = Backbone(args.model, dtype=args.dtype, attn_implementation="sdpa").to(device)
    model, tok = backbone.model, backbone.tokenizer
    module = LatentLM(backbone, d_z=16, prior="conditional").to(device)
    torch.nn.init.normal_(module.latent.proj.weight, std=0.02)  # a latent that does something

    items = load_split("builtin", "test")[: args.batch_size]
    prompts = [render_prompt(DEFAULT_TEMPLATE, it.prefix) for it in items]
    gold = target_ids(tok, [it.target for it in items])
    enc = encode(tok, prompts, [g[:1] for g in gold], device)  # scored position + one token
    batch = {"prompt": prompts, "target": [it.target for it in items]}

    finetune_model = Backbone(args.model, dtype=args.dtype, attn_implementation="sdpa").model.to(device)
    finetune_model.requires_grad_(True).train()
    for m in finetune_model.modules():  # same arithmetic as the frozen model: no dropout
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    finetune_opt = torch.optim.AdamW(finetune_model.parameters(), lr=1e-6)
    ft_enc = module.encode(batch["prompt"], module.target_ids(batch["target"]))
    module.log = lambda *a, **k: None  # no trainer attached
    elbo_opt = module.configure_optimizers()

    def forward():
        with torch.no_grad():
            model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=enc.position_ids)

    def lens_path():
        lens.scores(model, enc)

    def latent_mi():
        latent_estimators.scores(module, enc, samples=32)

    def mc16():
        mc_dropout.scores(model, enc, passes=16, p=0.1)

    def elbo_step():
        module.train()
        elbo_opt.zero_grad()
        module._shared_step(batch, "train").backward()
        elbo_opt.step()

    def finetune_step():
        finetune_opt.zero_grad()
        out = finetune_model(
            input_ids=ft_enc.input_ids, attention_mask=ft_enc.attention_mask, position_ids=ft_enc.position_ids
        )
        n = ft_enc.targets.shape[1]
        logits = out.logits[:, -n - 1 : -1].float()
        loss = torch.nn.functional.cross_entropy(logits[ft_enc.target_mask], ft_enc.targets[ft_enc.target_mask])
        loss.backward()
        finetune_opt.step()

    paths = {
        "forward": forward,
        "lens": lens_path,
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
        "lens": med["lens"] / med["forward"],
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
            "lens": "x one forward",
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
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
