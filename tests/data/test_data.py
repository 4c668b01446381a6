"""Tests of vtrans.data: items, loaders, splits, templates and the DataModule."""

import random
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtrans.data import (
    DEFAULT_TEMPLATE,
    SPLITS,
    DataError,
    IdiomItem,
    first_word,
    load_idioms,
    load_split,
    normalize_word,
    parse_spec,
    render_prompt,
    split_idiom,
    split_items,
    validate_template,
)
from vtrans.latent.datamodule import IdiomDataModule

DATA = Path(__file__).resolve().parents[1] / "fixtures"


def key(item: IdiomItem) -> str:
    return " ".join(filter(None, map(normalize_word, item.idiom.split())))


# --- the built-in idiom set ------------------------------------------------------------


@pytest.fixture(scope="module")
def builtin() -> list[IdiomItem]:
    return load_idioms("builtin")


def test_builtin_size_and_uniqueness(builtin: list[IdiomItem]) -> None:
    assert len(builtin) >= 480
    assert len({key(item) for item in builtin}) == len(builtin)


def test_builtin_file_lines_are_clean() -> None:
    lines = (Path(__file__).resolve().parents[2] / "vtrans" / "data" / "idioms.txt").read_text(encoding="utf-8").splitlines()
    idioms = [line for line in lines if line.strip() and not line.startswith("#")]
    assert lines[0].startswith("#") and lines[1].startswith("#")
    for idiom in idioms:
        assert idiom == idiom.strip() and len(idiom.split()) >= 3, idiom
        assert re.fullmatch(r"[a-z']+", idiom.split()[-1]), idiom
        assert not re.search(r"\b(somebody|someone|one's)\b|\[", idiom), idiom
        assert split_idiom(idiom).idiom == idiom
    assert len(idioms) == len(load_idioms("builtin"))


def test_builtin_splits_are_disjoint_and_cover(builtin: list[IdiomItem]) -> None:
    parts = {name: split_items(builtin, name) for name in SPLITS}
    keys = {name: {key(item) for item in items} for name, items in parts.items()}
    assert (
        not keys["train"] & keys["val"]
        and not keys["train"] & keys["test"]
        and not keys["val"] & keys["test"]
    )
    assert sum(len(items) for items in parts.values()) == len(builtin)
    assert split_items(builtin, "all") == builtin
    for name, fraction in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        assert abs(len(parts[name]) / len(builtin) - fraction) < 0.05, name


def test_split_is_deterministic_and_order_independent(builtin: list[IdiomItem]) -> None:
    shuffled = builtin[:]
    random.Random(1).shuffle(shuffled)
    for name in SPLITS:
        first = split_items(builtin, name, seed=3)
        assert first == split_items(builtin, name, seed=3)
        assert {key(item) for item in split_items(shuffled, name, seed=3)} == {key(item) for item in first}


def test_different_seeds_give_different_splits(builtin: list[IdiomItem]) -> None:
    assert split_items(builtin, "test", seed=0) != split_items(builtin, "test", seed=1)


def test_load_split_takes_the_split_from_the_spec(builtin: list[IdiomItem]) -> None:
    assert load_split("builtin:test") == split_items(builtin, "test")
    assert load_split("builtin:test", "train") == split_items(builtin, "test")
    assert load_split("builtin", "val", seed=2) == split_items(builtin, "val", seed=2)
    assert load_split("builtin") == builtin


@pytest.mark.parametrize(
    ("split", "val", "test"),
    [("dev", 0.15, 0.15), ("train", -0.1, 0.15), ("train", 0.15, 1.0), ("train", 0.5, 0.5)],
)
def test_split_rejects_bad_arguments(builtin: list[IdiomItem], split: str, val: float, test: float) -> None:
    with pytest.raises(DataError, match=r"valid|\[0, 1\)|below 1"):
        split_items(builtin, split, val_fraction=val, test_fraction=test)


# --- loaders ---------------------------------------------------------------------------


def test_txt_loader() -> None:
    items = load_idioms(f"txt:{DATA / 'idioms.txt'}")
    assert [item.idiom for item in items] == [
        "a piece of cake",
        "break the ice",
        "Spill the Beans",
        "rock 'n' roll",
        "it’s raining cats and dogs",
    ]
    assert items[1] == IdiomItem("break the ice", "break the", "ice")
    assert items[2].target == "Beans"


