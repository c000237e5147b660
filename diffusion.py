"""The diffusion process: noise levels, preconditioning, the score-interpolation denoiser, the training losses,
the likelihood bound, the samplers, the per-token sampling schedules, the sampling grid and generate(), which drives
them. The network is received as an argument (anything with `cfg.embedding_dim`, `cfg.self_cond`, `cfg.output_prior`,
`embed`, `embedding_table` and `__call__(x, c_noise, segment_ids, self_cond, offset) -> logits`; the training losses
and chunked sampling also need its tied head, `features(...)` (the same arguments) and `head_weights() -> (table,
bias)`, as model.ScoreLM has; a network with `packing(segment_ids, shape, device)` gets a batch's attention mask
built once, see packed()), and a time warp (timewarp.py) as any callable u -> sigma; neither module is imported
here.

Every noise level is per token: sigma has shape (B, L), and a position with sigma = 0 is conditioned (held
at its clean embedding). Process maths runs in float32 (float64 on request) whatever the network's precision.
"""
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from chunked import chunk_rows, tied_cross_entropy, tied_expectation
from utils import append_dims, autocast, row_draws, row_generators, row_lengths

SIGMA_DATA = 1.0  # normalised embeddings of norm sqrt(E) have unit variance per coordinate
SIGMA_FLOOR = 1e-3  # sigma = 0 has ln(sigma) = -inf; the network sees conditioned positions at this level
SAMPLING_RHO = 7.0  # the sampling grid's default spacing (Karras et al. 2022); training keeps its own rho


def rho_schedule(u, sigma_min, sigma_max, rho):
    """Noise level at progress u in [0, 1]: sigma_max at u = 0, sigma_min at u = 1, spaced by rho
    (Karras et al. 2022, eq. 5; rho = 1 is linear in sigma, as the original project trains)."""
    inv_rho = 1.0 / rho
    return (sigma_max ** inv_rho + u * (sigma_min ** inv_rho - sigma_max ** inv_rho)) ** rho


def draw_training_sigma(segment_ids, sigma_min, sigma_max, rho, per_token, generator=None, warp=None,
                        stratified=False):
    """Training noise levels (B, L) float32 from u ~ U(0, 1) (draw_uniform: one per packed sequence, or with
    `per_token` one per position, multi-level diffusion after AR-Diffusion, Wu et al. 2023; stratified over the batch
    with `stratified`) through rho_schedule, or through `warp` (a fitted TimeWarp) when given."""
    u = draw_uniform(segment_ids, per_token, generator, stratified)
    return (rho_schedule(u, sigma_min, sigma_max, rho) if warp is None else warp(u)).float()


def draw_uniform(segment_ids, per_token, generator=None, stratified=False):
    """u ~ U(0, 1), (B, L): one value per packed sequence (all tokens sharing a segment id share it), or, with
    `per_token`, an independent value at every position. With `stratified`, the batch's draws are one from each of
    as many equal slices of [0, 1), in random order (stratified_uniform), so that every batch covers [0, 1) evenly;
    then float64, else float32."""
    B, L = segment_ids.shape
    u = torch.rand(B, L + 1, generator=generator, device=segment_ids.device)  # segment ids lie in [0, L]
    if stratified:
        drawn = torch.zeros_like(u, dtype=torch.bool)
        if per_token:
            drawn[:, :L] = True
        else:  # the (row, segment) pairs of real sequences
            drawn.scatter_(1, segment_ids, True)
            drawn[:, 0] = False
        u = stratified_uniform(u, drawn, generator)
    return u[:, :L] if per_token else u.gather(1, segment_ids)


def draw_anchors(sigma, free, segment_ids, share, sigma_min, sigma_max, generator=None):
    """Clean anchors, after CANDI (arXiv 2510.22510, whose clean share is 1 - t at time t): in a `share` of the packed
    sequences (drawn per sequence), each free position is held clean (sigma 0, left out of the
    loss) with probability 1 - s, s = ln(sigma / sigma_min) / ln(sigma_max / sigma_min) in [0, 1] the coordinate of
    its level: most of a sequence at the lowest levels, none at sigma_max. Gaussian noise leaves a token's identity
    ambiguous over a band of levels where every neighbour is as ambiguous; with anchors, the levels of that band are
    also trained with clean neighbours to read, as masked diffusion trains. sigma (B, L) float, free (B, L) bool,
    segment_ids (B, L) int64; returns (B, L) bool."""
    chosen = draw_uniform(segment_ids, False, generator) < share  # (B, L): the sequences that get anchors
    s = (sigma.float().clamp(sigma_min, sigma_max) / sigma_min).log() / math.log(sigma_max / sigma_min)
    return chosen & free & (torch.rand(sigma.shape, generator=generator, device=sigma.device) >= s)


def stratified_uniform(u, drawn, generator=None):
    """`u` (any shape) as float64, with its entries at the True positions of `drawn` replaced by a stratified sample of
    U(0, 1): the n of them take one value from each slice [k/n, (k+1)/n), k = 0..n-1, in a random order (in float32 a
    value just below a slice's edge would round onto it). n stays on the device (no host sync): random keys put the
    drawn entries first in a random order, and each takes its place k in that order as its slice."""
    keys = torch.rand(u.shape, generator=generator, device=u.device).masked_fill(~drawn, 2.0)  # the drawn below 1
    order = keys.flatten().argsort()
    place = torch.empty_like(order)
    place[order] = torch.arange(order.numel(), device=u.device)
    r = torch.rand(u.shape, generator=generator, device=u.device)
    return torch.where(drawn, (place.view(u.shape) + r.double()) / drawn.sum(), u.double())


