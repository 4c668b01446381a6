"""``probe_latent``: the probe's features plus the latent's ``adapter_nll``, fitted as the probe is."""

from __future__ import annotations

import pytest
import torch

from vtrans.estimators import probe, probe_latent, registry
from vtrans.evaluation import metrics
from vtrans.evaluation.fitted import cross_fitted


def _scores(n: int = 240, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every probe feature pure noise but ``adapter_nll``, which follows the errors."""
    gen = torch.Generator().manual_seed(seed)
    errors = (torch.rand(n, generator=gen) < 0.4).float()
    scores = {key: torch.randn(n, generator=gen) for key in probe.FEATURES if key != "lens_ce_by_layer"}
    scores["lens_ce_by_layer"] = torch.randn(n, 5, generator=gen)
    scores["adapter_nll"] = errors + 0.3 * torch.randn(n, generator=gen)
    return scores, errors


def test_it_is_the_probe_fitted_on_the_probes_features_and_adapter_nll():
    scores, errors = _scores()
    x, names = probe.features(scores, (*probe.FEATURES, "adapter_nll"))
    assert names[-1] == "adapter_nll" and x.shape == (240, 5 + 5 + 1)  # 5 lens layers, 5 single features, adapter_nll
    reference = probe.fit(x, errors, names)  # the probe's own fit on those columns, by hand
    got = probe_latent.fit_on(scores, errors)(scores)
    torch.testing.assert_close(got, reference.predict(x), rtol=0, atol=0)  # the same fit, the same float ops


def test_where_only_the_latent_knows_it_rises_above_the_probe():
    """A constructed case: the base model's features are noise, the latent's prediction is not."""
    scores, errors = _scores()
    folds = [i % 4 for i in range(len(errors))]
    correct = [not bool(e) for e in errors]
    with_latent = cross_fitted(registry.family_of("probe_latent"), scores, correct, folds, 4)
    without = cross_fitted(registry.family_of("probe"), scores, correct, folds, 4)
    assert metrics.auroc(with_latent.numpy(), errors.numpy()) > 0.95
    assert metrics.auroc(without.numpy(), errors.numpy()) < 0.65


def test_without_a_latent_it_is_refused_not_the_probe_under_another_name():
    scores, errors = _scores()
    del scores["adapter_nll"]
    with pytest.raises(ValueError, match="adapter_nll"):
        probe_latent.fit_on(scores, errors)
    assert registry.why_not("probe_latent") == "needs a trained latent (--ckpt)"
    assert "adapter_nll" in registry.computed(["probe_latent"])  # a run that asks for it computes its features
