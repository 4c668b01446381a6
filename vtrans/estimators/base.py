"""What every estimator family declares, and the shared forward it reads.

A *family* is a few estimator names computed together, in three parts: what it **reads**
(``read(forward, context)`` turns the batch's :class:`Forward` into ``{name: (B,) tensor}``),
or for a *fitted* family what it is **fitted** on (:class:`Fitted`: a fit on other families'
scores of labelled items); the **posterior** fitted on the latent after its training that its
``read`` uses, if any (:class:`Posterior`: a run fits it, the family reads it off
``Context.posteriors``); and how it is **shown** (:class:`Shown`: ``vtrans score``'s defaults,
the reference baseline, the report's words). What it needs are keys of :data:`NEEDS`, each
checking itself against the run's :class:`Setting`.

The runner (``vtrans.estimators.runner``) makes one forward of the base model per batch that
yields everything the asked-for families need, then calls each family's ``read``: single-pass
families only read it; families with ``extra_passes`` add passes of their own, starting from the
forward's states rather than from the tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from vtrans.backbone.attention import full_cache
from vtrans.backbone.tokens import Encoded, shift_positions, slot_positions
from vtrans.config import EstimatorConfig


@dataclass(frozen=True)
class Setting:
    """What a run has, against which a family's needs are checked.

    Attributes:
        prior: the trained latent's prior (``standard``, ``conditional``, ``deterministic``);
            None without a latent.
        aggregate: how a word's tokens are aggregated (``first``, ``mean``, ``max``).
        members: the latents of the ensemble there is (0 or 1: none).
        posteriors: the names of the posteriors fitted on the latent that there are.
    """

    prior: str | None = None
    aggregate: str = "first"
    members: int = 0
    posteriors: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Need:
    """One thing a family may need: ``what`` it is, and for one that a run may lack, ``unmet``
    (true when the :class:`Setting` lacks it) with the reason a name is then left out."""

    what: str
    unmet: Callable[[Setting], bool] | None = None
    why: str = ""


# What a family may need from the shared forward or the run, checked in this order:
NEEDS: dict[str, Need] = {
    "hidden_states": Need("every layer's residual stream (the lens, the latent's layer-k state)"),
    "attentions": Need("the attention weights (eager attention)"),
    "cache": Need("every block's keys and values (extra passes start from them)"),
    "whole_word": Need("the whole completion word after the prompt, not only its first token"),
    "latent": Need("a trained latent (--ckpt)", lambda s: s.prior is None, "needs a trained latent (--ckpt)"),
    "variational": Need(
        "a variational latent (prior: standard or conditional, not the deterministic twin)",
        lambda s: s.prior == "deterministic",
        "needs a variational latent: the deterministic twin has no spread",
    ),
    "conditional_prior": Need(
        "a latent trained with prior: conditional",
        lambda s: s.prior != "conditional",
        "needs a latent trained with prior: conditional",
    ),
    "ensemble": Need(
        "an ensemble of latents (crossval --ensemble M, M >= 2)",
        lambda s: s.members < 2,
        "needs an ensemble of latents (crossval --ensemble M, M >= 2)",
    ),
}


@dataclass
class Forward:
    """One forward of the base model over a batch of prompts followed by their completions.

    Attributes:
        enc: the batch (targets are the base model's own completion tokens, ŷ first).
        logits: (B, N, V) logits at the positions that predict the N target slots.
        hidden_states: the L+1 residual-stream states (B, T, C), when asked for.
        attentions: the L attention-weight tensors (B, H, T, T), when asked for.
        cache: the forward's keys and values, when asked for.
        gold: (B,) the idiom's first gold token, for analysis only (never read by a score).
    """

    enc: Encoded
    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    cache: Any = None
    gold: torch.Tensor | None = None

    @property
    def y(self) -> torch.Tensor:
        """(B,) ŷ, the completion's first token (what the scored position predicts)."""
        rows = torch.arange(self.enc.targets.shape[0], device=self.enc.targets.device)
        return self.enc.targets[rows, self.enc.first_slot]

    def first_slot(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, ...) per-slot values -> (B, ...) at each item's first slot."""
        rows = torch.arange(x.shape[0], device=x.device)
        return x[rows, self.enc.first_slot.to(x.device)]


@dataclass
class Context:
    """What a family may use besides the forward.

    Attributes:
        model: the base model (latent off).
        module: the trained ``LatentModel`` (None without a checkpoint).
        tokenizer: the model's tokenizer.
        config: the estimator settings.
        prompts, completions: the batch's prompts and the base model's completions of them.
        indices: (B,) each item's index in the whole run: the seed of its own random draws, so that
            its scores do not depend on the batch it falls in.
        members: an ensemble's latents, ``module`` first (empty without an ensemble).
        posteriors: the posteriors fitted on ``module`` after its training, by their
            :attr:`Posterior.name` (a checkpoint holds none: ``vtrans crossval`` fits them per fold).
    """

    model: Any
    module: Any
    tokenizer: Any
    config: EstimatorConfig
    prompts: list[str]
    completions: list[Any]
    indices: list[int]
    members: tuple = ()
    posteriors: Mapping[str, Any] = field(default_factory=dict)


Read = Callable[[Forward, Context], dict[str, torch.Tensor]]
Predict = Callable[[dict[str, torch.Tensor]], torch.Tensor]
Fit = Callable[[dict[str, torch.Tensor], torch.Tensor], Predict]
"""``fit(features, errors)``: fitted on labelled items, ``features`` the keys of the family's
``features`` that were computed (``{key: (n,) or (n, k) tensor}``) and ``errors`` (n,) 0/1;
returns ``predict``, which scores other items from the same keys: (m,), higher = more likely
wrong. Raises ``ValueError`` when the items leave nothing to fit (all of one class)."""


@dataclass(frozen=True)
class Fitted:
    """How a fitted family is fitted.

    Attributes:
        on: what it is fitted on, in words.
        fit: fits the family's one name (:data:`Fit`).
        features: what ``fit`` reads: other families' names, ``fields`` or ``features``, in
            order; a run that asks for the family computes them (those that apply there).
        targets: what ``fit`` reads of its training items only (never of the scored ones): a
            run computes them for the items it is fitted on.
        labels: whether ``fit`` reads the items' correctness (``se_probe`` does not).
    """

    on: str
    fit: Fit
    features: tuple[str, ...]
    targets: tuple[str, ...] = ()
    labels: bool = True


@dataclass(frozen=True)
class PosteriorData:
    """What a posterior fitted on a trained latent may be fitted on (rendered prompts).

    Attributes:
        train_prompts: the prompts of the idioms the latent trained on.
        held_prompts, held_targets: idioms set aside from its training and from the scored ones
            (empty unless a posterior that is ``held_out`` was asked for).
    """

    train_prompts: list[str]
    held_prompts: list[str] = field(default_factory=list)
    held_targets: list[str] = field(default_factory=list)


@dataclass(frozen=True, eq=False)
class Posterior:
    """A posterior fitted on the trained latent after its training, read by the families that name
    it; a checkpoint holds none, a run fits it (``vtrans crossval`` once per fold's latent).

    Attributes:
        name: its key in ``Context.posteriors``.
        what: what it is, in words (the reason a name that needs it is left out: "needs ``what``").
        fit: ``fit(latent, data)``: the posterior of a trained ``LatentModel`` from :class:`PosteriorData`.
        held_out: fitted on idioms set aside from the latent's training: a run holds some out for it.
        describe: what a run's log records of the fitted posterior (``{key: number}``).
    """

    name: str
    what: str
    fit: Callable[[Any, PosteriorData], Any]
    held_out: bool = False
    describe: Callable[[Any], dict[str, Any]] | None = None


@dataclass(frozen=True)
class Shown:
    """How a family's names are presented.

    Attributes:
        default_score: in ``vtrans score``'s default estimators.
        reference: its names may serve as the reference baseline that every other estimator is
            paired against (cheap ones: the best of them is the bar to clear).
        prose: how the report's bullets name the family's estimators, by bullet (``cost``,
            ``reference``); a bullet not given names them in backticks.
    """

    default_score: bool = True
    reference: bool = False
    prose: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """An estimator family: its names, what it needs, and how it reads the shared forward or is fitted.

    Attributes:
        name: the family's name (the key of its seconds in a report).
        help: one line per estimator name, oriented so that higher = more uncertain.
        read: the scores of a batch from its :class:`Forward`; None for a fitted family.
        needs: keys of :data:`NEEDS` that every name of the family needs.
        name_needs: further needs of single names.
        extra_passes: adds passes of the model beyond the shared forward (timed on its own).
        reads_forward: reads the shared forward (charged its cost): every name of the family, or
            only the names given (the others run, and are charged, without it).
        first_token_only: reads the scored position only: run with ``aggregate`` first alone.
        fields: per-item values its ``read`` returns besides its scores (a (B, k) tensor each),
            written into every row of scores.jsonl; a run computes them whatever it asks for.
        tokens: per-token values its ``read`` returns when it runs (a (B, W) tensor each: the
            answer's tokens from index 0, NaN past its end; W = ``max_new_tokens`` ×
            ``answer_words``, the most an answer holds), written into the rows of scores.jsonl
            and ``vtrans score``'s records as lists, one value per answer token.
        features: per-item values its ``read`` returns for fitted families only (a (B, ...) tensor
            each: a residual state), kept only when a run asks for them by key and never written
            into scores.jsonl or a cross-fitted run's units.
        fitted: how a fitted family is fitted; None for one that reads.
        posterior: the posterior fitted on the latent that its ``read`` uses; None for none.
        shown: how its names are presented.
    """

    name: str
    help: dict[str, str]
    read: Read | None
    needs: frozenset[str] = frozenset()
    name_needs: dict[str, frozenset[str]] = field(default_factory=dict)
    extra_passes: bool = False
    reads_forward: bool | frozenset[str] = True
    first_token_only: bool = False
    fields: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    fitted: Fitted | None = None
    posterior: Posterior | None = None
    shown: Shown = Shown()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.help)

    def words(self, bullet: str) -> str:
        """The family's estimators in the report's ``bullet``: its prose there, or its names in backticks."""
        return self.shown.prose.get(bullet) or ", ".join(f"`{n}`" for n in self.names)

    def reads_forward_of(self, names: Collection[str]) -> bool:
        """Whether any of ``names`` (of this family) reads the shared forward."""
        if isinstance(self.reads_forward, bool):
            return self.reads_forward
        return any(n in self.reads_forward for n in names)

    def needs_of(self, name: str) -> frozenset[str]:
        return self.needs | self.name_needs.get(name, frozenset())

    def why_not(self, name: str, setting: Setting, posterior: bool = True) -> str | None:
        """Why ``name`` cannot run in ``setting``, or None when it can: the first unmet need in
        :data:`NEEDS`' order, then the posterior (unless ``posterior`` is false: what a run checks
        before it fits one), then the aggregate."""
        needs = self.needs_of(name)
        for key, need in NEEDS.items():
            if key in needs and need.unmet is not None and need.unmet(setting):
                return need.why
        if posterior and self.posterior is not None and self.posterior.name not in setting.posteriors:
            return f"needs {self.posterior.what}"
        if self.first_token_only and setting.aggregate != "first":
            return "reads the first completion token only: run it with --aggregate first"
        return None

    def __post_init__(self) -> None:
        unknown = set(self.needs).union(*self.name_needs.values()) - set(NEEDS)
        if unknown:
            raise ValueError(f"family {self.name}: unknown needs {sorted(unknown)}")
        if (self.fitted is None) == (self.read is None):
            raise ValueError(f"family {self.name}: either a read, or how it is fitted")
        if self.fitted is not None and len(self.help) != 1:
            raise ValueError(f"family {self.name}: a fitted family has one name, got {list(self.help)}")
        if self.posterior is not None and "latent" not in self.needs:
            raise ValueError(f"family {self.name}: a posterior is fitted on a latent: it needs one")


