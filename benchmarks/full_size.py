"""What a full-size model costs, on random weights: every command, with its peak memory, step time and tokens per second.

For a model name (``random:gpt2-xl``, or any model vtrans loads) and a dtype, in one process:

1. ``build``: the backbone (``vtrans.backbone.loading.Backbone``);
2. ``train``: the latent trained a few steps the way ``train.py`` trains it (``vtrans.latent.training``,
   the settings of ``--config`` on this backbone, the latent after its middle block): the first
   epoch fills the frozen cache item by item (the ``cold`` steps), the later ones read it
   (``warm``); the cache's bytes per item are measured and scaled to the 724 built-in idioms;
3. ``evaluate``: ``vtrans.evaluation.evaluate.evaluate`` on 8 built-in test items with every single-pass
   estimator, ``latent_mi`` and ``latent_nll``, the latent saved with ``save_pretrained`` and loaded
   back onto the same backbone;
4. ``score``: ``vtrans.scoring.scorer.Scorer`` with its default estimators on built-in idioms' beginnings.

Each phase's peak memory is its own: on a CPU the peak resident set is reset between phases and
steps (``/proc/self/clear_refs``, Linux, after glibc's ``malloc_trim`` has handed back what the
allocator held free, so that its reuse shows) and read as ``VmHWM``; on a GPU ``torch.cuda``'s peak of
allocated memory is reset and read. Then the memory plan for one GPU (``--gpu_gib``, default 80):
what the backbone in bf16, the latent's training state, the frozen cache of the 724 idioms and
a reserve leave, and the training batch that fits in it at the measured memory per item
(benchmarks/RESULTS.md, "Full size on random weights", gives the formula).

    python benchmarks/full_size.py --model random:gpt2-xl --dtype bfloat16 --out benchmarks/full_size/gpt2-xl-bf16.json
    python benchmarks/full_size.py --model random:gpt2-xl --dtype float32 --out benchmarks/full_size/gpt2-xl-fp32.json
    python benchmarks/full_size.py --model random:gpt2 --dtype float32     # a minute or two on 2 cores

Nothing here assumes trained weights: on a ``random:`` model the completions are noise, and the
evaluation's accuracy and AUROCs are not results; they are not written here (the evaluation's own
results.json, in a temporary folder, marks them so).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
IDIOMS = 724  # the built-in set: what the frozen cache holds in a cross-fitted run
GIB = 1 << 30


# --------------------------------------------------------------------------- memory


class Memory:
    """Peak memory of a phase: the resident set on a CPU (Linux), allocated memory on a GPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.resettable = self.cuda or _clear_refs()

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:  # what the allocator holds free goes back first, so that reusing it shows as a rise
            _malloc_trim()
            _clear_refs()

    def now(self) -> int:
        """Bytes in use now."""
        return torch.cuda.memory_allocated() if self.cuda else _status("VmRSS")

    def peak(self) -> int:
        """Bytes at the peak since the last :meth:`reset` (since the process started where it cannot be reset)."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _status("VmHWM")

    @property
    def what(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated, reset per phase"
        if self.resettable:
            return "peak resident set (VmHWM), reset per phase"
        return "peak resident set (VmHWM) of the process so far: not reset per phase on this system"


def _status(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), flags=re.M)
    return int(match.group(1)) * 1024 if match else 0


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc: free heap pages back to the system
    except (OSError, AttributeError):
        pass


def _clear_refs() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def mib(n: float) -> float:
    return round(n / (1 << 20), 1)


# --------------------------------------------------------------------------- phases


def single_pass_and_latent_mi() -> list[str]:
    """Every single-pass estimator (no extra passes, nothing fitted, no ensemble, Laplace posterior or
    refit spread), then ``latent_mi``."""
    from vtrans.estimators import latent, registry

    single = [
        name
        for family in registry.FAMILIES
        if family.read is not None and not family.extra_passes
        for name in family.names
        if family.posterior is None and "ensemble" not in family.needs_of(name)
    ]
    return single + list(latent.SAMPLES.names)


def build(args, memory: Memory) -> tuple[object, dict]:
    from vtrans.backbone.loading import Backbone

    memory.reset()
    start = time.perf_counter()
    backbone = Backbone(args.model, dtype=args.dtype, attn_implementation=args.attn).to(args.device)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in backbone.model.parameters())
    weights = sum(p.numel() * p.element_size() for p in backbone.model.parameters())
    return backbone, {
        "seconds": round(seconds, 2),
        "peak_mib": mib(memory.peak()),
        "after_mib": mib(memory.now()),
        "parameters": params,
        "weights_mib": mib(weights),
        "n_layers": backbone.n_layers,
        "d_model": backbone.d_model,
        "vocab": backbone.model.get_output_embeddings().weight.shape[0],
        "random_weights": backbone.random_weights,
        "label": backbone.label,
    }


def train(args, backbone, memory: Memory) -> tuple[object, dict]:
    import lightning as L

    from vtrans.data import load_split
    from vtrans.latent import training

    split = load_split("builtin", "train")
    items = split[: args.train_items]
    overrides = {
        "model.backbone.init_args.name": backbone.name,
        "model.backbone.init_args.dtype": args.dtype,
        "model.backbone.init_args.attn_implementation": args.attn,
        "model.layer": backbone.n_layers // 2,
        "data.batch_size": args.batch_size,
        "trainer.accelerator": "gpu" if args.device.startswith("cuda") else "cpu",
        "trainer.devices": 1,
        "trainer.precision": "bf16-mixed" if args.dtype == "bfloat16" else "32-true",
        "trainer.max_epochs": args.epochs,
        **training.HEADLESS,
    }
    built = training.build(args.config, overrides, items=items, backbone=backbone)
    tokenizer = backbone.tokenizer

    class Clock(L.Callback):
        """Each step's seconds, tokens (prompt and target) and peak memory."""

        def __init__(self) -> None:
            self.steps: list[dict] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            memory.reset()
            self.before, self.start = memory.now(), time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            peak = memory.peak()
            seconds = time.perf_counter() - self.start
            tokens = sum(len(ids) for ids in tokenizer(list(batch["prompt"]))["input_ids"])
            tokens += sum(len(ids) for ids in tokenizer([" " + t for t in batch["target"]], add_special_tokens=False)["input_ids"])
            self.steps.append(
                {"epoch": trainer.current_epoch, "items": len(batch["prompt"]), "tokens": tokens, "seconds": seconds,
                 "peak_above_start": peak - self.before, "peak": peak}
            )

    clock = Clock()
    built.trainer.callbacks.append(clock)
    latent_params = sum(p.numel() for p in built.module.model.latent.parameters())
    memory.reset()
    start = time.perf_counter()
    training.fit(built)
    seconds = time.perf_counter() - start
    peak = memory.peak()
    cache = built.module.frozen_cache
    cache_bytes = sum(
        s.h.numel() * s.h.element_size() + sum(t.numel() * t.element_size() for kv in s.kv.values() for t in kv)
        for s in cache.items.values()
    )
    per_item = cache_bytes / max(len(cache), 1)
    cold = [s for s in clock.steps if s["epoch"] == 0]
    warm = [s for s in clock.steps if s["epoch"] > 0]

    def summary(steps: list[dict]) -> dict | None:
        if not steps:
            return None
        seconds = sorted(s["seconds"] for s in steps)
        median = seconds[len(seconds) // 2]
        return {
            "steps": len(steps),
            "step_seconds_median": round(median, 3),
            "tokens_per_s": round(sum(s["tokens"] for s in steps) / sum(s["seconds"] for s in steps), 1),
            "peak_mib": mib(max(s["peak"] for s in steps)),
            "peak_above_step_start_mib": mib(max(s["peak_above_start"] for s in steps)),
            "peak_above_step_start_per_item_mib": mib(max(s["peak_above_start"] / s["items"] for s in steps)),
        }

    return built.module.model, {
        "config": os.path.relpath(args.config, REPO),
        "layer": built.module.model.layer,
        "items": len(items),
        "training_split_items": len(split),
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "precision": overrides["trainer.precision"],
        "seconds": round(seconds, 2),
        "peak_mib": mib(peak),
        "cold": summary(cold),  # the first epoch: the frozen cache filled item by item
        "warm": summary(warm),  # later epochs: the cache read
        "latent_parameters": latent_params,
        "frozen_cache_items": len(cache),
        "frozen_cache_per_item_kib": round(per_item / 1024, 1),
        "frozen_cache_724_idioms_mib": mib(per_item * IDIOMS),
        "frozen_cache_dtype": str(next(iter(cache.items.values())).h.dtype).removeprefix("torch.") if len(cache) else None,
    }


def evaluate(args, backbone, folder: Path, memory: Memory) -> dict:
    import matplotlib.pyplot  # noqa: F401  (the report's plots: imported before the phase's memory is measured)

    from vtrans.config import EvalConfig
    from vtrans.evaluation.evaluate import evaluate as run

    names = single_pass_and_latent_mi()
    config = EvalConfig(data="builtin", split="test", max_items=args.eval_items, estimators=names, n_boot=100,
                        batch_size=args.eval_items)
    memory.reset()
    before = memory.now()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        results = run(config, out, ckpt=str(folder), backbone=backbone, device=args.device, progress=False)
        rows = [json.loads(line) for line in (Path(out) / "scores.jsonl").read_text().splitlines()]
    seconds = time.perf_counter() - start
    peak = memory.peak()
    tokens = _tokens(backbone.tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows])
    return {
        "items": results["n"],
        "estimators": list(results["estimators"]),
        "dropped": results.get("dropped", {}),
        "random_weights": results.get("random_weights", False),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "family_seconds": {k: round(v, 3) for k, v in results["seconds"].items()},
        "peak_mib": mib(peak),
        "peak_above_start_mib": mib(peak - before),
    }