def edm_preconditioning(sigma, sigma_data=SIGMA_DATA):
    """Input scaling and noise input of the network (Karras et al. 2022, Table 1):
    c_in = 1 / sqrt(sigma^2 + sigma_data^2) and c_noise = ln(sigma) / 4, with sigma floored at SIGMA_FLOOR
    for c_noise only. sigma (B, L) float -> (c_in, c_noise), each (B, L) float32.

    EDM's output scalings c_skip and c_out are not used: with score interpolation the network's output,
    softmax(logits) @ embeddings, is already the estimate of the clean embedding (CDCD, section 3), and a
    skip connection would mix the noisy input into it. The one boundary condition they impose, D(x; 0) = x,
    is kept by `denoise`.
    """
    sigma = sigma.to(torch.promote_types(sigma.dtype, torch.float32))  # float64 stays float64
    c_in = torch.rsqrt(sigma ** 2 + sigma_data ** 2)
    c_noise = sigma.clamp_min(SIGMA_FLOOR).log() / 4
    return c_in, c_noise


def network_inputs(model, x, sigma, segment_ids=None, sigma_data=SIGMA_DATA, self_cond=None, prior_scale=1.0):
    """The preconditioned network's arguments for noisy embeddings x (B, L, E) at levels sigma (B, L), given a
    previous estimate of the clean embeddings self_cond (B, L, E) or None (read by self-conditioned models only): c_in
    x and c_noise (EDM), segment ids, and for a model built with cfg.output_prior, cfg.output_prior_scale times
    prior_scale (a float or 0-dim tensor; 1 outside training's ramp) times each token's own posterior,
    output_prior_offset."""
    c_in, c_noise = edm_preconditioning(sigma, sigma_data)
    inputs = [(append_dims(c_in, x.ndim) * x).float(), c_noise.float(), segment_ids]
    if self_cond is not None or model.cfg.output_prior:  # keeps the signature of networks without either
        inputs.append(None if self_cond is None else self_cond.float())
    if model.cfg.output_prior:
        inputs.append(prior_scale * model.cfg.output_prior_scale * output_prior_offset(x, sigma))
    return inputs


def packed(model, segment_ids, shape, device):
    """A batch's packing as the network reads it, built once for the several evaluations of one batch (a
    self-conditioned training step, every sampler step): model.packing(segment_ids, shape, device) for rows of
    `shape` (B, L), which the network takes in place of the segment ids, for a network that has it (and rows to
    build it for); else the segment ids (B, L) or None."""
    if not hasattr(model, "packing") or shape[0] == 0:
        return segment_ids
    return model.packing(segment_ids, shape, device)


def network_logits(model, x, sigma, segment_ids=None, sigma_data=SIGMA_DATA, self_cond=None, prior_scale=1.0):
    """The preconditioned network's logits (B, L, V) float32 (arguments as network_inputs')."""
    return model(*network_inputs(model, x, sigma, segment_ids, sigma_data, self_cond, prior_scale)).float()


def network_features(model, x, sigma, segment_ids=None, sigma_data=SIGMA_DATA, self_cond=None, prior_scale=1.0):
    """The preconditioned network up to its tied head: features (B, L, E), whose products with the embeddings plus
    the logit bias are network_logits' logits (model.project; in bf16 up to the rounding of the bias, which the
    chunked head adds in fp32), in the compute dtype (float32 with an output prior).
    For a network with a tied head (model.head_weights); arguments as network_inputs'."""
    return model.features(*network_inputs(model, x, sigma, segment_ids, sigma_data, self_cond, prior_scale))


def network_expectation(model, x, sigma, segment_ids=None, self_cond=None, dtype=torch.float32, precision="fp32"):
    """What a sampler reads from the network at (x, sigma): (expected, top, argmax) as chunked.tied_expectation
    returns them, the expected clean embedding under softmax(logits) (B, L, E) `dtype`, the top probability (B, L)
    and its token (B, L) int64. The network runs under `precision`'s autocast; with a tied head (head_weights) the
    softmax is reduced a chunk of rows at a time, no (B, L, V) kept; any other network's logits are taken whole."""
    tied = hasattr(model, "head_weights")
    with autocast(x.device, precision):
        out = (network_features if tied else network_logits)(model, x, sigma, segment_ids, self_cond=self_cond)
    if tied:
        return tied_expectation(out, *model.head_weights(), dtype)
    probs = out.to(dtype).softmax(dim=-1)
    return (probs @ model.embedding_table().to(dtype), *probs.max(dim=-1))


def output_prior_offset(x, sigma):
    """Plaid's output prior (Gulrajani & Hashimoto 2023, lib/models.py) for this variance-exploding process: given its
    own noisy embedding z = e_v + sigma eps alone, a token's log-posterior is -|z - e_v|^2 / (2 sigma^2) + const
    = z . e_v / sigma^2 + const, since every e_v has the same norm. Returns z / sigma^2 (B, L, E) float32, the
    vector whose products with the embeddings are those logits (0 where sigma = 0: held positions)."""
    inv_var = torch.where(sigma > 0, sigma.float().clamp_min(SIGMA_FLOOR) ** -2, 0.0)
    return x.float() * append_dims(inv_var, x.ndim)