@torch.no_grad()
def run_forward(
    model,
    enc: Encoded,
    hidden_states: bool = False,
    attentions: bool = False,
    cache: bool = False,
    gold: torch.Tensor | None = None,
) -> Forward:
    """The shared forward: one pass of the base model that keeps what the families asked for.

    Attention weights need eager attention (the caller switches it; SDPA returns none).
    """
    out = model(
        **enc.inputs,
        output_hidden_states=hidden_states,
        output_attentions=attentions,
        use_cache=cache,
        cache=full_cache() if cache else None,  # every position's keys, sliding-window blocks' too
        logits_to_keep=enc.targets.shape[1] + 1,
    )
    return Forward(
        enc,
        slot_positions(out.logits, enc),
        out.hidden_states if hidden_states else None,
        out.attentions if attentions else None,
        out.cache if cache else None,
        gold,
    )


@torch.no_grad()
def forward_from_generation(
    model, generation, enc: Encoded, cache: bool = False, gold: torch.Tensor | None = None
) -> Forward:
    """The shared forward read off the completions' own ``generate`` (``vtrans.backbone.generate.Generation``): no second pass.

    ``generate`` ran the prompts and fed each generated token but the last, keeping what was
    asked for; this lays it out as :func:`run_forward` over ``enc`` (the prompts followed by
    their completion tokens, right-aligned) would have: item b's positions move by
    W + n_b − T (W the prompts' width in ``generate``, n_b its target tokens, T the width of
    ``enc``). The last completion token is fed once more when its states are kept but were not
    computed (a word that used up ``max_new_tokens``). Positions that are padding in ``enc``
    hold zeros. With ``cache``, the generation's keys and values are laid out in place and kept.
    """
    width, (_, length), slots = generation.prompt_width, enc.input_ids.shape, enc.targets.shape[1]
    n = enc.target_mask.sum(1).clamp(min=1)  # (B,) completion tokens of each item
    shift = width + n - length
    if generation.cache is not None and generation.fed < width + int(n.max()):
        generation.feed_last(model)
    hidden = generation.hidden_states
    if hidden is not None:
        hidden = tuple(shift_positions(h, shift, length, 1) for h in hidden)
    attentions = generation.attentions
    if attentions is not None:
        attentions = tuple(shift_positions(shift_positions(a, shift, length, 2), shift, length, 3) for a in attentions)
    kv = generation.cache if cache else None
    if kv is not None:
        for layer in kv.layers:
            layer.keys = shift_positions(layer.keys, shift, length, 2)
            layer.values = shift_positions(layer.values, shift, length, 2)
    logits = shift_positions(generation.logits, n - slots, slots, 1)  # slot j of item b: step j − (N − n_b)
    return Forward(enc, logits, hidden, attentions, kv, gold)


def context_for(model, config: EstimatorConfig | None = None, module=None, n: int = 0, **more: Any) -> Context:
    """A :class:`Context` for reading one batch of ``n`` items outside a run (tests, benchmarks)."""
    return Context(
        model,
        module,
        more.pop("tokenizer", None),
        config or EstimatorConfig(),
        more.pop("prompts", [""] * n),
        more.pop("completions", [None] * n),
        more.pop("indices", list(range(n))),
        tuple(more.pop("members", ())),
    )


def item_seed(seed: int, index: int) -> int:
    """The seed of item ``index``'s own draws in a run seeded ``seed`` (a 31-bit mix of both)."""
    return (seed * 1_000_003 + index * 7_919 + 104_729) % (2**31 - 1)


def device_rng(device: torch.device):
    """``torch.random.fork_rng`` for the CPU and, on CUDA, that device: draws inside leave the global state as it was."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
