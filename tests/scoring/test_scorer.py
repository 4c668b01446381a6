"""The scoring path: ``Scorer`` (Python API), ``vtrans score`` (CLI), input parsing, bad input.

All on the tiny checkpoint (a random 4-block GPT-2 with a trained latent, context 128).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vtrans.cli import main
from vtrans.data import first_word, first_words
from vtrans.errors import ConfigError, UserError
from vtrans.estimators.registry import FAMILIES
from vtrans.latent import checkpoint
from vtrans.latent.model import LatentModel
from vtrans.latent.module import LatentLM
from vtrans.scoring.inputs import (
    MAX_LINE_BYTES,
    InputError,
    Line,
    open_input,
    parse_jsonl_line,
    parse_lines,
    parse_txt_line,
)
from vtrans.scoring.records import _number, dumps
from vtrans.scoring.request import ANSWER_DEFAULTS
from vtrans.scoring.scorer import Scorer

PROMPT = "Complete the idiom: the early bird catches the"
PREFIX = "the early bird catches the"
DEFAULT = ["msp", "entropy", "margin", "attention_entropy", "lens_ce", "lens_area", "posterior_var", "latent_kl", "latent_mi", "latent_nll", "adapter_nll"]


@pytest.fixture(scope="module")
def module(tiny_ckpt) -> LatentLM:
    return checkpoint.load(tiny_ckpt)


@pytest.fixture(scope="module")
def scorer(module) -> Scorer:
    return Scorer(module, batch_size=4, samples=4, quiet=True)


def scored(records: list[dict]) -> list[dict]:
    return [r for r in records if "error" not in r]


# --------------------------------------------------------------------------- the API


def test_records_hold_completion_and_every_default_score(scorer) -> None:
    [record] = list(scorer.score([PROMPT]))
    assert set(record) == {"prompt", "template", "completion", "completion_word", "scores"}
    assert record["prompt"] == PROMPT and isinstance(record["completion"], str)
    assert record["template"] is None  # a Scorer built on a module scores verbatim unless given one
    assert record["completion_word"] == first_word(record["completion"])
    assert list(record["scores"]) == DEFAULT
    assert all(isinstance(v, float) and math.isfinite(v) for v in record["scores"].values())


def test_scores_equal_an_independent_computation(scorer, module) -> None:
    """Greedy decoding: ŷ is the argmax, so msp = 1 − max p, lens_ce = −log max p, entropy = H(p)."""
    [record] = list(scorer.score([PROMPT]))
    model, tok = module.backbone.model, module.backbone.tokenizer
    with torch.no_grad():
        logits = model(**tok(PROMPT, return_tensors="pt")).logits[0, -1].float()
    p = torch.softmax(logits, -1)
    expected = {"msp": 1 - p.max(), "lens_ce": -torch.log(p.max()), "entropy": -(p * p.log()).sum()}
    for name, value in expected.items():
        assert record["scores"][name] == pytest.approx(float(value), rel=1e-4, abs=1e-5), name


def test_batching_does_not_change_deterministic_scores(module) -> None:
    prompts = [PROMPT, "a much longer prompt that forces left padding on the others " * 3, "hold your"]
    alone = Scorer(module, batch_size=1, samples=4, quiet=True)
    together = Scorer(module, batch_size=3, samples=4, quiet=True)
    for a, b in zip(alone.score(prompts), together.score(prompts), strict=True):
        assert a["completion"] == b["completion"]
        for name in DEFAULT:
            if name not in ("latent_mi", "latent_nll"):  # z samples are drawn per batch position
                assert b["scores"][name] == pytest.approx(a["scores"][name], rel=1e-4, abs=1e-4), name


def test_a_bare_string_is_not_taken_for_a_list_of_prompts(scorer) -> None:
    with pytest.raises(TypeError, match="wrap a single prompt in a list"):
        scorer.score(PROMPT)


def test_score_is_lazy_and_streams(scorer) -> None:
    consumed = []

    def endless():
        for i in itertools.count():
            consumed.append(i)
            yield f"{PROMPT} {i}"

    first = list(itertools.islice(scorer.score(endless()), 5))
    assert len(first) == 5 and all("scores" in r for r in first)
    assert len(consumed) <= 2 * scorer.batch_size


def test_blank_and_invalid_prompts_are_error_records_and_the_rest_is_scored(scorer) -> None:
    prompts = [PROMPT, "", "   \t\n", None, 42, "\ud800 lone surrogate", "hold your"]
    records = list(scorer.score(prompts))
    assert len(records) == len(prompts)
    assert [("error" in r) for r in records] == [False, True, True, True, True, True, False]
    assert records[1]["error"] == "empty prompt"
    assert "blank" in records[2]["error"] and "not a string" in records[3]["error"]
    assert "surrogate" in records[5]["error"]
    assert all(r["prompt"] == p for r, p in zip(records, prompts, strict=True))


def test_long_prompt_is_truncated_from_the_left_with_a_warning(module, capsys) -> None:
    scorer = Scorer(module, samples=4)  # not quiet: the warning is printed
    long = " ".join(["word"] * 400) + " " + PROMPT
    [record] = list(scorer.score([long]))
    assert "error" not in record and record["truncated"] > 0
    err = capsys.readouterr().err
    assert "warning:" in err and "truncated from the left" in err
    budget = scorer.max_prompt_tokens
    assert budget == 128 - 6
    kept = scorer.truncate_left(long, budget)
    assert long.endswith(kept) and kept.endswith(PROMPT)
    assert budget - 3 <= len(module.backbone.tokenizer(kept)["input_ids"]) <= budget
    [same] = list(Scorer(module, samples=4, quiet=True).score([kept]))
    assert same["scores"] == pytest.approx(record["scores"], rel=1e-5, abs=1e-6)


def test_long_prompt_refused_when_asked(module) -> None:
    scorer = Scorer(module, samples=4, long_prompts="refuse", quiet=True)
    records = list(scorer.score(["word " * 400, PROMPT]))
    assert "context of 128" in records[0]["error"] and "scores" in records[1]


def test_template_is_applied_to_each_prompt(module) -> None:
    templated = Scorer(module, template="Complete the idiom: {prefix}", samples=4, quiet=True)
    verbatim = Scorer(module, samples=4, quiet=True)
    [a] = list(templated.score(["the early bird catches the"]))
    [b] = list(verbatim.score([PROMPT]))
    assert a["prompt"] == "the early bird catches the"
    assert a["completion"] == b["completion"] and a["scores"] == pytest.approx(b["scores"])
    with pytest.raises(UserError, match="template"):
        Scorer(module, template="no field")


def test_estimator_choice(module, tiny_gpt2) -> None:
    [record] = list(Scorer(module, estimators=["mc_dropout_mi", "msp"], passes=3, quiet=True).score([PROMPT]))
    assert set(record["scores"]) == {"mc_dropout_mi", "msp"}
    with pytest.raises(ConfigError, match="unknown estimator"):
        Scorer(module, estimators=["nope"])
    with pytest.raises(ConfigError, match="vtrans evaluate"):
        Scorer(module, estimators=["probe"])
    standard = LatentModel(tiny_gpt2, d_z=2, hidden=8, prior="standard").eval()
    assert "latent_kl" not in Scorer(standard, quiet=True).names
    assert set(Scorer(standard, quiet=True).names) == set(DEFAULT) - {"latent_kl"}
    with pytest.raises(ConfigError, match="conditional"):
        Scorer(standard, estimators=["latent_kl"])
    assert set(DEFAULT) == {n for f in FAMILIES if f.shown.default_score for n in f.names}


def test_from_checkpoint_options(tiny_ckpt) -> None:
    scorer = Scorer.from_checkpoint(tiny_ckpt, device="cpu", estimators=["msp"], batch_size=2, template="ckpt")
    assert scorer.template == checkpoint.template_in(checkpoint.read(tiny_ckpt)) and scorer.batch_size == 2
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            Scorer.from_checkpoint(tiny_ckpt, device="cuda")


def test_non_finite_scores_become_null() -> None:
    assert _number(torch.tensor(float("nan"))) is None and _number(torch.tensor(float("-inf"))) is None
    assert _number(torch.tensor(0.5)) == 0.5
    line = dumps({"prompt": "\ud800", "scores": {"msp": None}})
    assert json.loads(line) == {"prompt": "\ud800", "scores": {"msp": None}}


# --------------------------------------------------------------------------- input parsing


def test_txt_lines() -> None:
    stream = io.BytesIO(b"\xef\xbb\xbfone\r\ntwo\n\n\xffbad\nlast")
    lines = list(parse_lines(stream, "txt"))
    assert [ln.prompt for ln in lines[:3]] == ["one", "two", ""]
    assert lines[3].error.startswith("line 4: not valid UTF-8 (byte 0xff") and lines[3].prompt == "\ufffdbad"
    assert lines[4] == Line("last", None, 5)


def test_jsonl_lines() -> None:
    raw = [b'{"prompt": "ok", "id": 1}', b"{bad", b'{"text": "x"}', b'{"prompt": 3}', b"[1]", b"", b'"s"']
    lines = [parse_jsonl_line(r, i) for i, r in enumerate(raw, 1)]
    assert lines[0] == Line("ok", None, 1, {"id": 1})
    assert lines[1].error.startswith("line 2: invalid JSON")
    assert "field 'prompt'" in lines[2].error and lines[2].line == 3
    assert "int, not a string" in lines[3].error
    assert all(ln.error and ln.prompt is None for ln in lines[4:])


def test_overlong_line_is_an_error_record_and_reading_goes_on() -> None:
    stream = io.BytesIO(b"a" * (MAX_LINE_BYTES + 10) + b"\nnext\n")
    lines = list(parse_lines(stream))
    assert lines[0].error == f"line 1: longer than {MAX_LINE_BYTES} bytes" and lines[1] == Line("next", None, 2)


def test_open_input_refuses_unreadable_files(tmp_path) -> None:
    (tmp_path / "bin.txt").write_bytes(b"abc\x00def\n")
    (tmp_path / "utf16.txt").write_bytes("hello\n".encode("utf-16"))
    for path, pattern in [
        (tmp_path / "missing.txt", "not found"),
        (tmp_path, "folder"),
        (tmp_path / "bin.txt", "not a UTF-8 text file"),
        (tmp_path / "utf16.txt", "not a UTF-8 text file"),
    ]:
        with pytest.raises(InputError, match=pattern):
            open_input(str(path))
    (tmp_path / "ok.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}')
    lines, total = open_input(str(tmp_path / "ok.jsonl"))
    assert total == 2 and [ln.prompt for ln in lines] == ["a", "b"]


# --------------------------------------------------------------------------- property-based


@settings(max_examples=200, deadline=timedelta(seconds=2))
@given(st.binary(max_size=300))
@example(b'{"prompt": "\\ud800"}')
@example(b"[" * 100_000)
@example(b"1" * 5000)
def test_line_parsers_never_crash(raw: bytes) -> None:
    for parse in (parse_txt_line, parse_jsonl_line):
        line = parse(raw, 1)
        assert (line.error is None) == isinstance(line.prompt, str) or parse is parse_txt_line
        assert line.error is None or line.error.startswith("line 1: ")


@settings(max_examples=100, deadline=timedelta(seconds=2))
@given(st.binary(max_size=400), st.sampled_from(["txt", "jsonl"]))
def test_streams_give_one_line_per_line(raw: bytes, kind: str) -> None:
    lines = list(parse_lines(io.BytesIO(raw), kind))
    expected = raw.count(b"\n") + (0 if raw.endswith(b"\n") or not raw else 1)
    assert len(lines) == expected
    assert [ln.line for ln in lines] == list(range(1, expected + 1))


@settings(
    max_examples=12,
    deadline=timedelta(seconds=60),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(st.one_of(st.text(max_size=60), st.text(max_size=600), st.binary(max_size=40)), max_size=4))
@example(["\x00", "\u200b", "{prefix}", "🙂" * 200])
def test_scorer_never_crashes(scorer, prompts: list) -> None:
    records = list(scorer.score(prompts))
    assert len(records) == len(prompts)
    for prompt, record in zip(prompts, records, strict=True):
        assert record["prompt"] is prompt
        assert ("error" in record) != ("scores" in record)
        if "scores" in record:
            assert set(record["scores"]) == set(DEFAULT)
        json.loads(dumps(record).decode() if not isinstance(prompt, bytes) else json.dumps(record["error"]))


# --------------------------------------------------------------------------- the command line


def run_cli(capsys, *args: str) -> tuple[list[dict], str]:
    main(["score", "--samples", "2", "--quiet", *args])
    captured = capsys.readouterr()
    return [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_cli_prompts(capsys, tiny_ckpt) -> None:
    records, err = run_cli(capsys, "--ckpt", str(tiny_ckpt), PREFIX, " ")
    assert len(records) == 2 and list(records[0]["scores"]) == DEFAULT
    assert records[1] == {"prompt": " ", "error": "blank prompt (only whitespace)"}
    assert err == ""  # --quiet: the error record says it
    main(["score", "--samples", "2", "--ckpt", str(tiny_ckpt), PREFIX, " "])
    assert "warning: 1 of 2 prompts could not be scored" in capsys.readouterr().err


def test_cli_txt_file_one_record_per_line(capsys, tmp_path, tiny_ckpt) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes(PREFIX.encode() + b"\n\nhold your \xff horses\n" + ("word " * 300).encode() + b"\nlast")
    records, _ = run_cli(capsys, "--ckpt", str(tiny_ckpt), "--input", str(path), "--batch_size", "2")
    assert len(records) == 5
    assert "scores" in records[0] and "scores" in records[4] and records[3]["truncated"] > 0
    assert records[1]["error"] == "line 2: empty prompt" and records[1]["line"] == 2
    assert records[2]["error"].startswith("line 3: not valid UTF-8") and records[2]["line"] == 3


def test_cli_jsonl_file(capsys, tmp_path, tiny_ckpt) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        json.dumps({"prompt": PREFIX}) + "\n{not json\n" + json.dumps({"text": "x"}) + "\n" + json.dumps({"prompt": "hold your"}) + "\n"
    )
    records, _ = run_cli(capsys, "--ckpt", str(tiny_ckpt), "--input", str(path))
    assert ["error" in r for r in records] == [False, True, True, False]
    assert records[1]["error"].startswith("line 2: invalid JSON") and records[2]["line"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "MISSING"], "input file not found"),
        (["--input", "BINARY"], "not a UTF-8 text file"),
        (["--input", "MISSING", "a prompt"], "not both"),
        ([], "nothing to score"),
        (["--estimators", "nope", "x"], "unknown estimator"),
        (["--estimators", "probe", "x"], "vtrans evaluate"),
        (["--template", "{oops}", "x"], "template"),
        (["--max_new_tokens", "500", "x"], "no room for a prompt"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(capsys, tmp_path, tiny_ckpt, args, message) -> None:
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02")
    args = [str(tmp_path / "missing.txt") if a == "MISSING" else str(tmp_path / "bin.txt") if a == "BINARY" else a for a in args]
    with pytest.raises(SystemExit) as info:
        main(["score", "--ckpt", str(tiny_ckpt), "--quiet", *args])
    assert info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err
    assert captured.out == ""


def test_cli_end_to_end_streams_json_lines(tmp_path, tiny_ckpt) -> None:
    """The installed command, as a user runs it, on stdin: stdout holds JSON lines only."""
    proc = subprocess.run(
        [sys.executable, "-c", "from vtrans.cli import main; main()", "score", "--ckpt", str(tiny_ckpt),
         "--input", "-", "--estimators", "msp,lens_ce", "--quiet"],
        input=f"{PREFIX}\nhold your\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in records] == [PREFIX, "hold your"]
    assert all(set(r["scores"]) == {"msp", "lens_ce"} for r in records)
    assert Path(tiny_ckpt).is_file()


# --------------------------------------------------------------------------- templates, checks before loading, fields


def test_the_checkpoints_template_is_the_default_and_none_scores_verbatim(capsys, tiny_ckpt, module) -> None:
    recorded = checkpoint.template_in(checkpoint.read(tiny_ckpt))
    assert recorded and "{prefix}" in recorded
    assert Scorer.from_checkpoint(tiny_ckpt, device="cpu", estimators=["msp"]).template == recorded
    [templated], _ = run_cli(capsys, "--ckpt", str(tiny_ckpt), "--estimators", "msp", PREFIX)
    [verbatim], _ = run_cli(capsys, "--ckpt", str(tiny_ckpt), "--estimators", "msp", "--template", "none", PREFIX)
    assert templated["template"] == recorded and verbatim["template"] is None
    assert templated["prompt"] == verbatim["prompt"] == PREFIX
    # the default is the prompt the latent was trained on: the same record as the rendered prompt scored verbatim
    [rendered] = list(Scorer(module, estimators=["msp"], quiet=True).score([recorded.format(prefix=PREFIX)]))
    assert templated["completion"] == rendered["completion"]
    assert templated["scores"]["msp"] == pytest.approx(rendered["scores"]["msp"], rel=1e-5, abs=1e-7)


def test_a_prompt_that_already_holds_the_template_is_warned_about_once(module, capsys) -> None:
    scorer = Scorer(module, estimators=["msp"], template="Complete the idiom: {prefix}")
    list(scorer.score([PROMPT, PROMPT, PREFIX]))
    err = capsys.readouterr().err
    assert err.count("already begins with the template's 'Complete the idiom:'") == 1 and "--template none" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--estimators", "nope", PREFIX], "unknown estimator"),
        (["--estimators", "probe", PREFIX], "vtrans evaluate"),
        (["--template", "{oops}", PREFIX], "template"),
        (["--input", "EMPTY"], "is empty"),
        (["--input", "-"], "standard input is empty"),
    ],
)
def test_a_bad_request_is_refused_before_the_model_loads(monkeypatch, capsys, tmp_path, tiny_ckpt, args, message) -> None:
    def no_loading(*_, **__):
        raise AssertionError("the model was loaded before the request was checked")

    monkeypatch.setattr(checkpoint, "load", no_loading)
    monkeypatch.setattr("vtrans.backbone.loading.Backbone.__init__", no_loading)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    (tmp_path / "empty.txt").write_bytes(b"")
    args = [str(tmp_path / "empty.txt") if a == "EMPTY" else a for a in args]
    with pytest.raises(SystemExit) as info:
        main(["score", "--ckpt", str(tiny_ckpt), *args])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_an_unknown_estimator_is_refused_with_what_score_can_run(tiny_ckpt) -> None:
    with pytest.raises(ConfigError) as info:
        Scorer.from_checkpoint(tiny_ckpt, device="cpu", estimators=["nope"])
    offered = str(info.value).split("score can run ")[1].split(", ")
    assert "probe" not in offered and {"msp", "latent_nll", "mc_dropout_mi"} <= set(offered)


def test_jsonl_fields_pass_through_into_records(capsys, tmp_path, tiny_ckpt) -> None:
    path = tmp_path / "prompts.jsonl"
    rows = [{"id": 7, "prompt": PREFIX, "meta": {"source": "x"}}, {"id": 8, "prompt": ""}, {"id": 9, "prompt": "hold your"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, _ = run_cli(capsys, "--ckpt", str(tiny_ckpt), "--estimators", "msp", "--input", str(path))
    assert [r["id"] for r in records] == [7, 8, 9]
    assert records[0]["meta"] == {"source": "x"} and "scores" in records[0]
    assert records[1]["error"] == "line 2: empty prompt"
    assert records[2]["completion_word"] == first_word(records[2]["completion"])


def test_every_record_of_a_model_with_random_weights_says_so():
    """Records of a latent on ``random:NAME``, errors too; a trained model's records have no such field."""
    from vtrans.backbone.loading import Backbone
    from vtrans.latent.model import LatentModel
    from vtrans.scoring.scorer import Scorer

    for name, marked in [("random:tiny-gpt2", True), ("tiny-gpt2", False)]:
        scorer = Scorer(LatentModel(Backbone(name), layer=2, d_z=4, hidden=8).eval(), ["msp", "latent_nll"], quiet=True, samples=4)
        records = list(scorer.score(["spill the", "   ", "once in a blue"]))
        assert "error" in records[1] and "scores" in records[0]
        assert all(r.get("random_weights", False) is marked for r in records), records


def test_answers_of_two_words_give_the_whole_answer_and_a_score_per_token(module) -> None:
    scorer = Scorer(module, batch_size=4, samples=4, quiet=True, answer_words=2)
    [record] = list(scorer.score([PROMPT]))
    assert record["completion_word"] == first_words(record["completion"], 2)
    assert list(record["scores"]) == DEFAULT + list(ANSWER_DEFAULTS)  # the whole answer's scores join the defaults
    tokens = record["tokens"]
    assert set(tokens) == {"answer", "token_nll", "token_entropy"}
    assert len(tokens["answer"]) == len(tokens["token_nll"]) == len(tokens["token_entropy"]) >= 1
    assert first_words("".join(tokens["answer"]), 2) == record["completion_word"]
    assert sum(tokens["token_nll"]) == pytest.approx(record["scores"]["sequence_nll"], rel=1e-5, abs=1e-5)
    assert tokens["token_entropy"][0] == pytest.approx(record["scores"]["entropy"], rel=1e-5, abs=1e-5)  # ŷ's distribution
    # one-word answers keep today's records: no per-token part
    [one] = list(Scorer(module, batch_size=4, samples=4, quiet=True).score([PROMPT]))
    assert "tokens" not in one and list(one["scores"]) == DEFAULT
