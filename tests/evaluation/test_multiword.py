"""Answers of two words end to end: generation, labels, ``evaluate`` and ``crossval`` at K = 2.

A random tiny model almost never completes an idiom, so the data file ends half of its idioms
with the tiny model's own greedy two-word answer: both classes exist.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vtrans.backbone.generate import complete, is_correct
from vtrans.backbone.loading import Backbone
from vtrans.cli import main
from vtrans.data import (
    DEFAULT_TEMPLATE,
    first_words,
    load_idioms,
    render_prompt,
    split_idiom,
    with_answer_words,
)
from vtrans.latent.datamodule import IdiomDataModule

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
K = 2


@pytest.fixture(scope="module")
def gpt2() -> Backbone:
    return Backbone("tiny-gpt2")


@pytest.fixture(scope="module")
def two_word_file(gpt2, tmp_path_factory) -> tuple[Path, dict[str, bool]]:
    """24 idioms of at least four words; every other one ends with the tiny model's own greedy
    two-word answer (correct), the others with their own last two words (wrong)."""
    items, _ = with_answer_words(load_idioms("builtin")[:200], K)
    prompts = [render_prompt(DEFAULT_TEMPLATE, it.prefix) for it in items]
    answers = [c.word for c in complete(gpt2.model, gpt2.tokenizer, prompts, answer_words=K)]
    lines: dict[str, bool] = {}
    for item, answer in zip(items, answers, strict=True):
        own, right = f"{item.prefix} {answer}", sum(lines.values())
        if len(answer.split()) == K and right < 12 and right <= len(lines) - right and split_idiom(own, K).target == answer:
            lines[own] = True
        elif answer != first_words(item.target, K) and len(lines) - right < 12:
            lines[item.idiom] = False
        if len(lines) == 24:
            break
    assert len(lines) == 24 and sum(lines.values()) == 12
    path = tmp_path_factory.mktemp("k2") / "two.txt"
    path.write_text("\n".join(lines) + "\n")
    return path, lines


def test_generation_stops_once_the_kth_word_is_final_with_the_answer_of_a_full_length_call(gpt2):
    prompts = [render_prompt(DEFAULT_TEMPLATE, it.prefix) for it in load_idioms("builtin")[:12]]
    full = complete(gpt2.model, gpt2.tokenizer, prompts, max_new_tokens=6, answer_words=K)
    short = complete(gpt2.model, gpt2.tokenizer, prompts, max_new_tokens=6, answer_words=K, words_only=True)
    assert [c.word for c in short] == [c.word for c in full]
    assert any(len(c.word.split()) == K for c in full)  # two-word answers do occur
    tok = gpt2.tokenizer
    for c in full:
        assert c.word == first_words(c.text, K)
        # the answer's tokens: the fewest whose text holds the whole answer
        assert first_words(tok.decode(list(c.word_ids)), K) == c.word
        if len(c.word_ids) > 1 and c.word:
            assert first_words(tok.decode(list(c.word_ids[:-1])), K) != c.word
    one = complete(gpt2.model, gpt2.tokenizer, prompts, max_new_tokens=6)
    assert [c.word for c in one] == [first_words(c.text, 1) for c in one]
    assert [c.first_token for c in one] == [c.first_token for c in full]  # the same greedy start


def test_evaluate_at_two_words_labels_whole_answers(two_word_file, gpt2, tmp_path, capsys):
    path, lines = two_word_file
    out = tmp_path / "run"
    names = ["msp", "entropy", "sample_disagreement", "sequence_nll", "perplexity"]
    main(["evaluate", "--model", "tiny-gpt2", "--data", f"txt:{path}", "--split", "all", "--answer_words", str(K),
          "--n_boot", "100", "--agreement_samples", "4", "--estimators", ",".join(names), "--out", str(out), "--quiet"])
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["answer_words"] == K and results["n"] == len(rows) == 24
    for row in rows:
        assert row["target"] == " ".join(row["idiom"].split()[-K:])
        assert row["correct"] is lines[row["idiom"]]  # labelled by hand: the model's own two words or not
        assert row["completion_word"] == first_words(row["completion"], K)
        # the answer's tokens and a value per token: they add up to the whole answer's score
        assert len(row["answer_tokens"]) == len(row["token_nll"]) == len(row["token_entropy"]) >= 1
        assert first_words("".join(row["answer_tokens"]), K) == row["completion_word"]
        assert sum(row["token_nll"]) == pytest.approx(row["scores"]["sequence_nll"], rel=1e-5, abs=1e-5)
    assert sum(r["correct"] for r in rows) == 12
    # the sampled answers are compared whole: a prompt whose greedy answer is its own idiom's
    # still disagrees with samples whose second word differs
    assert all(0 <= r["scores"]["sample_disagreement"] <= 1 for r in rows)


@pytest.mark.slow
def test_crossval_at_two_words_trains_and_scores_whole_answers(two_word_file, tmp_path, capsys, monkeypatch):
    path, lines = two_word_file
    trained_targets: list[str] = []
    real_from_items = IdiomDataModule.from_items.__func__

    def recording(cls, train, *args, **kwargs):
        trained_targets.extend(it.target for it in train)
        module = real_from_items(cls, train, *args, **kwargs)
        assert module.answer_words == K
        return module

    monkeypatch.setattr(IdiomDataModule, "from_items", classmethod(recording))
    out = tmp_path / "cv"
    names = ["msp", "adapter_nll", "adapter_answer_nll", "latent_answer_nll", "latent_answer_gap"]
    main(["crossval", "--train_config", str(TINY), "--data", f"txt:{path}", "--folds", "2", "--seeds", "0",
          "--epochs", "1", "--samples", "4", "--n_boot", "100", "--answer_words", str(K),
          "--estimators", ",".join(names), "--out", str(out), "--quiet"])
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["answer_words"] == K and len(rows) == 24
    assert trained_targets and all(len(t.split()) == K for t in trained_targets)
    assert [r["correct"] for r in rows] == [lines[r["idiom"]] for r in rows]
    for name in names:
        assert name in results["estimators"], results["dropped"]
    for r in rows:  # the whole answer is at least as surprising as its first token
        assert r["scores"]["adapter_answer_nll"] >= r["scores"]["adapter_nll"] - 1e-4
        assert r["scores"]["latent_answer_gap"] >= 0
    # an answer of one token is not scored differently at K = 2: is_correct reads the two words
    assert not is_correct(type("C", (), {"word": "blue"})(), "blue moon", K)
