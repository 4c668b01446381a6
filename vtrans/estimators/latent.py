"""Estimators read off the trained latent.

* ``posterior_var``: mean variance of the inference distribution of z at the scored position
  (q(z|prompt) for the standard prior, the learned p(z|prompt) for the conditional one);
* ``latent_mi``: mutual information between the next token and z over S samples,
  H(E_z p(·|prompt, z)) − E_z H(p(·|prompt, z));
* ``latent_nll``: −log E_z p(ŷ|prompt, z) over the same S samples: the latent predictive's
  surprise at the model's own answer, its total uncertainty (the output's and z's together)
  where ``latent_mi`` is z's share alone;
* ``latent_kl`` (conditional prior only): KL(q(z|prompt, ŷ) ‖ p(z|prompt)), how much the
  model's own answer surprises the prior.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from vtrans.backbone import architectures, attention
from vtrans.backbone.frozen import FrozenPrefix
from vtrans.backbone.tokens import Encoded
from vtrans.config import EstimatorConfig, ZDraws
from vtrans.estimators.base import Context, Family, Forward, Shown, context_for, item_seed, run_forward
from vtrans.estimators.common import head_predictive_stats
from vtrans.latent.gaussian import kl_normal


def inference_distribution(module, h: torch.Tensor, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc, scale) of z at inference: q(z|prompt) (standard) or p(z|prompt) (conditional)."""
    h_scored, _ = module.states(h, enc)
    if module.latent.prior == "standard":
        return module.latent.posterior(h_scored)
    return module.latent.prior_params(h_scored)


def layer_state(forward: Forward, module) -> torch.Tensor:
    """The stream after block k (B, T, C), what the latent's encoders read: ``hidden_states[k]`` of the shared forward."""
    return forward.hidden_states[module.layer]


def read_encoders(forward: Forward, context: Context) -> dict[str, torch.Tensor]:
    """``posterior_var`` and (conditional prior) ``latent_kl``, from the encoders alone: no z samples.

    ``latent_kl`` reads q(z|prompt, ŷ) at the last completion token, as in training, so the
    runner encodes the whole completion word when it is asked for.
    """
    module, enc = context.module, forward.enc
    h = layer_state(forward, module)
    _, scale = inference_distribution(module, h, enc)
    result = {"posterior_var": scale.pow(2).mean(-1)}
    if module.latent.prior == "conditional":
        q_loc, q_scale, p_loc, p_scale = module.distributions(h, enc)
        result["latent_kl"] = kl_normal(q_loc, q_scale, p_loc, p_scale).sum(-1)
    return result


def read_samples(forward: Forward, context: Context) -> dict[str, torch.Tensor]:
    """``latent_mi`` and ``latent_nll`` over S samples of z; each item's noise comes from its own seed."""
    module, enc, cfg = context.module, forward.enc, context.config
    h = layer_state(forward, module)
    loc, scale = inference_distribution(module, h, enc)
    eps = item_noise(context.indices, cfg.samples, loc.shape[1], cfg.seed, cfg.z_draws).to(loc)
    z = loc.unsqueeze(1) + scale.unsqueeze(1) * eps  # (B, S, d_z)
    model, y = module.backbone.model, forward.y
    unembed, cap = architectures.unembedding(model), architectures.logit_softcap(model)
    parts = [
        head_predictive_stats(state, unembed.weight, getattr(unembed, "bias", None), y[part], cap)
        for part, state in sample_states(module, h, enc, forward.cache, z)
    ]
    return {"latent_mi": torch.cat([p["mi"] for p in parts]), "latent_nll": torch.cat([p["nll"] for p in parts])}


def item_noise(indices: list[int], samples: int, d_z: int, seed: int, draws: ZDraws = "random") -> torch.Tensor:
    """(B, S, d_z) standard-normal noise on the CPU, item ``indices[b]``'s from its own seed.

    An item's draws depend on the run's seed and its index only, not on the batch it falls
    in, the batch size, the device or how many processes share the run.
    """
    return torch.cat(
        [z_noise(1, samples, d_z, torch.Generator().manual_seed(item_seed(seed, i)), draws) for i in indices]
    )


