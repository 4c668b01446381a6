"""report.md in words: of a comparative run and of a cross-fitted one, and what their numbers are.

A run on random weights says so in place of its accuracy (:func:`random_weights_sentence`); each
estimator is named as its family's ``shown.prose`` says (``vtrans.estimators.registry.FAMILIES``).
"""

from __future__ import annotations

import textwrap
from collections.abc import Collection
from pathlib import Path
from typing import Any

from vtrans.estimators import registry
from vtrans.evaluation.report.plots import _PLOT_TITLES
from vtrans.evaluation.report.results import _float
from vtrans.evaluation.report.tables import _fmt, _markdown_table


def random_weights_sentence(results: dict[str, Any]) -> str | None:
    """What a report says of a run on random weights in place of its accuracy; None for trained weights."""
    if not results.get("random_weights"):
        return None
    return (
        f"**The base model has random weights** ({results.get('model', '?')}): its accuracy "
        f"({_fmt(results.get('accuracy'))}) and every AUROC here measure nothing a model knows and are not "
        "results; the run measures what the harness costs on this architecture."
    )


_HOW_TO_READ = """\
## How to read this

Each estimator scores every item; higher means "more likely wrong". An item is
an error when the model's completion is not the idiom's last word.
**AUROC** is the probability that a random incorrect item scores higher than a
random correct one: 0.5 is chance, 1 is perfect; the interval is a percentile
bootstrap over items. **AUPRC** (average precision) of a random score equals
the base error rate ({error_rate}); higher is better. **PRR** (the
prediction-rejection ratio) is the share of the oracle's gain over random
rejection that the score achieves: 1 perfect, 0 random, negative worse than
random. **AURC** is the mean error rate of the kept items as items are
rejected, most uncertain first; lower is better (a random score gets the error
rate). **ECE** and **Brier** judge the score as a probability of error once it
is calibrated: Platt scaling fitted on the other folds of the items (a
cross-fitted run's own folds, else 5 folds by idiom), applied to each fold;
ECE is the item-weighted gap between mean probability and error rate over 10
bins of the probability, Brier the mean squared error of the probability; both
lower is better (`reliability.png` draws the bins). **Cost** is in forward-pass equivalents of the base model. **Δ AUROC**
is the estimator's AUROC minus the reference's on the same items, with a
paired-bootstrap interval and two-sided p-value; the **corrected CI** is the
same interval at level 1 − 0.05/m, Bonferroni-corrected over the m estimators
compared with the reference. A difference is beyond resampling noise, with
every comparison of the table counted, when its corrected interval excludes 0.
"""


def _seen_sentence(results: dict[str, Any]) -> str | None:
    """What the report says about idioms the checkpoint's latent was trained on (None: no checkpoint)."""
    if not results.get("ckpt"):
        return None
    seen = results.get("seen")
    if seen is None:
        return "The checkpoint does not record its training idioms: items it was trained on could not be left out."
    if results.get("keep_seen"):
        return (
            f"{seen} of these items have idioms the latent was trained on and are included (`--keep_seen`): "
            "their latent scores are in-sample."
        )
    if not seen:
        return "None of the evaluated idioms was in the latent's training data."
    return f"{seen} items whose idiom the latent was trained on were left out (`--keep_seen` keeps them)."