def denoiser_logits(model, x, sigma, segment_ids=None, sigma_data=SIGMA_DATA):
    """The logits of the denoiser evaluated afresh, with no earlier estimate (likelihood bound, loss curves):
    network_logits, and for a self-conditioned model a first pass without an estimate whose score-interpolated
    output feeds a second pass (Chen et al. 2022), a function of x alone as the bound requires. (B, L, V) float32."""
    if not model.cfg.self_cond:
        return network_logits(model, x, sigma, segment_ids, sigma_data)
    with torch.no_grad():
        first = network_logits(model, x, sigma, segment_ids, sigma_data)
        estimate = score_interpolation(first.softmax(dim=-1), x, sigma, model.embedding_table())
    return network_logits(model, x, sigma, segment_ids, sigma_data, estimate)


def score_interpolation(probs, x, sigma, table):
    """D(x; sigma) from the network's predicted token distribution probs = softmax(logits) (B, L, V): the expected
    clean embedding, probs @ table (Dieleman et al. 2022, section 3), and exactly x where sigma = 0.
    x (B, L, E), sigma (B, L), table (V, E) -> (B, L, E) float32 (float64 for float64 probs)."""
    dtype = torch.promote_types(probs.dtype, torch.float32)
    return held_clean(probs.to(dtype) @ table.to(dtype), x, sigma)  # (B, L, E)


def held_clean(expected, x, sigma):
    """The denoiser's estimate: `expected` (B, L, E) where sigma (B, L) > 0 and exactly x, in expected's dtype, at
    held positions (sigma = 0), where D(x; 0) = x."""
    return torch.where(append_dims(sigma == 0, x.ndim), x.to(expected.dtype), expected)


def training_features(model, ids, sigma, noise, segment_ids=None, cond_mask=None, sigma_data=SIGMA_DATA,
                      self_cond=False, prior_scale=1.0):
    """The trained pass of a training step up to the tied head: (features (B, L, E) in the compute dtype, the levels
    sigma (B, L) float with held positions at 0). Arguments as score_interpolation_loss's: the clean embeddings plus
    sigma times noise, read by the preconditioned network; with self_cond, after a first pass without gradient
    whose estimate of the clean embeddings it reads (Chen et al. 2022, Analog Bits, sec. 3.2)."""
    if sigma.ndim == 1:
        sigma = sigma[:, None].expand(ids.shape)
    if cond_mask is not None:
        sigma = sigma.masked_fill(cond_mask, 0.0)
    x = model.embed(ids) + append_dims(sigma, noise.ndim) * noise  # (B, L, E)
    estimate = None
    if self_cond:
        segment_ids = packed(model, segment_ids, ids.shape, ids.device)  # the mask of both passes, built once
        with torch.no_grad():
            first = network_features(model, x, sigma, segment_ids, sigma_data, prior_scale=prior_scale)
            expected, _, _ = tied_expectation(first, *model.head_weights(), with_top=False)
            estimate = held_clean(expected, x, sigma)  # score interpolation's D, (B, L, E)
    return network_features(model, x, sigma, segment_ids, sigma_data, estimate, prior_scale), sigma


def score_interpolation_loss(model, ids, sigma, noise, segment_ids=None, cond_mask=None, sigma_data=SIGMA_DATA,
                             weight=None, self_cond=False, prior_scale=1.0):
    """CDCD's loss, the cross-entropy of the clean tokens: (loss, ce, argmax), where ce (B, L) float32 is each
    position's cross-entropy in nats (not differentiable), loss the 0-dim float32 sum of weight * ce (differentiable:
    the caller's weights mask out conditioned and fill positions and set the mean; a loss weighting goes there) and
    hit (B, L) bool whether each position's most likely token is its own (for the accuracy). The tied head runs chunked
    (chunked.tied_cross_entropy): no (B L) x V logits are kept.

    ids (B, L) int64 clean tokens; sigma (B,) or (B, L) float noise levels (a per-sequence level is
    broadcast over the row); noise (B, L, E) standard normal; cond_mask (B, L) bool positions held clean
    (their sigma is set to 0); weight (B, L) float or None (every position 1). With self_cond (a self-conditioned
    model's share of batches), a first pass without gradient supplies the estimate of the clean embeddings that the
    second, trained pass reads (Chen et al. 2022, Analog Bits, sec. 3.2); otherwise the model reads none.
    prior_scale: the weight of a model's output prior (network_features; training may ramp it in).
    """
    features, _ = training_features(model, ids, sigma, noise, segment_ids, cond_mask, sigma_data, self_cond,
                                    prior_scale)
    return tied_cross_entropy(features, *model.head_weights(), ids, weight)


def training_density(sigma, sigma_min, sigma_max, rho, warp=None):
    """The density q(sigma) (per unit of sigma) from which training draws its levels: rho_schedule(u) with u ~ U(0, 1),
    q = 1 / |d sigma / d u| = 1 / (rho sigma^(1 - 1/rho) (sigma_max^(1/rho) - sigma_min^(1/rho))), or the time warp's
    (TimeWarp.density). sigma (any shape) float in [sigma_min, sigma_max] -> the same shape, float32."""
    if warp is not None:
        return warp.density(sigma).float()
    inv_rho = 1.0 / rho
    span = sigma_max ** inv_rho - sigma_min ** inv_rho
    return 1.0 / (rho * sigma.double().clamp(sigma_min, sigma_max) ** (1 - inv_rho) * span).float()


def chunk_error(features, table, bias, clean):
    """|clean - softmax(features @ table.T + bias) @ table|^2 of one chunk of rows: (n, E), (V, E), (V,), (n, E) ->
    (n,) float32; the product in the features' dtype, the softmax and the estimate in float32."""
    with torch.autocast(features.device.type, enabled=False):
        logits = (features @ table.to(features.dtype).t()).float() + bias  # (n, V)
        return (logits.softmax(dim=-1) @ table - clean).square().sum(-1)