def z_noise(
    items: int, samples: int, d_z: int, generator: torch.Generator, draws: ZDraws = "random"
) -> torch.Tensor:
    """(items, samples, d_z) standard-normal noise for z = loc + scale·ε.

    ``random``: independent draws. ``antithetic``: pairs ε, −ε (the odd moments of each pair
    cancel). ``sobol``: a scrambled Sobol point set mapped through the normal quantile, shifted
    by a random offset modulo 1 per item (a randomised quasi-Monte Carlo rule: unbiased, and the
    S points cover the space more evenly than independent ones).
    """
    device = generator.device
    if draws == "random":
        return torch.randn((items, samples, d_z), generator=generator, device=device)
    if draws == "antithetic":
        half = torch.randn((items, (samples + 1) // 2, d_z), generator=generator, device=device)
        return torch.cat([half, -half], 1)[:, :samples]
    if draws == "sobol":
        scramble_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device))
        points = torch.quasirandom.SobolEngine(d_z, scramble=True, seed=scramble_seed).draw(samples)  # (S, d_z)
        shift = torch.rand((items, 1, d_z), generator=generator, device=device)
        u = (points.to(device).unsqueeze(0) + shift) % 1.0  # (items, S, d_z)
        u = u.clamp(1e-6, 1 - 1e-6)
        return torch.special.ndtri(u)
    raise ValueError(f"draws must be random, antithetic or sobol, got {draws!r}")


def sample_logits(
    module, h: torch.Tensor, enc: Encoded, cache, z: torch.Tensor, rows_per_chunk: int | None = None
) -> torch.Tensor:
    """Next-token logits at the scored position for each sample of z, (B, S, V) (see :func:`sample_chunks`)."""
    return torch.cat([logits for _, logits in sample_chunks(module, h, enc, cache, z, rows_per_chunk)])