def score(args, backbone, folder: Path, memory: Memory) -> dict:
    from vtrans.data import load_split
    from vtrans.latent.model import LatentModel
    from vtrans.scoring.scorer import Scorer

    prompts = [item.prefix for item in load_split("builtin", "test")[: args.score_prompts]]
    module = LatentModel.from_pretrained(folder, backbone=backbone).eval()
    scorer = Scorer(module, template=module.template, quiet=True, batch_size=args.batch_size)
    memory.reset()
    before = memory.now()
    start = time.perf_counter()
    records = list(scorer.score(prompts))
    seconds = time.perf_counter() - start
    peak = memory.peak()
    rendered = [scorer.template.format(prefix=p) if scorer.template else p for p in prompts]
    tokens = _tokens(backbone.tokenizer, rendered, [r.get("completion", "") for r in records])
    return {
        "prompts": len(prompts),
        "estimators": scorer.names,
        "errors": sum("error" in r for r in records),
        "every_record_says_random_weights": all(r.get("random_weights") for r in records) if backbone.random_weights else None,
        "seconds": round(seconds, 2),
        "prompts_per_s": round(len(prompts) / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "peak_mib": mib(peak),
        "peak_above_start_mib": mib(peak - before),
    }


def _tokens(tokenizer, prompts: list[str], completions: list[str]) -> int:
    """Prompt tokens and completion tokens, as the model read and wrote them."""
    n = sum(len(ids) for ids in tokenizer(prompts)["input_ids"])
    return n + sum(len(ids) for ids in tokenizer([" " + c for c in completions], add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------- the plan


def memory_plan(dtype: str, built: dict, trained: dict, evaluated: dict, gpu_gib: float, reserve_gib: float) -> dict:
    """One GPU of ``gpu_gib``: what is left for the training batch, and the batch that fits.

    free = G − reserve − W_bf16 − S_latent − C_724;  B_train = ⌊free / a_train⌋;  B_eval = ⌊free / a_eval⌋, where
    W_bf16 = 2 bytes × parameters (the backbone in bf16), S_latent = 16 bytes × the latent's parameters
    (fp32 weight, gradient and AdamW's two moments under bf16-mixed), C_724 = the frozen cache's bytes
    per item (measured) × 724, a_train = the most a warm training step's memory rose above its start,
    per item (measured), a_eval = the evaluation's rise per item (measured). What was measured in
    float32 is halved (the plan's backbone runs in bf16). On a CPU the rises are of the resident
    set: an estimate of what a GPU allocates.
    """
    to_bf16 = 0.5 if dtype == "float32" else 1.0
    weights = 2 * built["parameters"]
    latent = 16 * trained["latent_parameters"]
    cache = trained["frozen_cache_per_item_kib"] * 1024 * IDIOMS * to_bf16
    warm = trained["warm"] or trained["cold"]
    a_train = warm["peak_above_step_start_per_item_mib"] * (1 << 20) * to_bf16
    a_eval = evaluated["peak_above_start_mib"] * (1 << 20) / max(evaluated["items"], 1) * to_bf16
    free = gpu_gib * GIB - reserve_gib * GIB - weights - latent - cache
    train_batch = math.floor(free / a_train) if a_train > 0 else None
    return {
        "gpu_gib": gpu_gib,
        "reserve_gib": reserve_gib,
        "backbone_bf16_gib": round(weights / GIB, 2),
        "latent_training_state_mib": mib(latent),
        "frozen_cache_724_bf16_gib": round(cache / GIB, 3),
        "free_for_batches_gib": round(free / GIB, 2),
        "train_per_item_mib": mib(a_train),
        "eval_per_item_mib": mib(a_eval),
        "train_batch_that_fits": train_batch,
        # a batch past the training split's size is an epoch in one step: the split, not the memory, is then the limit
        "training_split_items": trained["training_split_items"],
        "an_epoch_fits_in_one_batch": train_batch is not None and train_batch >= trained["training_split_items"],
        "eval_batch_that_fits": math.floor(free / a_eval) if a_eval > 0 else None,
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    from vtrans.data import DEFAULT_TEMPLATE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:gpt2-xl")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--attn", default="sdpa", choices=["eager", "sdpa"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", default=str(REPO / "configs" / "gpt2-xl-random.yaml"),
                        help="the training YAML whose latent and optimiser settings train (its backbone replaced)")
    parser.add_argument("--train_items", type=int, default=64, help="built-in training idioms: batches of an epoch")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="the first fills the frozen cache; the others read it")
    parser.add_argument("--eval_items", type=int, default=8)
    parser.add_argument("--score_prompts", type=int, default=32)
    parser.add_argument("--gpu_gib", type=float, default=80.0)
    parser.add_argument("--reserve_gib", type=float, default=4.0, help="the CUDA context and the allocator's slack")
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args()

    memory = Memory(args.device)
    result = {
        "model": args.model,
        "dtype": args.dtype,
        "attn_implementation": args.attn,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "machine": platform.processor() or platform.machine(),
        "memory": memory.what,
        "torch": torch.__version__,
    }
    start = time.perf_counter()
    backbone, result["build"] = build(args, memory)
    print(json.dumps({"build": result["build"]}), flush=True)
    module, result["train"] = train(args, backbone, memory)
    print(json.dumps({"train": result["train"]}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "latent"
        module.save_pretrained(folder, template=DEFAULT_TEMPLATE)  # the template the config's data trained with
        del module
        result["evaluate"] = evaluate(args, backbone, folder, memory)
        print(json.dumps({"evaluate": result["evaluate"]}), flush=True)
        result["score"] = score(args, backbone, folder, memory)
        print(json.dumps({"score": result["score"]}), flush=True)
    result["plan"] = memory_plan(args.dtype, result["build"], result["train"], result["evaluate"], args.gpu_gib, args.reserve_gib)
    result["seconds_total"] = round(time.perf_counter() - start, 1)
    result["peak_mib"] = max(result[phase]["peak_mib"] for phase in ("build", "train", "evaluate", "score"))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