@torch.compiler.disable  # eager under torch.compile, as chunked.tied_cross_entropy
def denoising_error(features, table, bias, clean, chunk=None):
    """|clean - D|^2 per position, D = softmax(features @ table.T + bias) @ table the score-interpolation estimate:
    features (..., E) in the compute dtype, table (V, E) and bias (V,) float32, clean (..., E) float32 -> (...)
    float32, differentiable with respect to all four. A chunk of rows at a time (chunked.chunk_rows), each
    recomputed in the backward pass (activation checkpointing), so that no (N, V) logits outlive their chunk."""
    flat, target = features.reshape(-1, features.shape[-1]), clean.reshape(-1, clean.shape[-1]).float()
    chunk = chunk or chunk_rows(features.device, len(table))
    if torch.is_grad_enabled():
        errors = [torch.utils.checkpoint.checkpoint(chunk_error, flat[i:i + chunk], table, bias.float(),
                                                    target[i:i + chunk], use_reentrant=False)
                  for i in range(0, len(flat), chunk)]
    else:  # nothing to recompute
        errors = [chunk_error(flat[i:i + chunk], table, bias.float(), target[i:i + chunk])
                  for i in range(0, len(flat), chunk)]
    return torch.cat(errors).view(clean.shape[:-1])


def elbo_integrand(model, ids, features, sigma, density, weight):
    """The diffusion term of the bound (nll_bound's), estimated at the drawn levels: each position's
    sigma^-3 |x - D(z; sigma)|^2 / q(sigma) (Kingma et al. 2021, VDM, eq. 17 for this variance-exploding process, as
    nll_bound derives it), importance-weighted by the density q the levels were drawn from (training_density), so
    that its expectation over the draws is the term itself in nats per token; x are the clean embeddings, so their
    gradient reaches the embeddings as Plaid's ELBO does (Gulrajani & Hashimoto 2023). Returns (the 0-dim sum of
    weight times it, the per-position values (B, L) float32, not differentiable). features (B, L, E) of
    training_features, sigma (B, L) with held positions at 0 (where the value is 0), density (B, L), weight (B, L)."""
    table, bias = model.head_weights()
    error = denoising_error(features, table, bias, model.embed(ids))  # (B, L)
    scale = torch.where(sigma > 0, sigma.float().clamp_min(SIGMA_FLOOR) ** -3 / density.float().clamp_min(1e-12), 0.0)
    value = error * scale
    return (value * weight).sum(), value.detach()


def mixed_elbo_loss(model, ids, sigma, noise, density, elbo_weight, segment_ids=None, cond_mask=None, weight=None,
                    self_cond=False, prior_scale=1.0):
    """The cross-entropy of score_interpolation_loss plus `elbo_weight` times the bound's diffusion term
    (elbo_integrand) of the same pass: Plaid's ELBO in embedding space (Gulrajani & Hashimoto 2023) mixed with CDCD's
    cross-entropy. (loss, ce, hit) as score_interpolation_loss returns them (ce the cross-entropy alone);
    density (B, L) the training density of the drawn levels (training_density); other arguments as there."""
    features, sigma = training_features(model, ids, sigma, noise, segment_ids, cond_mask, SIGMA_DATA, self_cond,
                                        prior_scale)
    weight = torch.ones(ids.shape, device=ids.device) if weight is None else weight
    loss, ce, hit = tied_cross_entropy(features, *model.head_weights(), ids, weight)
    elbo, _ = elbo_integrand(model, ids, features, sigma, density, weight)
    return loss + elbo_weight * elbo, ce, hit


