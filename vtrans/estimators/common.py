"""Small tensor helpers shared by the estimator families."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vtrans.backbone.architectures import softcap


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) over the last axis."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_of_probs(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of a probability vector over the last axis (0·log 0 = 0)."""
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)


def log_partition(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    max_logits: int = 1 << 26,
    logits_per_block: int = 1 << 21,
    cap: float | None = None,
) -> torch.Tensor:
    """log Σ_v exp(W_v·h + b_v) of a linear head, (rows,) float32, vocabulary block by vocabulary block.

    The (rows, V) logits never exist at once: each block's ``logsumexp`` is folded into a running
    one (``logaddexp``), so only a (rows, block) piece is ever written. On a CPU, writing the whole
    matrix to memory and reading it back (``logsumexp`` reads it several times) is a third of a
    full unembedding's time; a piece of about ``logits_per_block`` numbers (8 MiB in float32)
    stays in cache. Blocks are 512 to 4096 columns wide, the most that keep to that size (SmolLM2's head on 960 rows, 2 CPU cores: 370 ms in blocks
    of 2048, 530 ms for the full logits; 1024 to 2048 measured best at 960 to 3840 rows, smaller
    blocks suffer most when other processes share the cores). Logits are computed in the head's
    dtype and summed in float32.

    Args:
        h: (rows, C) inputs of the head.
        weight: (V, C) and ``bias`` (V,) the head.
        max_logits: the most logits held at once; more rows than it allows run in chunks.
        logits_per_block: the size of a block in logits, which sets its width from the rows.
        cap: the logits are soft-capped, cap · tanh(logit / cap), before they are summed (Gemma 2's
            head); None: not.
    """
    rows, vocab = h.shape[0], weight.shape[0]
    block = min(4096, max(512, logits_per_block // max(rows, 1) // 512 * 512), vocab)
    step = max(1, max_logits // block)
    parts = []
    for r in range(0, rows, step):
        log_z = None
        for a in range(0, vocab, block):
            logits = F.linear(h[r : r + step], weight[a : a + block], None if bias is None else bias[a : a + block])
            part = softcap(logits, cap).float().logsumexp(-1)  # (step,)
            log_z = part if log_z is None else torch.logaddexp(log_z, part)
        parts.append(log_z)
    return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)


def linear_at(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor, cap: float | None = None
) -> torch.Tensor:
    """The logit of ``ids`` only, W_id·h + b_id, (...,) float32, without the other V − 1.

    Summed in float32 and rounded to the head's dtype, as the matrix product rounds every logit:
    with a bf16 or fp16 head, log Z − logit then stays ≥ 0 where p ≈ 1 (left unrounded, it came
    out at −0.1 at a confident argmax).

    Args:
        h: (..., C) inputs of the head.
        ids: (...) one vocabulary index per input.
        cap: soft-capped as in :func:`log_partition`, in the head's dtype as the model does it.
    """
    logit = torch.einsum("...c,...c->...", h.float(), weight[ids].float())  # (...)
    if bias is not None:
        logit = logit + bias[ids].float()
    return softcap(logit.to(weight.dtype), cap).float()


def predictive_stats(
    logits: torch.Tensor, y: torch.Tensor, logits_per_chunk: int = 1 << 20, max_logits: int = 1 << 26
) -> dict[str, torch.Tensor]:
    """Spread of predictions over samples.

    On a CPU, items are read a few at a time, about ``logits_per_chunk`` numbers (8 MiB in
    float32): the passes over an item's (S, V) logits then read from cache, not memory
    (SmolLM2, 16 items × 32 samples: 150 ms in one piece, 50 ms an item at a time). A GPU
    takes up to ``max_logits`` at once (64 Mi; the float64 copies of each are 512 MiB), in as few
    sets of kernels as that allows: a batch of SmolLM2's in one piece, Gemma 3's 5× larger
    vocabulary in several.

    Args:
        logits: (B, S, V) one next-token distribution per sample.
        y: (B,) the generated token ŷ.

    Returns:
        var: variance over samples of p(ŷ); log_var: variance over samples of log p(ŷ); entropy: H(mean p); mi: H(mean p) − mean H(p) (BALD);
        nll: −log mean p(ŷ), the surprise of the averaged predictive at ŷ (taken in log space).
    """
    batch, samples, vocab = logits.shape
    step = max(1, (logits_per_chunk if logits.device.type == "cpu" else max_logits) // (samples * vocab))
    if step >= batch:
        return _predictive_stats(logits, y)
    parts = [_predictive_stats(logits[a : a + step], y[a : a + step]) for a in range(0, batch, step)]
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def _predictive_stats(logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`predictive_stats` of (B, S, V) logits in one piece.

    The mutual information is taken as the mean KL divergence of each sample's distribution
    from the mean one, E_s KL(p_s ‖ p̄) = H(p̄) − E_s H(p_s), a sum of terms that vanish with
    the spread, rather than as the difference of two entropies of several nats each, and in
    float64: written as that difference in float32, an MI of 3e-3 kept only 3 or 4 digits, and
    which ones depended on the CPU's summation order.

    One exponential per logit: p_s = exp(l − max) / Z_s, and log p_s = l − max − log Z_s is
    read off the same pass, with no second ``exp`` of it; log p̄ is a logarithm of the V means,
    not a log-sum-exp over the S × V logits. (A mean that underflows to 0 is clamped to the
    smallest float64, where every p_s it averages is 0 too, so its terms stay 0.)
    """
    samples = logits.shape[1]
    x = logits.double()  # (B, S, V), a copy: worked on in place below
    top = x.amax(-1, keepdim=True)  # (B, S, 1)
    probs = x.sub_(top).exp()  # (B, S, V): exp(l − max), normalised below
    log_z = probs.sum(-1, keepdim=True).log_()  # (B, S, 1)
    probs.div_(log_z.exp())  # p_s
    logp = x.sub_(log_z)  # (B, S, V): log p_s
    mean = probs.mean(1)  # (B, V): p̄
    log_mean = mean.clamp_min(torch.finfo(torch.float64).tiny).log()  # (B, V): log p̄
    logp_y = logp.gather(-1, y.view(-1, 1, 1).expand(-1, samples, 1)).squeeze(-1)  # (B, S)
    kl = (probs * (logp - log_mean.unsqueeze(1))).sum(-1)  # (B, S): KL(p_s ‖ p̄) ≥ 0
    return _summaries(logp_y, -(mean * log_mean).sum(-1), kl)


def _summaries(logp_y: torch.Tensor, entropy: torch.Tensor, kl: torch.Tensor) -> dict[str, torch.Tensor]:
    """The statistics of :func:`predictive_stats` from (B, S) log p_s(ŷ), (B,) H(p̄) and (B, S) KL(p_s ‖ p̄), float64."""
    return {
        "var": logp_y.exp().var(1, unbiased=False).float(),
        "log_var": logp_y.var(1, unbiased=False).float(),
        "entropy": entropy.float(),
        "mi": kl.mean(1).clamp_min(0.0).float(),
        "nll": (math.log(logp_y.shape[1]) - torch.logsumexp(logp_y, dim=1)).float(),
    }


def head_predictive_stats(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    cap: float | None = None,
    logits_per_block: int = 1 << 20,
) -> dict[str, torch.Tensor]:
    """:func:`predictive_stats` of the logits softcap(W·h + b) of a linear head, vocabulary block by block.

    The same statistics, in float64 from the same float32 logits, without a (B, S, V) float64
    tensor or its temporaries: on a CPU those, written to memory and read back pass after pass,
    cost as much as the head's product itself. Each block of about ``logits_per_block`` logits
    (4 MiB in float32) is worked on while it is in cache. Pass 1 computes a block's logits,
    keeps them (float32, the size of the logits the model would return) and folds the block
    into a running max and Σ exp(l − max) per sample; pass 2 reads each block again with
    log Z_s known: log p_s, p_s (one exponential per logit in each pass), p̄, log p̄, and the
    sums of H(p̄) and KL(p_s ‖ p̄) (see :func:`_predictive_stats`).

    Args:
        h: (B, S, C) inputs of the head, one per sample.
        weight: (V, C) and ``bias`` (V,) the head; logits are computed in its dtype, as the model does.
        y: (B,) the generated token ŷ.
        cap: the logits are soft-capped, cap · tanh(logit / cap) (Gemma 2's head); None: not.
        logits_per_block: the size of a block in logits, which sets its width from the rows.
    """
    batch, samples, _ = h.shape
    x, vocab = h.flatten(0, 1), weight.shape[0]  # (B·S, C)
    width = min(4096, max(512, logits_per_block // max(x.shape[0], 1) // 512 * 512), vocab)
    y_rows = y.repeat_interleave(samples)  # (B·S,): each sample's ŷ
    blocks, top, total = [], None, None
    for a in range(0, vocab, width):
        block = softcap(F.linear(x, weight[a : a + width], None if bias is None else bias[a : a + width]), cap).float()
        blocks.append(block)  # (B·S, width)
        block_top = block.amax(-1).double()  # (B·S,)
        block_total = block.double().sub_(block_top.unsqueeze(1)).exp_().sum(-1)  # Σ exp(l − block max)
        if top is None:
            top, total = block_top, block_total
        else:
            new_top = torch.maximum(top, block_top)
            total = total * (top - new_top).exp() + block_total * (block_top - new_top).exp()
            top = new_top
    log_z = top + total.log()  # (B·S,): log Σ_v exp(l_v)
    tiny = torch.finfo(torch.float64).tiny
    logit_y = torch.empty_like(log_z)
    entropy = log_z.new_zeros(batch)
    kl = log_z.new_zeros(batch, samples)
    for a, block in zip(range(0, vocab, width), blocks, strict=True):
        here = (y_rows >= a) & (y_rows < a + block.shape[1])
        logit_y[here] = block[here, y_rows[here] - a].double()
        logp = block.double().sub_(log_z.unsqueeze(1)).view(batch, samples, -1)  # (B, S, width): log p_s
        probs = logp.exp()  # p_s
        mean = probs.mean(1)  # (B, width): p̄
        log_mean = mean.clamp_min(tiny).log()  # log p̄
        entropy -= (mean * log_mean).sum(-1)
        kl += logp.sub_(log_mean.unsqueeze(1)).mul_(probs).sum(-1)  # Σ p_s (log p_s − log p̄) over the block
    return _summaries((logit_y - log_z).view(batch, samples), entropy, kl)