def test_epie_loader_crlf_without_final_newline() -> None:
    raw = (DATA / "Static_idioms.txt").read_bytes()
    assert b"\r\n" in raw and not raw.endswith(b"\n"), "fixture must keep CRLF and no final newline"
    items = load_idioms(f"epie:{DATA / 'Static_idioms.txt'}")
    assert [(item.prefix, item.target) for item in items] == [
        ("a blessing in", "disguise"),
        ("beat around the", "bush"),
        ("better late than", "never"),
        ("bite the", "bullet"),
    ]


def test_slide_loader() -> None:
    items = load_idioms(f"slide:{DATA / 'slide.tsv'}")
    assert [item.idiom for item in items] == ["above board", "add fuel to the fire", "all in a day's work"]


def test_magpie_loader_dedupes() -> None:
    items = load_idioms(f"magpie:{DATA / 'magpie.jsonl'}")
    assert [item.idiom for item in items] == ["at the end of the day", "off the hook", "in the same boat"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("txt:{d}/missing.txt", r"data file not found: .*missing\.txt"),
        ("epie:{d}", r"directory, not a file: .*fixtures"),
        ("txt:{d}/bad_utf8.txt", r"bad_utf8\.txt:2: not valid UTF-8"),
        ("txt:{d}/bad_short.txt", r"bad_short\.txt:3: .*'abracadabra' has fewer than 2 words"),
        ("txt:{d}/bad_lastword.txt", r"bad_lastword\.txt:2: the last word .* has no letters"),
        ("txt:{d}/empty.txt", r"empty\.txt: no idioms found"),
        ("slide:{d}/bad_slide_header.tsv", r"bad_slide_header\.tsv:1: .*no 'Idiom' column"),
        ("slide:{d}/bad_slide_row.tsv", r"bad_slide_row\.tsv:3: "),
        ("magpie:{d}/bad_magpie_json.jsonl", r"bad_magpie_json\.jsonl:3: invalid JSON"),
        ("magpie:{d}/bad_magpie_field.jsonl", r"bad_magpie_field\.jsonl:2: .*'idiom'"),
        ("magpie:{d}/bad_magpie_type.jsonl", r"bad_magpie_type\.jsonl:2: .*'idiom'"),
        ("txt:{d}/slide.tsv", r"slide\.tsv:2: the last word .* has no letters"),
    ],
)
def test_loader_errors(spec: str, message: str) -> None:
    with pytest.raises(DataError, match=message) as info:
        load_idioms(spec.format(d=DATA))
    assert "\n" not in str(info.value)


def test_magpie_non_string_idiom(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"idiom": "off the hook"}\n{"idiom": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"m\.jsonl:2: .*string field 'idiom'"):
        load_idioms(f"magpie:{path}")


def test_empty_slide_file(tmp_path: Path) -> None:
    path = tmp_path / "s.tsv"
    path.write_text("Idiom\tPositive\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"s\.tsv: no idioms found"):
        load_idioms(f"slide:{path}")


# --- specs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("builtin", ("builtin", None)),
        ("builtin:test", ("builtin", "test")),
        ("txt:a/b.txt", ("txt", "a/b.txt")),
        ("epie:Static_idioms.txt", ("epie", "Static_idioms.txt")),
        ("slide:x.tsv", ("slide", "x.tsv")),
        ("magpie:C:/data/m.jsonl", ("magpie", "C:/data/m.jsonl")),
    ],
)
def test_parse_spec(spec: str, parsed: tuple[str, str | None]) -> None:
    assert parse_spec(spec) == parsed


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("csv:x.csv", r"unknown data spec .*txt, epie, slide, magpie"),
        ("data/idioms.txt", r"unknown data spec"),
        ("txt:", r"names no file; write txt:PATH"),
        ("magpie", r"names no file"),
        ("builtin:dev", r"unknown split 'dev'.*train, val, test, all"),
    ],
)
def test_parse_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_spec(spec)