@torch.no_grad()
def nll_bound(model, ids, cond_mask, sigma_min, sigma_max, draws, segment_ids=None, seeds=None,
              sigma_data=SIGMA_DATA):
    """Monte Carlo estimate of an upper bound on -log p(free tokens | held tokens), per row, in nats.

    Derivation (the continuous-time bound of Kingma et al. 2021, VDM, eqs. 11 and 17, for this variance-exploding
    process). With x the clean embeddings of a row's free positions (held ones stay clean, sigma = 0) and
    q(z_sigma | x) = N(x, sigma^2 I), the signal-to-noise ratio is SNR(sigma) = sigma^-2. Taking sigma itself
    as VDM's time, from sigma_min to sigma_max:
        -log p(w) <= E_q[-log p(w | z_sigma_min)]                                 (reconstruction)
                   + KL(q(z_sigma_max | x) || N(0, (sigma_max^2 + sigma_data^2) I))   (prior)
                   + 1/2 int_{sigma_min}^{sigma_max} -SNR'(sigma) E_eps |x - D(z_sigma; sigma)|^2 dsigma,
    and -SNR'(sigma) = 2 sigma^-3, so the diffusion term is int sigma^-3 E|x - D(z_sigma; sigma)|^2 dsigma, with
    D the score-interpolation denoiser (for a self-conditioned model, denoiser_logits' two passes). The decoder
    p(w | z) is the network's softmax at sigma_min (its cross-entropy there). The prior term per free token, with e
    its embedding, is
    1/2 [(E sigma_max^2 + |e|^2) / s^2 - E + E ln(s^2 / sigma_max^2)], s^2 = sigma_max^2 + sigma_data^2
    (= E/2 ln(1 + sigma_data^2 / sigma_max^2) for |e|^2 = E sigma_data^2).
    The integral is estimated by importance sampling, sigma log-uniform on [sigma_min, sigma_max] (density
    1 / (sigma ln(sigma_max / sigma_min))) and stratified (draw j of `draws` from the j-th slice of the log range),
    so each draw contributes ln(sigma_max / sigma_min) sigma^-2 |x - D|^2; the reconstruction term by as many
    draws of z_sigma_min. All noisy positions of a row share one sigma, as the bound requires. The prior is the
    marginal's Gaussian fit N(0, (sigma_max^2 + sigma_data^2) I); samplers start from N(0, sigma_max^2 I), a
    KL divergence of about E sigma_data^4 / (4 sigma_max^4) nats a token between the two. The variance
    returned treats the draws as independent, which overstates it under stratification (a conservative error).
    Each row draws from its own generator, seeded by its seed: first its `draws` levels, then the noise of each
    draw for its own length only (utils.row_draws), so that a row's estimate does not depend on its batch, and two
    rows of one seed (a line and its words shuffled) share their levels whatever their lengths.

    ids (B, L) int64; cond_mask (B, L) bool, held positions (bos, row padding); segment_ids (B, L) or None;
    draws >= 2 per row; seeds: B ints (default 0, 1, ...). Returns a dict of float64 CPU tensors: "reconstruction",
    "diffusion", "prior" (nats per row, (B,)), "variance" (of the row's Monte Carlo estimate of their sum, (B,)),
    "tokens" (free positions, (B,)) and "per_draw" (B, draws), each draw's estimate of the row's reconstruction
    plus diffusion terms, for errors of differences between rows of common draws.
    Raises ValueError if draws < 2 or sigma_min >= sigma_max.
    """
    if draws < 2 or not 0 < sigma_min < sigma_max:
        raise ValueError(f"need draws >= 2 and 0 < sigma_min < sigma_max, got {draws}, {sigma_min}, {sigma_max}")
    free = ~cond_mask
    x = model.embed(ids).double()  # (B, L, E)
    E, log_ratio = x.shape[-1], math.log(sigma_max / sigma_min)
    s2 = sigma_max ** 2 + sigma_data ** 2
    prior = 0.5 * ((E * sigma_max ** 2 + (x ** 2).sum(-1)) / s2 - E + E * math.log(s2 / sigma_max ** 2))  # (B, L)
    generators = row_generators(range(len(ids)) if seeds is None else seeds)
    lengths = row_lengths(ids, segment_ids)
    # stratified: draw j of every row from the j-th of `draws` equal slices of [0, 1)
    u = (torch.arange(draws) + torch.stack([torch.rand(draws, generator=g, dtype=torch.float64) for g in generators])
         ) / draws  # (B, draws)
    per_draw = []
    for j in range(draws):
        sigma = (sigma_min * torch.exp(u[:, j] * log_ratio)).to(ids.device)  # (B,) log-uniform
        for level, diffusion_term in ((sigma, True), (torch.full_like(sigma, sigma_min), False)):
            sigma_tok = torch.where(free, level[:, None], 0.0)  # (B, L)
            eps = row_draws(generators, lengths, ids.shape[1], E, dtype=torch.float64).to(ids.device)
            z = x + append_dims(sigma_tok, 3) * eps
            logits = denoiser_logits(model, z, sigma_tok, segment_ids, sigma_data).double()  # (B, L, V)
            if diffusion_term:
                denoised = score_interpolation(logits.softmax(dim=-1), z, sigma_tok, model.embedding_table().double())
                error = (((x - denoised) ** 2).sum(-1) * free).sum(-1)  # (B,)
                diffusion = log_ratio * error / sigma ** 2
            else:
                ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(ids.shape)
                reconstruction = (ce * free).sum(-1)
        per_draw.append(torch.stack([reconstruction, diffusion]))
    per_draw = torch.stack(per_draw).cpu()  # (draws, 2, B)
    total = per_draw.sum(1)  # (draws, B)
    return {"reconstruction": per_draw[:, 0].mean(0), "diffusion": per_draw[:, 1].mean(0),
            "prior": (prior * free).sum(-1).cpu(), "variance": total.var(0) / draws,
            "tokens": free.sum(-1).double().cpu(), "per_draw": total.T.contiguous()}


def ode_derivative(x, denoised, sigma):
    """dx/dsigma = (x - D(x; sigma)) / sigma of the probability-flow ODE (Karras et al. 2022, eq. 4 with
    sigma(t) = t); 0 where sigma = 0, so conditioned positions never move."""
    sigma = append_dims(sigma, x.ndim)
    return torch.where(sigma > 0, (x - denoised) / sigma.clamp_min(SIGMA_FLOOR), torch.zeros_like(x))


# Samplers: one step each, taking every position from its own sigma to its own sigma_next (both (B, L),
# sigma_next <= sigma); a position whose level does not change (conditioned at 0, or held back by a schedule)
# keeps its x. One signature: step(denoiser, x, sigma, sigma_next, noise) -> x at sigma_next, where
# denoiser(x, sigma) -> D(x; sigma) and noise() -> fresh standard normal noise shaped like x (B, L, E).
# Adding a sampler is adding a function here and its name to SAMPLERS.


@torch.no_grad()
def euler_step(denoiser, x, sigma, sigma_next, noise):
    """Euler step of the probability-flow ODE (Karras et al. 2022, Algorithm 1 without the correction).
    One network evaluation."""
    d = ode_derivative(x, denoiser(x, sigma), sigma)
    return x + append_dims(sigma_next - sigma, x.ndim) * d


