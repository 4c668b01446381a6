"""The latent: a Gaussian z between two blocks of the frozen backbone, its ELBO and its training.

* ``gaussian``: the latent distribution (encoders for q(z|x) and p(z|prompt), the injection into
  the stream); its names are importable from ``vtrans.latent`` itself;
* ``model``: ``LatentModel``, the latent and its backbone in one module, to score with, with its
  settings and its save and load; ``saved``, the files it is saved as (``save_pretrained`` folders);
* ``elbo``, ``module``: the ELBO as a Pyro model and guide, and ``LatentLM``, the LightningModule
  that holds the ``LatentModel`` it trains;
* ``laplace``: a Laplace posterior over the prior network's output weights, fitted after training;
* ``training``, ``datamodule``, ``callbacks``: a training run (LightningCLI), its data and its safeguards;
* ``checkpoint``, ``checkpoint_io``: reading checkpoints safely to score, writing them atomically in training.
"""

from vtrans.latent.gaussian import PRIORS, GaussianHead, GaussianLatent, Prior, kl_normal

__all__ = ["PRIORS", "GaussianHead", "GaussianLatent", "Prior", "kl_normal"]