# --- words and items -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("Cake.", "cake"),
        ("  don't stop", "don't"),
        ("’tis", "'tis"),
        ("123", ""),
        ("Bag!\nmore", "bag"),
        ("", ""),
    ],
)
def test_first_word(text: str, word: str) -> None:
    assert first_word(text) == word


@pytest.mark.parametrize(
    ("text", "word"), [("Cake.", "cake"), ("Don’t", "don't"), ("Café", "café"), ("42", "")]
)
def test_normalize_word(text: str, word: str) -> None:
    assert normalize_word(text) == word


def test_split_idiom() -> None:
    assert split_idiom("  Let the cat\tout of the  bag!! ") == IdiomItem(
        "Let the cat out of the bag", "Let the cat out of the", "bag"
    )
    with pytest.raises(DataError, match="fewer than 2 words"):
        split_idiom("cake.")
    with pytest.raises(DataError, match="no letters"):
        split_idiom("catch 22")


@given(st.text())
def test_split_idiom_and_first_word_only_raise_data_error(text: str) -> None:
    assert first_word(text) == normalize_word(first_word(text))
    try:
        item = split_idiom(text)
    except DataError:
        return
    assert item.idiom == f"{item.prefix} {item.target}"
    assert first_word(item.target)


# --- templates -------------------------------------------------------------------------


def test_render_prompt() -> None:
    assert render_prompt(DEFAULT_TEMPLATE, "break the") == "Complete the idiom: break the"
    assert render_prompt("Q: {prefix}\nA: {{idiom}}", "x y") == "Q: x y\nA: {idiom}"


@pytest.mark.parametrize(
    "template", ["no field", "{prefix} {target}", "{}", "{0}", "{prefix", "{prefix.upper}"]
)
def test_validate_template_rejects(template: str) -> None:
    with pytest.raises(DataError, match=r"\{prefix\}"):
        validate_template(template)


# --- DataModule ------------------------------------------------------------------------


def test_datamodule_batches() -> None:
    dm = IdiomDataModule(batch_size=8, max_items=20)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"idiom", "prefix", "target", "prompt"}
    assert all(len(values) == 8 and all(isinstance(v, str) for v in values) for values in batch.values())
    assert all(p == f"Complete the idiom: {x}" for p, x in zip(batch["prompt"], batch["prefix"], strict=True))
    assert [len(b["idiom"]) for b in dm.val_dataloader()] == [8, 8, 4]
    dm.setup("test")
    assert sum(len(b["idiom"]) for b in dm.test_dataloader()) == 20
    assert len(dm.items["val"]) == 20


def test_datamodule_train_shuffle_is_seeded() -> None:
    def order(seed: int) -> list[str]:
        dm = IdiomDataModule(batch_size=4, seed=seed)
        dm.setup("fit")
        return [idiom for batch in dm.train_dataloader() for idiom in batch["idiom"]]

    assert order(0) == order(0)
    assert order(0) != [item.idiom for item in load_split("builtin", "train")]  # shuffled
    assert sorted(order(0)) == sorted(item.idiom for item in load_split("builtin", "train"))
    dm = IdiomDataModule(batch_size=4)
    dm.setup("validate")
    val_order = [idiom for batch in dm.val_dataloader() for idiom in batch["idiom"]]
    assert val_order == [item.idiom for item in load_split("builtin", "val")]


def test_datamodule_with_file_and_template() -> None:
    dm = IdiomDataModule(data=f"magpie:{DATA / 'magpie.jsonl'}", template="Idiom: {prefix}", batch_size=2)
    dm.setup()
    total = sum(len(dm.items[name]) for name in SPLITS)
    assert total == 3
    assert dm.hparams.template == "Idiom: {prefix}"


def test_datamodule_fit_rejects_pinned_split() -> None:
    dm = IdiomDataModule(data="builtin:test")
    with pytest.raises(DataError, match="fit needs separate train and val"):
        dm.setup("fit")
    dm.setup("test")
    assert dm.items["test"] == load_split("builtin:test")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "below 1"),
        ({"template": "{x}"}, r"\{prefix\}"),
        ({"max_items": 0}, "max_items"),
        ({"num_workers": -1}, "num_workers"),
        ({"data": "json:x"}, "unknown data spec"),
    ],
)
def test_datamodule_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IdiomDataModule(**kwargs)