@torch.no_grad()
def heun_step(denoiser, x, sigma, sigma_next, noise):
    """Heun's second-order step (Karras et al. 2022, Algorithm 1): the Euler step, then the mean of the slopes
    at both ends. A position stepping into sigma = 0 keeps the Euler step, since the slope there would divide by
    zero. Two network evaluations; one when every sigma_next is 0."""
    dt = append_dims(sigma_next - sigma, x.ndim)
    d = ode_derivative(x, denoiser(x, sigma), sigma)
    x_euler = x + dt * d
    corrected = sigma_next > 0
    if not corrected.any():
        return x_euler
    d_next = ode_derivative(x_euler, denoiser(x_euler, sigma_next), sigma_next)
    return torch.where(append_dims(corrected, x.ndim), x + dt * (d + d_next) / 2, x_euler)


@torch.no_grad()
def stochastic_step(denoiser, x, sigma, sigma_next, noise, steps=1, S_churn=0.0, S_tmin=0.0, S_tmax=math.inf,
                    S_noise=1.0):
    """EDM's stochastic step (Karras et al. 2022, Algorithm 2): a moving position with S_tmin <= sigma <= S_tmax
    is first raised to sigma_hat = (1 + gamma) sigma by fresh noise of scale S_noise sqrt(sigma_hat^2 - sigma^2),
    gamma = min(S_churn / steps, sqrt(2) - 1); then a Heun step goes from sigma_hat to sigma_next. S_churn = 0
    gives heun_step. Two network evaluations."""
    gamma = min(S_churn / steps, math.sqrt(2) - 1)
    churn = (sigma_next < sigma) & (sigma >= S_tmin) & (sigma <= S_tmax)
    sigma_hat = torch.where(churn, sigma * (1 + gamma), sigma)
    x_hat = x + append_dims((sigma_hat ** 2 - sigma ** 2).sqrt(), x.ndim) * S_noise * noise()
    return heun_step(denoiser, x_hat, sigma_hat, sigma_next, noise)


@torch.no_grad()
def iterative_step(denoiser, x, sigma, sigma_next, noise):
    """The original project's re-noising sampler: jump to the denoiser's estimate of the clean embeddings, then
    add fresh noise of level sigma_next to it (the estimate itself at sigma_next = 0). One network evaluation."""
    denoised = denoiser(x, sigma)
    moving = append_dims(sigma_next < sigma, x.ndim)
    return torch.where(moving, denoised + append_dims(sigma_next, x.ndim) * noise(), x)


@torch.no_grad()
def ancestral_step(denoiser, x, sigma, sigma_next, noise):
    """Ancestral step: a draw from the forward process's posterior q(x_next | x, x_0) with x_0 replaced by
    D(x; sigma) (DDPM's sampler, Ho et al. 2020, eqs. 6-7, in the variance-exploding form of Karras et al. 2022):
    with r = sigma_next / sigma, mean D + r^2 (x - D) and standard deviation sigma_next sqrt(1 - r^2). Unlike
    iterative_step, which draws all of the next level's noise afresh, it keeps the part of x's noise that the
    posterior keeps: with an exact denoiser a step loses only Var(x_0 | x) (1 - r^2)^2 of variance, which vanishes
    as the steps grow, so its samples converge to the data's distribution. D itself at sigma_next = 0. One network
    evaluation."""
    denoised = denoiser(x, sigma)
    moving = sigma_next < sigma
    r = torch.where(moving, sigma_next / sigma.clamp_min(SIGMA_FLOOR), 1.0)
    r, spread = append_dims(r, x.ndim), append_dims(sigma_next * (1 - r ** 2).clamp_min(0).sqrt(), x.ndim)
    return torch.where(append_dims(moving, x.ndim), denoised + r ** 2 * (x - denoised) + spread * noise(), x)


SAMPLERS = {"euler": euler_step, "heun": heun_step, "stochastic": stochastic_step, "iterative": iterative_step,
            "ancestral": ancestral_step}


