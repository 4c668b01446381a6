"""What the whole answer's scores cost at answers of K = 1, 2 and 3 words, as ratios to one plain forward.

For each K the greedy answers of K words are made first (``answer_words``), then each path runs
on the same batch, interleaved round by round (a slow moment of a noisy machine hits every path
alike), and the ratio of medians to the unit is reported as JSON. The unit is one plain forward
over the prompts followed by ŷ (what every cost in ``benchmarks/RESULTS.md`` is a multiple of):

* ``forward_whole_answer``: one plain forward over the prompts followed by the whole answer;
* ``first_token``: ``msp`` and ``entropy`` (the shared forward over ŷ and its reads);
* ``sequence``: ``sequence_nll``, ``perplexity``, ``max_token_nll``, ``sequence_doubt``,
  ``mean_token_entropy`` (the shared forward over the whole answer and its reads, per-token values included);
* ``rauq``: the same forward in eager attention, keeping its weights, and ``rauq``;
* ``latent_answer_S32``: ``adapter_answer_nll``, ``latent_answer_nll`` and ``latent_answer_gap`` at
  S = 32, their shared forward included;
* ``latent_first_S32``: ``latent_mi`` and ``latent_nll`` at S = 32 (the first token's), for comparison.

    python benchmarks/answer_costs.py                       # the embedded SmolLM2, 32 built-in idioms
    python benchmarks/answer_costs.py --model tiny-gpt2 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vtrans.backbone.loading import Backbone
from vtrans.backbone.tokens import encode
from vtrans.config import EstimatorConfig
from vtrans.data import DEFAULT_TEMPLATE, load_split, render_prompt, with_answer_words
from vtrans.estimators.runner import Runner
from vtrans.latent.model import LatentModel

PATHS = {
    "first_token": ["msp", "entropy"],
    "sequence": ["sequence_nll", "perplexity", "max_token_nll", "sequence_doubt", "mean_token_entropy"],
    "rauq": ["rauq"],
    "latent_answer_S32": ["adapter_answer_nll", "latent_answer_nll", "latent_answer_gap"],
    "latent_first_S32": ["latent_mi", "latent_nll"],
}


def measure(backbone: Backbone, module, k: int, batch: int, rounds: int) -> dict:
    items, _ = with_answer_words(load_split("builtin", "test"), k)
    prompts = [render_prompt(DEFAULT_TEMPLATE, it.prefix) for it in items[:batch]]
    runner = Runner(backbone, module, EstimatorConfig(batch_size=batch, samples=32, answer_words=k), progress=False)
    completions = runner.complete(prompts)
    model, tok = backbone.model, backbone.tokenizer
    first = encode(tok, prompts, [[c.first_token] for c in completions])
    whole = encode(tok, prompts, [list(c.word_ids) for c in completions])

    def forward(enc):
        with torch.no_grad():
            model(**enc.inputs)

    paths = {
        "unit": lambda: forward(first),
        "forward_whole_answer": lambda: forward(whole),
        **{name: (lambda names=names: runner.scores(prompts, completions, names)) for name, names in PATHS.items()},
    }
    for fn in paths.values():  # warm-up
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    unit = statistics.median(seconds["unit"])
    tokens = [len(c.word_ids) for c in completions]
    return {
        "answer_tokens_mean": sum(tokens) / len(tokens),
        "unit_seconds": unit,
        **{name: statistics.median(s) / unit for name, s in seconds.items() if name != "unit"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ks", default="1,2,3")
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone = Backbone(args.model, attn_implementation="sdpa")
    module = LatentModel(backbone, d_z=16, prior="conditional").eval()
    torch.nn.init.normal_(module.latent.proj.weight, std=0.02)  # a latent that does something
    out = {
        "model": args.model,
        "batch": args.batch_size,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **{f"K={k}": measure(backbone, module, int(k), args.batch_size, args.rounds) for k in args.ks.split(",")},
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
