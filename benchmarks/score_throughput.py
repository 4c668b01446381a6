"""Throughput and peak memory of ``vtrans score --input FILE``, as a user runs it.

For each N in ``--lines``, N prompts are made from the built-in idioms (cycled, the default
template), written to a ``.txt`` file, and ``vtrans score --ckpt CKPT --input FILE --quiet``
runs in a fresh subprocess under ``/usr/bin/time -v`` (else ``resource.getrusage`` of the
child). Reported per N: wall time, prompts per second, seconds to the first record on stdout
(streaming), peak resident memory of the scoring process, and the records written.

    python benchmarks/score_throughput.py --ckpt checkpoints/tiny/last.ckpt --lines 1000 100000
    python benchmarks/score_throughput.py --ckpt checkpoints/smollm2/last.ckpt --lines 1000 --device cpu

Memory that stays flat from 1,000 to 100,000 lines is the sign that scoring streams.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vtrans.data import DEFAULT_TEMPLATE, load_idioms, render_prompt

TIME = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)


def write_prompts(path: Path, n: int) -> None:
    prompts = [render_prompt(DEFAULT_TEMPLATE, item.prefix) for item in load_idioms("builtin")]
    with path.open("w", encoding="utf-8") as f:
        for prompt in itertools.islice(itertools.cycle(prompts), n):
            f.write(prompt + "\n")


def _gnu_time(stderr: str) -> tuple[float | None, float | None]:
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", stderr)
    seconds = None
    if wall:
        seconds = 0.0
        for part in wall.group(1).split(":"):
            seconds = seconds * 60 + float(part)
    return (int(rss.group(1)) / 1024 if rss else None), seconds


def run(ckpt: str, n: int, args: argparse.Namespace, folder: Path) -> dict:
    path = folder / f"prompts-{n}.txt"
    write_prompts(path, n)
    command = [sys.executable, "-c", "from vtrans.cli import main; main()", "score", "--ckpt", ckpt]
    command += ["--input", str(path), "--quiet", "--batch_size", str(args.batch_size), "--device", args.device]
    if args.estimators:
        command += ["--estimators", args.estimators]
    gnu = TIME is not None and subprocess.run([TIME, "-v", "true"], capture_output=True).returncode == 0
    if gnu:
        command = [TIME, "-v", *command]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    first = None
    records = errors = 0
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            if first is None:
                first = time.perf_counter() - start
            records += 1
            errors += '"error"' in line and "error" in json.loads(line)
        stderr = proc.stderr.read()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"vtrans score failed (exit {proc.returncode}):\n{stderr[-2000:]}")
    if gnu:
        peak_mib, _ = _gnu_time(stderr)
        source = "/usr/bin/time -v"
    else:  # the largest child so far: exact for the first run, an upper bound after
        after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        peak_mib, source = max(after, before) / 1024, "getrusage(RUSAGE_CHILDREN)"
    return {
        "ckpt": ckpt,
        "lines": n,
        "records": records,
        "error_records": errors,
        "wall_s": round(wall, 2),
        "prompts_per_s": round(n / wall, 1),
        "first_record_s": None if first is None else round(first, 2),
        "peak_rss_mib": None if peak_mib is None else round(peak_mib, 1),
        "memory_from": source,
        "batch_size": args.batch_size,
        "estimators": args.estimators or "default (single-pass + latent)",
        "device": args.device,
        "threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="checkpoints/tiny/last.ckpt")
    parser.add_argument("--lines", type=int, nargs="+", default=[1000])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--estimators", default=None, help="comma-separated subset (default: vtrans score's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="also append the results as JSON lines to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.lines:
            result = run(args.ckpt, n, args, Path(tmp))
            print(json.dumps(result), flush=True)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