def write_report_md(path: str | Path, results: dict[str, Any], plots: list[str]) -> None:
    """Write a human-readable markdown report.

    Args:
        path: output file (plots are linked relative to its folder).
        results: as returned by :func:`build_results` (or read back from JSON).
        plots: plot file names, as returned by :func:`plot_all`.
    """
    accuracy = _float(results.get("accuracy"))
    n = results.get("n", 0)
    parts = [
        f"# Which signal says a completion is wrong? — {results.get('model', '?')}",
        random_weights_sentence(results)
        or f"**{n} items**, accuracy **{_fmt(accuracy)}** (base error rate {_fmt(1 - accuracy)}).",
        _markdown_table(results),
    ]
    seen = _seen_sentence(results)
    if seen:
        parts.insert(2, seen)
    partial = {name: m["n"] for name, m in results["estimators"].items() if m.get("n", n) != n}
    if partial:
        listed = ", ".join(f"`{name}` (n={k})" for name, k in partial.items())
        parts.append(f"Scored on fewer items (undefined scores dropped): {listed}.")
    for name in registry.fitted(list(results["estimators"])):
        fit = results.get(f"{registry.family_of(name).name}_fit")
        if fit:
            parts.append(
                f"The {name} was fitted on {fit['n']} items of {fit['source']}: none of them is evaluated here, "
                "and the learned features are out-of-sample on them as on the evaluated items."
            )
    if results.get("p_wrong"):
        parts.append(_p_wrong_sentence(results["p_wrong"]))
    parts.append(_what_the_numbers_are(list(results.get("estimators", {}))))
    parts.append(_HOW_TO_READ.format(error_rate=_fmt(1 - accuracy)).rstrip())
    if plots:
        parts.append("## Plots\n\n" + "\n\n".join(f"![{_PLOT_TITLES.get(p, p)}]({p})" for p in plots))
    Path(path).write_text("\n\n".join(parts) + "\n", encoding="utf-8")


def _p_wrong_sentence(record: dict[str, Any]) -> str:
    """What scores.jsonl's ``p_wrong`` is, and how well calibrated it is on these items."""
    held = ", none of them among these" if record.get("calibration") else ""
    return (
        f"Each row of scores.jsonl has `p_wrong`, the probability that its completion is wrong: {record['from']}{held}. "
        f"On the {record['n']} items here its ECE is {_fmt(_float(record['ece']))} and its Brier score "
        f"{_fmt(_float(record['brier']))}."
    )


def _and(parts: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 1 else parts)


def _bullet(text: str) -> str:
    return textwrap.fill(text, width=96, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False)


def _what_the_numbers_are(names: Collection[str] | None = None) -> str:
    """What the numbers are, each estimator named as its family's ``shown.prose`` says
    (``registry.FAMILIES``): the families of the run's ``names`` only, where given."""
    families = [f for f in registry.FAMILIES if names is None or any(n in names for n in f.names)]
    references = [f.words("reference") for f in families if f.shown.reference]
    single = [f.words("cost") for f in families if f.names and f.reads_forward and not f.extra_passes and f.fitted is None]
    passes = [f.words("cost") for f in families if f.extra_passes]
    fitted = ""
    for family in (f for f in families if f.fitted is not None):
        passes_of_its_own = any(registry.family_of(registry.writer_of(key)).extra_passes for key in family.fitted.features)
        what = "what its features cost" if passes_of_its_own else "the shared forward"
        fitted += f"; {family.words('cost')} is {what} plus its fit"
    cost = "**Cost** is in plain forwards over the same items."
    if single:
        cost += (
            f" The single-pass estimators ({', '.join(single)}) share one forward, and each is charged that whole "
            "forward with every read off it"
        )
    if passes:
        cost += f"{';' if single else ''} {_and(passes)} are charged it plus their own passes"
    bullets = [
        "**`lens_ce` at the last layer is −log p(ŷ)** and ranks items as `msp` (1 − p(ŷ)) does, up to float32 "
        "rounding of −log p near 0: under greedy decoding the paper's output cross-entropy is the max-probability "
        "baseline. The lens adds information only through the intermediate layers (`lens_area`, the by-layer curve).",
        f"**The reference** is the best cheap baseline: of {_and(references)}, the one with the highest AUROC "
        "(mean over seeds in a cross-fitted run). This choice looks at the scored items, which only raises the bar "
        "for the others."
        if references
        else "**The reference**: no cheap baseline ran, so nothing is paired against one.",
        f"{cost}{fitted}. Training the latents is not in the cost.",
    ]
    return "## What the numbers are\n\n" + "\n".join(_bullet(b) for b in bullets)