def chunk_rows(vocab: int, max_logits: int = 1 << 25, most: int = 512) -> int:
    """How many items × samples :func:`sample_chunks` runs at once: ``most``, fewer where the
    vocabulary is large, so that a chunk's logits stay within ``max_logits`` (32 Mi: 128 MiB in
    float32). SmolLM2 (49,152 tokens) and GPT-2 (50,257) run 512 rows; Gemma 3 (262,144) 128."""
    return max(1, min(most, max_logits // vocab))


@torch.no_grad()
def sample_chunks(
    module, h: torch.Tensor, enc: Encoded, cache, z: torch.Tensor, rows_per_chunk: int | None = None
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Next-token logits at the scored position for each sample of z, item chunk by item chunk:
    ``(items, (n, S, V))`` pairs of at most ``rows_per_chunk`` rows (but one item's S samples at
    least), so memory stays bounded whatever the batch and the vocabulary. The head applied to
    :func:`sample_states`, soft-capped as the model's logits are.
    """
    model = module.backbone.model
    unembed, cap = architectures.unembedding(model), architectures.logit_softcap(model)
    for part, state in sample_states(module, h, enc, cache, z, rows_per_chunk):
        yield part, architectures.softcap(unembed(state), cap).float()


@torch.no_grad()
def sample_states(
    module, h: torch.Tensor, enc: Encoded, cache, z: torch.Tensor, rows_per_chunk: int | None = None
) -> Iterator[tuple[slice, torch.Tensor]]:
    """The last hidden state (after the final norm) at the scored position for each sample of z,
    item chunk by item chunk: ``(items, (n, S, C))`` pairs, chunked as :func:`sample_chunks` is.
    The head is left to the caller, which may apply it a vocabulary block at a time.

    Only the scored position runs again, once per sample, through the blocks above the latent.
    Everything before it does not depend on z: its keys and values are the shared forward's
    (``cache``), read in place by every sample. The S samples of an item are S queries of one
    sequence that each see the prompt's keys and their own, never each other's, so the prefix
    is neither recomputed nor repeated per sample.

    Args:
        h: (B, T, C) the stream after block k.
        cache: the shared forward's keys and values (every block).
        z: (B, S, d_z) the samples.
        rows_per_chunk: items × samples run at once; default :func:`chunk_rows` of the vocabulary.
    """
    model = module.backbone.model
    if rows_per_chunk is None:
        rows_per_chunk = chunk_rows(architectures.unembedding(model).weight.shape[0])
    batch, samples, _ = z.shape
    width = enc.input_ids.shape[1]
    rows = torch.arange(batch, device=h.device)
    scored_state = h[rows, enc.scored]  # (B, C)
    position = enc.position_ids[rows, enc.scored]  # (B,)
    keys = torch.arange(width, device=h.device)
    before = enc.attention_mask.bool() & (keys.unsqueeze(0) < enc.scored.unsqueeze(1))  # (B, T): what the scored token sees
    own = torch.eye(samples, dtype=torch.bool, device=h.device)  # each sample sees itself only
    layers = range(module.layer, architectures.n_layers(model))
    kv = {i: (cache.layers[i].keys, cache.layers[i].values) for i in layers}
    step = max(1, rows_per_chunk // samples)
    for start in range(0, batch, step):
        part = slice(start, min(start + step, batch))
        n = part.stop - part.start
        stream = module.latent.inject(
            scored_state[part].repeat_interleave(samples, 0).unsqueeze(1),  # (n*S, 1, C)
            z[part].flatten(0, 1),
            torch.ones(n * samples, 1, dtype=torch.bool, device=h.device),
        ).view(n, samples, -1)  # (n, S, C)
        allowed = torch.cat([before[part].unsqueeze(1).expand(n, samples, width), own.expand(n, -1, -1)], -1)
        queries = position[part].unsqueeze(1).expand(n, samples)  # (n, S): every sample is the scored position
        keys = torch.cat([enc.position_ids[part], queries], 1)  # (n, T + S)
        mask = attention.attention_mask(model, allowed, queries, keys, stream.dtype)  # (n, 1, S, T + S) each
        prefix = FrozenPrefix({i: (k[part], v[part]) for i, (k, v) in kv.items()}, width)
        with architectures.blocks_from(model, module.layer) as upper:
            state = architectures.trunk(upper)(
                inputs_embeds=stream,
                attention_mask=mask,
                position_ids=queries,
                cache=prefix,
                use_cache=False,
            ).last_hidden_state  # (n, S, C)
        yield part, state


def scores(
    module,
    enc: Encoded,
    samples: int = 32,
    seed: int = 0,
    mi: bool = True,
    draws: ZDraws = "random",
    indices: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Every latent estimator on one batch, with a forward of its own (tests and one-off use).

    Args:
        mi: also ``latent_mi`` and ``latent_nll`` (S samples of z); ``False``: the encoders only.
        indices: each item's index in the run, the seed of its z noise (default 0..B-1).
    """
    model = module.backbone.model
    n = enc.input_ids.shape[0]
    config = EstimatorConfig(samples=samples, seed=seed, z_draws=draws)
    context = context_for(model, config, module, n, indices=indices if indices is not None else list(range(n)))
    forward = run_forward(model, enc, hidden_states=True, cache=mi)
    result = read_encoders(forward, context)
    if mi:
        result.update(read_samples(forward, context))
    return result


ENCODERS = Family(
    "latent",
    {
        "posterior_var": "mean variance of z's inference distribution at the scored position",
        "latent_kl": "KL(q(z|prompt, ŷ) ‖ p(z|prompt)): how much the model's own answer surprises the prior",
    },
    read_encoders,
    needs=frozenset({"latent", "variational", "hidden_states"}),
    name_needs={"latent_kl": frozenset({"conditional_prior", "whole_word"})},
)
SAMPLES = Family(
    "latent_mi",
    {
        "latent_mi": "mutual information between the next token and z over S samples",
        "latent_nll": "−log E_z p(ŷ|prompt, z) over S samples: the latent predictive's surprise at ŷ",
    },
    read_samples,
    needs=frozenset({"latent", "variational", "hidden_states", "cache"}),
    extra_passes=True,
    first_token_only=True,
    shown=Shown(prose={"cost": "`latent_mi` and `latent_nll` (the z samples of the scored position)"}),
)
