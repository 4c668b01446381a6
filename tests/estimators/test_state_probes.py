"""``state_probe``, ``state_probe_latent`` and ``se_probe``: the residual state at the scored
position, fits against scikit-learn's, settings chosen on inner folds, constructed cases."""

from __future__ import annotations

import pytest
import torch
from sklearn.linear_model import LogisticRegression, Ridge  # a dev dependency: the reference fits
from sklearn.metrics import roc_auc_score

from vtrans.backbone.loading import Backbone
from vtrans.backbone.tokens import encode, slot_positions
from vtrans.estimators import probe, registry, se_probe, state_probe, states
from vtrans.estimators.base import run_forward
from vtrans.estimators.plan import Plan
from vtrans.evaluation import metrics
from vtrans.evaluation.fitted import cross_fitted


def test_the_inner_folds_auroc_is_the_mann_whitney_one_with_ties_counted_half():
    """Scores on a grid of 5 values, so that ties between classes are common; the AUROC is a ratio
    of integer counts (exact in double precision), so the tolerance only absorbs the last bit."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 5, (300,), generator=gen).float()
    errors = (torch.rand(300, generator=gen) < 0.3).float()
    assert state_probe.auroc(scores, errors) == pytest.approx(roc_auc_score(errors, scores), abs=1e-12)


def _states(n: int = 200, c: int = 12, seed: int = 0, depth: int = 2) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Four depths of noise; at ``depth`` one direction follows the errors."""
    gen = torch.Generator().manual_seed(seed)
    errors = (torch.rand(n, generator=gen) < 0.4).float()
    x = torch.randn(n, 4, c, generator=gen)
    x[:, depth, 3] += 2.0 * errors
    return {"residual_states": x}, errors


def test_the_states_are_the_hidden_states_at_the_scored_position_at_fixed_depths():
    gpt2 = Backbone("tiny-gpt2")
    enc = encode(gpt2.tokenizer, ["the early bird", "a piece of"], [[5, 7], [9]], gpt2.device)
    forward = run_forward(gpt2.model, enc, hidden_states=True)
    got = states.read(forward, None)["residual_states"]
    assert states.layers(4) == [1, 2, 3, 4] and states.layers(24) == [6, 12, 18, 24]
    assert got.shape == (2, 4, gpt2.model.config.n_embd)
    for j, layer in enumerate(states.layers(4)):
        torch.testing.assert_close(got[:, j], forward.first_slot(slot_positions(forward.hidden_states[layer], enc)))
    # a run keeps them only when asked for them by key, and a fitted family's run asks for them
    assert "residual_states" in Plan.of(["residual_states"], "first").keep
    assert "residual_states" not in Plan.of(["msp", "lens_ce"], "first").keep
    assert "residual_states" in registry.computed(["state_probe"]) and "residual_states" not in registry.fields()


@pytest.mark.parametrize("standardise", [True, False])
def test_the_logistic_fit_is_scikit_learns_with_c_of_one_over_two_l2(standardise):
    """Both minimise the same convex loss; 1e-3 on probabilities is far above L-BFGS's and
    lbfgs's convergence error (tol 1e-10) on 200 rows of 12 features, on any thread count."""
    data, errors = _states()
    x = data["residual_states"][:, 2]
    l2 = 10.0
    ours = probe.fit(x, errors, [], l2=l2, standardise=standardise).predict(x)
    z = ((x - x.mean(0)) / x.std(0)) if standardise else x
    ref = LogisticRegression(C=1 / (2 * l2), tol=1e-10, max_iter=10_000).fit(z.double().numpy(), errors.numpy())
    torch.testing.assert_close(ours.double(), torch.from_numpy(ref.predict_proba(z.double().numpy())[:, 1]), atol=1e-3, rtol=0)


def test_the_ridge_fit_is_scikit_learns():
    data, _ = _states(c=12)
    x = data["residual_states"][:, 1]
    y = x[:, 0] * 0.5 - x[:, 5] + 0.1 * torch.randn(len(x), generator=torch.Generator().manual_seed(1))
    z = ((x - x.mean(0)) / x.std(0)).double()
    ref = Ridge(alpha=10.0).fit(z.numpy(), y.double().numpy())  # float64 both: agreement to float32 rounding
    torch.testing.assert_close(se_probe.ridge(x, y, 10.0, True)(x), torch.from_numpy(ref.predict(z.numpy())).float(), atol=1e-4, rtol=0)


def test_the_depth_that_knows_is_chosen_on_inner_folds_and_the_probe_rises_with_it():
    data, errors = _states(depth=2)
    chosen = state_probe.choose(data, errors)
    assert chosen["depth"] == 2 and chosen["auroc"] > 0.8
    folds, correct = [i % 5 for i in range(len(errors))], [not bool(e) for e in errors]
    scores = cross_fitted(registry.family_of("state_probe"), data, correct, folds, 5)
    assert metrics.auroc(scores.numpy(), errors.numpy()) > 0.8
    # the score rises as an item's state moves along the direction that carries the errors
    predict = state_probe.fit_on(data, errors)
    moved = data["residual_states"][:1].repeat(3, 1, 1)
    moved[:, 2, 3] += torch.tensor([0.0, 1.0, 2.0])
    got = predict({"residual_states": moved})
    assert got[0] < got[1] < got[2]


def test_with_the_latent_it_rises_where_only_the_latent_knows_and_is_refused_without_one():
    data, errors = _states(depth=2)
    data["residual_states"][:, 2, 3] = torch.randn(len(errors))  # the states know nothing now
    data["adapter_nll"] = errors + 0.3 * torch.randn(len(errors), generator=torch.Generator().manual_seed(2))
    folds, correct = [i % 5 for i in range(len(errors))], [not bool(e) for e in errors]
    with_latent = cross_fitted(registry.family_of("state_probe_latent"), data, correct, folds, 5)
    without = cross_fitted(registry.family_of("state_probe"), data, correct, folds, 5)
    assert metrics.auroc(with_latent.numpy(), errors.numpy()) > 0.9 > 0.7 > metrics.auroc(without.numpy(), errors.numpy())
    del data["adapter_nll"]
    with pytest.raises(ValueError, match="adapter_nll"):
        state_probe.fit_with_latent(data, errors)


def test_the_se_probe_reads_no_labels_and_predicts_the_entropy_from_the_state():
    data, errors = _states(depth=1)
    entropy = data["residual_states"][:, 1, 0] * 0.7 + 0.05 * torch.randn(len(errors), generator=torch.Generator().manual_seed(3))
    fit = {**data, "sample_word_entropy": entropy}
    one = se_probe.fit_on(fit, errors)(data)
    other = se_probe.fit_on(fit, 1 - errors)(data)  # other labels: the same map
    torch.testing.assert_close(one, other, rtol=0, atol=0)
    assert torch.corrcoef(torch.stack([one, entropy]))[0, 1] > 0.95
    assert se_probe.choose(data["residual_states"], entropy)["depth"] == 1
    # a run that fits it computes the entropy for the items it is fitted on, not for the scored ones
    assert "sample_word_entropy" not in registry.computed(["se_probe"])
    assert "sample_word_entropy" in registry.computed(["se_probe"], fitting=True)
