"""An ensemble of M independently seeded latents: the spread of their predictions.

Each member m is a latent trained from its own seed on the same items (``vtrans crossval
--ensemble M``); it predicts the scored position with z at its mean, p_m(·) = p(·|prompt,
z = m_m(prompt)) (see ``vtrans.estimators.adapter``), so what varies across members is the
weights alone, as in a deep ensemble (Lakshminarayanan et al., 2017):

* ``ensemble_nll``: −log (1/M) Σ_m p_m(ŷ), the ensemble predictive's surprise at ŷ (its mean);
* ``ensemble_var``: the variance over members of log p_m(ŷ): how much they disagree about ŷ;
* ``ensemble_mi``: the mutual information between the next token and the member,
  (1/M) Σ_m KL(p_m ‖ p̄), their disagreement over the whole vocabulary (the ensemble's
  epistemic part).
"""

from __future__ import annotations

import torch

from vtrans.estimators.adapter import logits_at_mean
from vtrans.estimators.base import Context, Family, Forward, Shown
from vtrans.estimators.common import predictive_stats


def member_logits(members, forward: Forward) -> torch.Tensor:
    """(B, M, V) each member's next-token logits at the scored position, z at its mean."""
    return torch.cat([logits_at_mean(module, forward) for module in members], 1)


def ensemble_stats(logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three scores from (B, M, V) member logits and (B,) ŷ: ``predictive_stats`` over the
    members (float64, a few items at a time on a CPU; see there why the MI is a mean KL)."""
    stats = predictive_stats(logits, y)
    return {"ensemble_nll": stats["nll"], "ensemble_var": stats["log_var"], "ensemble_mi": stats["mi"]}


def read(forward: Forward, context: Context) -> dict[str, torch.Tensor]:
    logits = member_logits(context.members, forward)
    return ensemble_stats(logits, forward.y.to(logits.device))


FAMILY = Family(
    "ensemble",
    {
        "ensemble_nll": "−log of the ensemble's mean p(ŷ), each member's z at its mean",
        "ensemble_var": "variance over the ensemble's members of log p(ŷ)",
        "ensemble_mi": "mutual information between the next token and the member (mean KL from the ensemble's predictive)",
    },
    read,
    needs=frozenset({"latent", "ensemble", "hidden_states", "cache"}),
    extra_passes=True,
    first_token_only=True,
    shown=Shown(default_score=False),
)
