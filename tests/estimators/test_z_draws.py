"""The z draws of ``latent_mi``: independent, antithetic and randomised quasi-Monte Carlo noise."""

from __future__ import annotations

import pytest
import torch

from vtrans.errors import ConfigError
from vtrans.estimators.latent import z_noise
from vtrans.evaluation.evaluate import EvalConfig


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("draws", ["random", "antithetic", "sobol"])
def test_noise_has_its_shape_is_reproducible_and_standard_normal(draws):
    eps = z_noise(64, 32, 8, gen(0), draws)
    assert eps.shape == (64, 32, 8) and torch.isfinite(eps).all()
    assert torch.equal(eps, z_noise(64, 32, 8, gen(0), draws))
    assert not torch.equal(eps, z_noise(64, 32, 8, gen(1), draws))
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1) < 0.05
    assert not torch.equal(eps[0], eps[1])  # every item gets its own draws


def test_antithetic_pairs_cancel():
    eps = z_noise(3, 6, 4, gen(0), "antithetic")
    torch.testing.assert_close(eps[:, :3], -eps[:, 3:])
    assert z_noise(3, 5, 4, gen(0), "antithetic").shape == (3, 5, 4)  # odd S: one unpaired draw


def test_sobol_estimates_a_mean_with_less_spread_than_independent_draws():
    """The per-item sample mean of ε (true value 0) over S = 32 draws: QMC is far tighter."""
    spread = {d: z_noise(2000, 32, 4, gen(0), d).mean(1).std().item() for d in ("random", "sobol")}
    assert spread["random"] == pytest.approx(1 / 32**0.5, rel=0.1)
    assert spread["sobol"] < 0.5 * spread["random"]


def test_unknown_draws_are_refused():
    with pytest.raises(ConfigError, match="z_draws"):
        EvalConfig(z_draws="halton")
    with pytest.raises(ValueError, match="draws"):
        z_noise(1, 2, 2, gen(0), "halton")