def write_crossval_md(path: str | Path, results: dict[str, Any], plots: list[str]) -> None:
    """The report of a cross-fitted run: protocol, table with seed spreads, how to read it, plots."""
    proto = results.get("protocol", {})
    accuracy = _float(results.get("accuracy"))
    n = results.get("n", 0)
    seeds = proto.get("seeds", [])
    latent = ", ".join(f"{k}={v}" for k, v in (proto.get("latent") or {}).items())
    extra = ""
    if proto.get("extra_train"):
        who = "Every fold also trains" if (proto.get("folds") or 0) > 1 else "The latent trains"
        extra = f" {who} on {proto.get('n_extra_train')} idioms of `{proto['extra_train']}` (none of them scored"
        if proto.get("n_extra_dropped"):
            extra += f"; {proto['n_extra_dropped']} more were left out as scored idioms or variants of one"
        extra += ")."
    if proto.get("self_targets"):
        extra += (
            " Each latent also trained on the base model's own completion word as a second target of every "
            "training prompt it completes wrongly (`--self_targets`)."
        )
    if proto.get("from_checkpoints"):
        extra += (
            f" The latents were loaded from `{proto['from_checkpoints']}` (each checked to have trained on its "
            "fold's training idioms exactly), not retrained."
        )
    folds = proto.get("folds")
    how = (
        f"{folds} folds (idioms dealt by a hash seeded with {proto.get('fold_seed')}): each fold's latent trained on "
        "the other folds and scored its own, so every score is out-of-fold"
        if folds and folds > 1
        else "One latent per seed, trained on the extra idioms only, scores every item"
    )
    random = random_weights_sentence(results)
    parts = [
        f"# Cross-fitted comparison — {results.get('model', '?')}",
        *([random] if random else []),
        f"**{n} idioms** of `{proto.get('data')}`, accuracy **{_fmt(accuracy)}** (base error rate "
        f"{_fmt(1 - accuracy)}). {how}.{extra} Seeds {', '.join(map(str, seeds))} (training, z draws, dropout "
        f"masks, sampled completions); {proto.get('epochs')} epochs per latent; latent from "
        f"`{proto.get('training_config')}` ({latent}). The settings are the config's, fixed before this run; "
        "nothing here was chosen on these scores.",
        f"Reference: **`{results.get('reference')}`** (the best cheap baseline). The table's interval is a "
        "bootstrap over items for the first seed; the next column is the mean ± sd of AUROC over seeds "
        "(number of seeds); Δ is paired against the reference on the same items, first seed, then the mean ± sd "
        "of Δ over seeds.",
        _markdown_table(results),
    ]
    dropped = results.get("dropped") or {}
    if dropped:
        parts.append("Not run: " + "; ".join(f"`{k}` ({v})" for k, v in dropped.items()) + ".")
    training = results.get("fold_training") or []
    if training:
        kl = [t["kl"] for t in training if "kl" in t]
        active = [t["active_units"] for t in training if "active_units" in t]
        secs = sum(t["train_seconds"] for t in training)
        if kl:
            parts.append(
                f"The {len(training)} latents: training KL {min(kl):.2f}–{max(kl):.2f} nats/item, "
                f"{min(active):.0f}–{max(active):.0f} active units, {secs / 60:.1f} min of training in all."
            )
    total = results.get("seconds_total")
    if total:
        stamps = results.get("computed_with") or []
        where = "; ".join(f"{s.get('threads')} thread(s), torch {s.get('torch')}" for s in stamps)
        parts.append(f"The whole run took {total / 60:.1f} min" + (f" ({where})." if where else "."))
    parts.append(_what_the_numbers_are(list(results.get("estimators", {}))))
    parts.append(_HOW_TO_READ.format(error_rate=_fmt(1 - accuracy)).rstrip())
    if plots:
        parts.append(
            "## Plots\n\n"
            + "\n\n".join(f"![{_PLOT_TITLES.get(Path(p).name, p)}]({p})" for p in plots)
        )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n\n".join(parts) + "\n", encoding="utf-8")
