"""The registry's rule that ``aggregate=mean|max`` refuses the estimators that read the first token
only, visibly, on a case constructed to fail without it."""

from __future__ import annotations

import math

import pytest

from vtrans.cli import main
from vtrans.config import EvalConfig
from vtrans.evaluation.evaluate import evaluate
from vtrans.scoring.scorer import Scorer

PROMPT = "Complete the idiom: the early bird catches the"
FIRST_TOKEN_ONLY = ["attention_entropy", "mc_dropout_var", "mc_dropout_entropy", "mc_dropout_mi", "latent_mi"]


# --------------------------------------------------------------------------- 3. aggregate=mean|max


@pytest.mark.parametrize("how", ["mean", "max"])
def test_aggregate_refuses_the_first_token_only_estimators(random_latent, how, tmp_path, monkeypatch):
    from vtrans.latent import checkpoint

    monkeypatch.setattr(checkpoint, "read", lambda path: {})  # no file to read
    monkeypatch.setattr(checkpoint, "load", lambda path, device="cpu", backbone=None, ckpt=None: random_latent)
    monkeypatch.setattr(checkpoint, "trained_idiom_hashes", lambda ckpt: None)
    names = ["msp", *FIRST_TOKEN_ONLY, "posterior_var", "latent_kl"]
    config = EvalConfig(data="builtin", max_items=4, estimators=names, aggregate=how, passes=2, samples=2, n_boot=100)
    results = evaluate(config, tmp_path / "run", ckpt="random.ckpt", progress=False)
    assert list(results["estimators"]) == ["msp", "posterior_var", "latent_kl"]
    assert set(results["dropped"]) == set(FIRST_TOKEN_ONLY)
    assert all("first completion token only" in why and "--aggregate first" in why for why in results["dropped"].values())


def test_aggregate_refusal_is_a_warning_on_the_command_line(tmp_path, capsys):
    main(["evaluate", "--model", "tiny-gpt2", "--data", "builtin", "--max_items", "4", "--n_boot", "100", "--passes", "2",
          "--aggregate", "mean", "--estimators", "msp,attention_entropy,mc_dropout_var", "--out", str(tmp_path / "run")])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: not run")]
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: not run: attention_entropy, mc_dropout_var: reads the first completion token only")


def test_scorer_keeps_the_first_token_and_runs_them(random_latent):
    """``vtrans score`` has no aggregate option: it reads the first token, so nothing is refused."""
    scorer = Scorer(random_latent, estimators=["msp", "attention_entropy", "latent_mi"], samples=2, quiet=True)
    assert scorer.config.aggregate == "first"
    [record] = scorer.score([PROMPT])
    assert all(math.isfinite(v) for v in record["scores"].values()) and len(record["scores"]) == 3
