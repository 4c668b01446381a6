"""Where the time of the estimator paths goes: torch.profiler's top operators for each.

    python benchmarks/profile_paths.py                 # SmolLM2, a batch of 32 built-in idioms
    python benchmarks/profile_paths.py --model tiny-gpt2 --top 8
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from vtrans.backbone.loading import Backbone
from vtrans.backbone.tokens import encode, target_ids
from vtrans.data import DEFAULT_TEMPLATE, load_split, render_prompt
from vtrans.estimators import latent as latent_estimators
from vtrans.estimators import lens, mc_dropout
from vtrans.latent.model import LatentModel


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args(argv)

    backbone = Backbone(args.model, attn_implementation="sdpa")
    model, tok = backbone.model, backbone.tokenizer
    module = LatentModel(backbone, d_z=16)
    torch.nn.init.normal_(module.latent.proj.weight, std=0.02)
    items = load_split("builtin", "test")[: args.batch_size]
    prompts = [render_prompt(DEFAULT_TEMPLATE, it.prefix) for it in items]
    enc = encode(tok, prompts, [g[:1] for g in target_ids(tok, [it.target for it in items])])
    paths = {
        "forward": lambda: model(input_ids=enc.input_ids, attention_mask=enc.attention_mask),
        "lens": lambda: lens.scores(model, enc),
        "latent_mi_S32": lambda: latent_estimators.scores(module, enc, samples=32),
        "mc_dropout_T16": lambda: mc_dropout.scores(model, enc, passes=16, p=0.1),
    }
    for name, fn in paths.items():
        with torch.no_grad():
            fn()  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
        print(f"\n=== {name} ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
