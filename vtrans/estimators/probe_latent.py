"""``probe_latent``: the probe with the latent's own prediction of ŷ among its features.

The probe (``vtrans.estimators.probe``) reads the latent through its spread alone
(``posterior_var``, ``latent_kl``). This one adds ``adapter_nll``, the latent's surprise at ŷ with
z at its mean: one more pass of the upper blocks over the suffix, and the latent's strongest
single signal (it scores as ``latent_nll`` does). Its question: do the base model's own features
(lens trajectory, entropy, msp, attention) add to the latent's prediction, or does the latent
already hold what they know? Fitted and cross-fitted as the probe is, on items out-of-sample for
the latent that gives its features.
"""

from __future__ import annotations

import torch

from vtrans.estimators import probe
from vtrans.estimators.base import Family, Fitted, Predict, Shown

FEATURES = (*probe.FEATURES, "adapter_nll")


def fit_on(scores: dict[str, torch.Tensor], errors: torch.Tensor) -> Predict:
    """The family's ``fit``: the logistic probe on :data:`FEATURES`.

    Raises:
        ValueError: ``adapter_nll`` is not among the scores (no latent gave it): this would be
            the probe under another name.
    """
    if "adapter_nll" not in scores:
        raise ValueError("probe_latent reads the latent's adapter_nll, which was not computed (no latent)")
    return probe.fit_on(scores, errors, FEATURES)


FAMILY = Family(
    "probe_latent",
    {"probe_latent": "the probe with the latent's prediction of ŷ (adapter_nll) added to its features"},
    None,
    needs=frozenset({"latent"}),
    reads_forward=False,
    fitted=Fitted("labelled items held out from the scored ones", fit_on, FEATURES),
    shown=Shown(default_score=False, prose={"cost": "the probe with the latent's prediction"}),
)
