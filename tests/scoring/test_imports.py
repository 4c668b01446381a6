"""Scoring starts fast: ``vtrans score``, ``Scorer.from_checkpoint`` and ``Scorer.from_pretrained``
(on a model in memory) import none of the libraries that only training, evaluation or the report
need (their imports take seconds).

Each case scores the tiny checkpoint in a fresh interpreter and lists what it imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import offline_env

HEAVY = ("lightning", "pytorch_lightning", "torchmetrics", "pyro", "matplotlib", "sklearn", "tensorboard")

REPORT = """
imported = {name.split(".")[0] for name in sys.modules}
scipy = sorted(name for name in sys.modules if name.startswith("scipy."))
print(json.dumps({"heavy": sorted(imported & set(HEAVY)), "scipy": scipy}), file=sys.stderr)
"""

RUNS = {
    "cli": """
        from vtrans.cli import main
        main(["score", "--ckpt", CKPT, "--quiet", "--device", "cpu", "--batch_size", "2", "--samples", "2", PROMPT, "hold your"])
    """,
    "api": """
        from vtrans.scoring.scorer import Scorer
        scorer = Scorer.from_checkpoint(CKPT, device="cpu", quiet=True, batch_size=2, samples=2)
        for record in scorer.score([PROMPT, "hold your"]):
            print(json.dumps(record))
    """,
    "pretrained": """
        from vtrans import Backbone, Scorer
        from transformers import AutoModelForCausalLM, AutoTokenizer
        backbone = Backbone.from_model(AutoModelForCausalLM.from_pretrained(MODEL), AutoTokenizer.from_pretrained(MODEL))
        scorer = Scorer.from_pretrained(FOLDER, backbone=backbone, quiet=True, batch_size=2, samples=2)
        for record in scorer.score([PROMPT, "hold your"]):
            print(json.dumps(record))
    """,
}

# transformers' model code imports scipy.optimize itself when scipy is installed: that much is
# the backbone's, not ours
TRANSFORMERS_SCIPY = """
import json, sys
import transformers.modeling_utils
print(json.dumps(sorted(name for name in sys.modules if name.startswith("scipy."))))
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=offline_env()
    )


@pytest.fixture(scope="module")
def pretrained(tiny_ckpt, tmp_path_factory) -> tuple[str, str]:
    """The tiny checkpoint's latent saved with ``save_pretrained``, and its base model as a folder of its own."""
    from vtrans.latent import checkpoint

    root = tmp_path_factory.mktemp("pretrained")
    module = checkpoint.load(tiny_ckpt)
    module.backbone.model.save_pretrained(root / "model")
    module.backbone.tokenizer.save_pretrained(root / "model")
    return str(module.save_pretrained(root / "latent")), str(root / "model")


@pytest.mark.parametrize("how", RUNS)
def test_scoring_imports_no_training_or_report_library(tiny_ckpt, pretrained, how) -> None:
    code = f"import json, sys\nHEAVY = {HEAVY!r}\nCKPT = {str(tiny_ckpt)!r}\nPROMPT = 'Complete the idiom: the early bird catches the'\n"
    code += f"FOLDER, MODEL = {pretrained!r}\n"
    proc = run(code + textwrap.dedent(RUNS[how]) + REPORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stderr.strip().splitlines()[-1])
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(records) == 2 and all("scores" in r for r in records), proc.stdout
    assert seen["heavy"] == [], f"{how} scoring imported {seen['heavy']}"
    backbone = run(TRANSFORMERS_SCIPY)
    assert backbone.returncode == 0, backbone.stderr[-3000:]
    extra = sorted(set(seen["scipy"]) - set(json.loads(backbone.stdout)))
    assert extra == [], f"{how} scoring imported scipy modules beyond transformers' own: {extra[:5]}"
