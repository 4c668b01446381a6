"""What a set of estimator names runs, and how the families read one batch.

:func:`runnable` keeps the names that apply to a run (its latent, its prior, the aggregate, the
ensemble's members), a fitted one replaced by the estimators that give its features. A
:class:`Plan` says which families run, which of their keys are kept, and what the shared forward
must keep for them (every layer's stream, the attention weights, the keys and values); it gives
the targets each batch is encoded with and reads the families' scores off that batch's forward.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from vtrans.backbone.architectures import attention_implementation
from vtrans.backbone.generate import Completion
from vtrans.estimators import registry
from vtrans.estimators.base import Context, Forward


def runnable(names: Sequence[str], module, aggregate: str, members: int, posteriors: Collection[str] = ()) -> list[str]:
    """``names`` that apply to a run with ``module`` (a latent or None), the ``aggregate``,
    ``members`` latents and the ``posteriors`` fitted on the latent, a fitted one replaced by the
    estimators that give its features (``registry.computed``)."""
    return [n for n in registry.computed(names) if registry.why_not(n, module, aggregate, members, posteriors) is None]


@dataclass
class Plan:
    """What a set of estimator names runs: its families, the keys kept, what the forward keeps.

    ``kept``: the forward's ``hidden_states``, ``attentions`` and ``cache`` flags (the keyword
    arguments of ``run_forward`` and ``generate_batch``).
    """

    families: list
    keep: set[str]
    needs: set[str]
    whole_word: bool
    forward_needed: bool
    kept: dict[str, bool]

    @classmethod
    def of(cls, names: Sequence[str], aggregate: str) -> Plan:
        """The plan of runnable ``names`` (:func:`runnable`) under the ``aggregate`` of the run."""
        families = [f for f in registry.FAMILIES if any(n in f.names or n in f.features for n in names)]
        needs = set().union(*(f.needs_of(n) for f in families for n in (*f.names, *f.features) if n in names))
        forward_needed = any(f.reads_forward_of(names) for f in families)
        return cls(
            families,
            set(names) | set(registry.fields()) | {key for f in families for key in f.tokens},
            needs,
            "whole_word" in needs or aggregate != "first",
            forward_needed,
            {what: forward_needed and what in needs for what in ("hidden_states", "attentions", "cache")},
        )

    def targets(self, completions: Sequence[Completion]) -> list[list[int]]:
        """The target ids of each completion: its whole word where a family reads it, else ŷ."""
        return [list(c.word_ids) if self.whole_word else [c.first_token] for c in completions]

    def read(
        self, forward: Forward | None, context: Context, seconds: dict[str, float], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Every planned family's scores of one batch (on the CPU), each timed into ``seconds``."""
        out: dict[str, torch.Tensor] = {}
        for family in self.families:
            t0 = time.perf_counter()
            for key, value in family.read(forward, context).items():
                if key in self.keep:
                    out[key] = value.detach().float().cpu()
            sync(device)
            key = family.name if family.extra_passes else "shared"
            seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0
        return out

    def attention(self, model):
        """Eager attention while a family reads the attention weights (SDPA returns none)."""
        return attention_implementation(model, "eager" if "attentions" in self.needs else None)


def sync(device: torch.device) -> None:
    """Wait for the device's work to finish (CUDA), so that what was timed is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