@dataclass
class ScheduleState:
    """What a per-token schedule may read about the rows being sampled, all (B, L): `free` (bool) positions
    being generated; `rank` (float32) each free position's place in its row, 0 for the first, 1 for the last;
    `t` (float64) each position's progress, 0 at sigma_max and 1 at sigma_min; and after the first network
    evaluation `confidence` (float) the top probability of each position's latest prediction, `argmax` (int64)
    its token, `stable` (bool) whether that argmax equals the one of the evaluation before, and `denoised`
    (B, L, E) the latest estimate of the clean embeddings (what a self-conditioned model reads next). `u` is the
    uniform progress so far, a float in [0, 1]."""
    free: torch.Tensor
    rank: torch.Tensor
    t: torch.Tensor
    u: float = 0.0
    confidence: torch.Tensor = None
    argmax: torch.Tensor = None
    stable: torch.Tensor = None
    denoised: torch.Tensor = None

    @classmethod
    def start(cls, cond_mask):
        """Every position at progress 0 (sigma_max): cond_mask (B, L) bool -> state."""
        free = ~cond_mask
        rank = (free.cumsum(dim=1) - 1).clamp_min(0) / (free.sum(dim=1, keepdim=True) - 1).clamp_min(1)
        return cls(free, rank.float(), torch.zeros(free.shape, dtype=torch.float64, device=free.device))

    def select(self, keep):
        """The state of the rows `keep` (B,) bool alone."""
        return replace(self, **{f.name: getattr(self, f.name)[keep] for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


# Per-token schedules: schedule(u, state) -> t (B, L), every position's progress after the step that brings
# the uniform progress to u in (0, 1] (state.u before it). Progress becomes sigma through a Grid.
# advance() keeps each position monotone and puts every one at sigma_min when u = 1, so a schedule only
# decides who moves how far. Adding one is adding a function here, its name to SCHEDULES, and its parameters to
# sampling.py's SCHEDULE_PARAMETERS (sample.py's flags follow from there).


def uniform_schedule(u, state):
    """Every position at progress u: one shared grid (Karras et al. 2022, eq. 5 with the run's rho)."""
    return torch.full_like(state.t, u)


def ar_schedule(u, state, skew=1.0):
    """Left to right, after AR-Diffusion (Wu et al. 2023, section 3: earlier tokens at lower noise): the free
    position of rank r in [0, 1] is at progress (1 + skew) u - skew r, clipped to [0, 1]. Every position crosses
    the whole range in 1 / (1 + skew) of the steps: the first free one from the start to u = 1 / (1 + skew), the
    last from u = skew / (1 + skew) to the end. skew = 0 gives uniform_schedule."""
    return ((1 + skew) * u - skew * state.rank.to(state.t.dtype)).clamp(0.0, 1.0)


def confidence_schedule(u, state, threshold=0.9, patience=0.5):
    """Adaptive, confident positions first (the original project's proposal): a position whose latest
    prediction is confident (top probability >= threshold) and stable (same argmax at the last two evaluations)
    advances at 1 / (1 - patience) times the uniform pace; the others wait until a deadline, which leaves
    sigma_max at u = patience and reaches sigma_min at u = 1 at that same pace, carries them along. Each position
    thus descends at one pace over (1 - patience) of the steps, starting when it turns confident or when the
    deadline reaches it. patience in [0, 1); 0 gives uniform_schedule."""
    deadline = min(max((u - patience) / (1 - patience), 0.0), 1.0)
    if state.confidence is None:
        return torch.full_like(state.t, deadline)
    ready = state.stable & (state.confidence >= threshold)
    return (state.t + ready * (u - state.u) / (1 - patience)).clamp_min(deadline)


SCHEDULES = {"uniform": uniform_schedule, "ar": ar_schedule, "confidence": confidence_schedule}


def advance(schedule, u, state):
    """Every position's progress (B, L) float64 after the step to uniform progress u: the schedule's, never
    behind where the position was, and 1 (sigma_min) for all when u = 1."""
    if u >= 1.0:
        return torch.ones_like(state.t)
    return torch.maximum(schedule(u, state).to(state.t.dtype), state.t).clamp_max(1.0)


@dataclass(frozen=True)
class Grid:
    """Where sampling progress puts the noise levels: a free position at progress t in [0, 1] is at
    rho_schedule(t, sigma_min, sigma_max, rho), sigma_max at t = 0 and sigma_min at t = 1 (Karras et al. 2022,
    eq. 5), or, with a fitted TimeWarp `warp`, at the training warp's level warp(1 - t) (CDCD's warped grid)."""
    sigma_min: float
    sigma_max: float
    rho: float = SAMPLING_RHO
    warp: object = None

    def sigma(self, t, free, dtype=torch.float32):
        """Per-token sigma (B, L) `dtype` at progress t (B, L) float64; 0 where `free` (B, L) bool is False."""
        sigma = rho_schedule(t, self.sigma_min, self.sigma_max, self.rho) if self.warp is None else self.warp(1.0 - t)
        return torch.where(free, sigma, 0.0).to(dtype)


@dataclass(frozen=True)
class EarlyExit:
    """Stop a row once its argmax tokens have not changed for `patience` steps in a row (the patience criterion of
    Lo Cicero Vaina et al. 2023), counting only steps whose latest prediction has a mean top probability over the
    free positions of at least `confidence`: near sigma_max the prediction barely depends on x, so its argmax stands
    still long before anything is decided (0 counts every step)."""
    patience: int
    confidence: float = 0.5

    def count(self, unchanged, changed, state):
        """Steps in a row without a change (b,) int64, after a step that changed the tokens `changed` (b, L) bool."""
        moved = (changed & state.free).any(dim=1)
        confidence = (state.confidence * state.free).sum(dim=1) / state.free.sum(dim=1).clamp_min(1)
        return torch.where(moved | (confidence < self.confidence), 0, unchanged + 1)


@dataclass(frozen=True)
class Denoising:
    """What the sampler's denoiser does with the network's estimate D(x; sigma) of a free position: with
    `temperature` T, the score is divided by T, D_T = x + (D - x) / T (Plaid's score temperature, T = 0.9 there);
    below sigma `clamp_below`, D is replaced by the embedding of its most likely token (the clamping trick of
    Diffusion-LM, Li et al. 2022). T = 1 and clamp_below = 0 leave D as it is."""
    temperature: float = 1.0
    clamp_below: float = 0.0

    def apply(self, denoised, x, sigma, argmax, table):
        """D (b, L, E) after the temperature and the clamp, for x (b, L, E) at sigma (b, L) whose most likely tokens
        are argmax (b, L) int64; held positions (sigma = 0) keep x."""
        if self.temperature != 1.0:
            denoised = torch.where(append_dims(sigma > 0, x.ndim), x + (denoised - x) / self.temperature, denoised)
        if self.clamp_below > 0:
            clamped = append_dims((sigma > 0) & (sigma < self.clamp_below), x.ndim)
            denoised = torch.where(clamped, table[argmax], denoised)
        return denoised


class SamplingRows:
    """The rows of one generate() call still being sampled: their noise generators (one per row, seeded by its seed,
    so that a sample does not depend on its batch: EDM's StackedRandomGenerator), segment ids, latest argmax tokens,
    schedule state and network evaluations. noise() and denoiser() are what a sampler step calls."""

    def __init__(self, model, ids, cond_mask, seeds, segment_ids, precision, dtype, denoising=None):
        self.model, self.precision, self.dtype, self.device = model, precision, dtype, ids.device
        self.denoising = denoising or Denoising()
        self.generators = row_generators(seeds)
        # a row draws noise for its own length only, so that its stream does not depend on the longest row beside it
        self.lengths = row_lengths(ids, segment_ids)
        self.table = model.embedding_table().to(dtype)  # (V, E)
        self.rows = torch.arange(len(ids))  # the rows still sampling, as indices into the batch
        self.segment_ids, self.tokens = segment_ids, ids.clone()
        self.packing = packed(model, segment_ids, ids.shape, self.device)  # every step's, built once
        self.state = ScheduleState.start(cond_mask)
        self.evaluations = torch.zeros(len(ids), dtype=torch.long)

    def noise(self):
        """Fresh standard normal noise (b, L, E) in `dtype`, each row from its own generator, zero past its length."""
        rows = self.rows.tolist()
        return row_draws([self.generators[r] for r in rows], [self.lengths[r] for r in rows], self.tokens.shape[1],
                         self.model.cfg.embedding_dim, dtype=self.dtype).to(self.device)  # any device alike

    def denoiser(self, x, sigma):
        """D(x; sigma) (b, L, E) by score interpolation, the network under `precision`'s autocast, then `denoising`;
        records each free position's argmax token, its probability and whether it changed, for the schedules and
        early exit, and the score-interpolated estimate, which a self-conditioned model reads next."""
        state = self.state
        estimate = state.denoised if self.model.cfg.self_cond else None  # the previous evaluation's (Chen et al. 2022)
        expected, confidence, argmax = network_expectation(self.model, x, sigma, self.packing, estimate,
                                                           self.dtype, self.precision)
        state.stable = torch.zeros_like(state.free) if state.argmax is None else argmax == state.argmax
        state.confidence, state.argmax = confidence, argmax
        self.tokens.copy_(torch.where(sigma > 0, argmax, self.tokens))
        self.evaluations[self.rows] += 1
        state.denoised = held_clean(expected, x, sigma)  # score interpolation's D
        return self.denoising.apply(state.denoised, x, sigma, argmax, self.table)

    def keep(self, keep):
        """Go on with the rows `keep` (b,) bool alone."""
        self.rows, self.tokens = self.rows[keep.cpu()], self.tokens[keep]
        self.segment_ids = None if self.segment_ids is None else self.segment_ids[keep]
        self.packing = packed(self.model, self.segment_ids, self.tokens.shape, self.device)
        self.state = self.state.select(keep)


@torch.no_grad()
def generate(model, step, schedule, grid, ids, cond_mask, seeds, steps, segment_ids=None, early_exit=None,
             precision="fp32", dtype=torch.float32, callback=None, denoising=None):
    """Sample the free positions of a batch; conditioned ids come back exactly as given.

    step: a SAMPLERS function with its parameters bound; schedule: a SCHEDULES function likewise; grid: a Grid;
    ids (B, L) int64 (free positions may hold anything); cond_mask (B, L) bool; seeds: B ints, one noise generator
    per row; `steps` steps on the progress grid u = i / (steps - 1), the last from sigma_min to 0; segment_ids
    (B, L) int or None for rows shorter than the batch (attention stays within equal ids); early_exit: an EarlyExit
    or None (finished rows leave the batch); denoising: a Denoising (score temperature, clamping) or None. The
    network runs under `precision`'s autocast; x, sigma, the softmax and score interpolation in `dtype`
    (torch.float32 or torch.float64). A self-conditioned model reads the estimate of the row's previous network
    evaluation (none at the first). callback(i, rows, tokens, sigma), if given, sees every step i: the rows still
    sampling (b,) int64, their tokens (b, L) and levels (b, L) after it.

    Each free token is the argmax of its logits at the last evaluation where its sigma was above 0 (CDCD decodes
    the final logits; the nearest embedding to a score-interpolated mean can be a token no step predicted).
    Returns ids (B, L) int64, and per row the network evaluations and the steps taken, each (B,) int64 on the CPU.
    """
    rows = SamplingRows(model, ids, cond_mask, seeds, segment_ids, precision, dtype, denoising)
    out, steps_taken = ids.clone(), torch.full((len(ids),), steps, dtype=torch.long)
    unchanged = torch.zeros(len(ids), dtype=torch.long, device=ids.device)
    sigma = grid.sigma(rows.state.t, rows.state.free, dtype)
    x = model.embed(ids).to(dtype) * append_dims(cond_mask, 3) + append_dims(sigma, 3) * rows.noise()  # (B, L, E)
    for i in range(steps):
        last = i == steps - 1
        u = 1.0 if last else (i + 1) / (steps - 1)
        t_next = advance(schedule, u, rows.state)
        sigma_next = torch.zeros_like(sigma) if last else grid.sigma(t_next, rows.state.free, dtype)
        before = rows.tokens.clone()
        x = step(rows.denoiser, x, sigma, sigma_next, rows.noise)
        sigma, rows.state.t, rows.state.u = sigma_next, t_next, u
        if callback is not None:
            callback(i, rows.rows, rows.tokens, sigma)
        done = torch.full_like(unchanged, last, dtype=torch.bool)
        if early_exit is not None:
            unchanged = early_exit.count(unchanged, rows.tokens != before, rows.state)
            done |= unchanged >= early_exit.patience
        if done.any():  # a host sync once a step
            finished = rows.rows[done.cpu()]
            out[finished.to(ids.device)], steps_taken[finished] = rows.tokens[done], i + 1  # held tokens untouched
            x, sigma, unchanged = x[~done], sigma[~done], unchanged[~done]
            rows.keep(~done)
            if not len(rows.rows):
                break
    return out, rows.evaluations, steps_taken
