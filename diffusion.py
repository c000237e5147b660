"""The diffusion process: noise levels, preconditioning, the score-interpolation denoiser, the training loss,
the samplers, the per-token sampling schedules and generate(), which drives them. The network is received as an
argument (anything with `cfg.embedding_dim`, `cfg.self_cond`, `embed`, `embedding_table` and
`__call__(x, c_noise, segment_ids, self_cond) -> logits`); model.py is never imported here.

Every noise level is per token: sigma has shape (B, L), and a position with sigma = 0 is conditioned (held
at its clean embedding). Process maths runs in float32 (float64 on request) whatever the network's precision.
"""
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from utils import append_dims, autocast

SIGMA_DATA = 1.0  # normalised embeddings of norm sqrt(E) have unit variance per coordinate
SIGMA_FLOOR = 1e-3  # sigma = 0 has ln(sigma) = -inf; the network sees conditioned positions at this level
SAMPLING_RHO = 7.0  # the sampling grid's default spacing (Karras et al. 2022); training keeps its own rho


def rho_schedule(u, sigma_min, sigma_max, rho):
    """Noise level at progress u in [0, 1]: sigma_max at u = 0, sigma_min at u = 1, spaced by rho
    (Karras et al. 2022, eq. 5; rho = 1 is linear in sigma, as the original project trains)."""
    inv_rho = 1.0 / rho
    return (sigma_max ** inv_rho + u * (sigma_min ** inv_rho - sigma_max ** inv_rho)) ** rho


def draw_training_sigma(segment_ids, sigma_min, sigma_max, rho, per_token, generator=None, warp=None):
    """Training noise levels (B, L) float32 from u ~ U(0, 1) through rho_schedule, or through `warp` (a fitted
    TimeWarp) when given: one level per packed sequence (all tokens sharing a segment id share it), or, with
    `per_token`, an independent level at every position (multi-level diffusion, after AR-Diffusion, Wu et al. 2023)."""
    B, L = segment_ids.shape
    u = torch.rand(B, L + 1, generator=generator, device=segment_ids.device)  # segment ids lie in [0, L]
    u = u[:, :L] if per_token else u.gather(1, segment_ids)
    return rho_schedule(u, sigma_min, sigma_max, rho) if warp is None else warp(u)


def pool_adjacent_violators(values, weights):
    """The non-decreasing sequence closest to `values` in weighted least squares (isotonic regression by pooling
    adjacent violators, Ayer et al. 1955); values with weight 0 take their neighbours' level. Lists of floats in,
    a list out."""
    blocks = []  # [weighted mean, weight, length]
    for value, weight in zip(values, weights):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and (blocks[-1][1] == 0 or blocks[-2][1] == 0 or blocks[-2][0] > blocks[-1][0]):
            (m1, w1, n1), (m2, w2, n2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * w1 + m2 * w2) / (w1 + w2) if w1 + w2 else m1, w1 + w2, n1 + n2]
    return [mean for mean, _, length in blocks for _ in range(length)]


class TimeWarp:
    """CDCD's time warping (Dieleman et al. 2022, section 4), fitted online: training draws noise levels so that
    the cross-entropy rises evenly with the drawn quantile, i.e. each level in proportion to how fast the loss
    changes there (how much is decided there).

    Levels are placed on the coordinate s = ln(sigma / sigma_min) / ln(sigma_max / sigma_min) in [0, 1], cut into
    `bins` equal bins (equal in log sigma, so that a wide range such as 1 to 300 still resolves the low levels where
    tokens are decided). observe() adds each step's per-token cross-entropy to its bin on the device; fit() (every
    few steps, one host sync) moves each observed bin's running mean a share `rate` towards the window's mean
    (however few tokens the window had there, so that an early burst of an untrained model's losses cannot outweigh
    later, sparser draws) and decays its token count (decay per fit, the bin's weight), takes the
    non-decreasing fit of the bins' mean losses (pool_adjacent_violators), places it at the bin edges (the mean of
    neighbouring bins; the outer edges extend the outer slopes), normalises it to a CDF F(s) from 0 to 1, piecewise
    linear between the edges, and mixes in a `floor` share of the uniform CDF in s (an equal share for every bin),
    so that every level keeps being drawn and its estimate stays current. __call__(u) = sigma(F^-1(u)): a monotone
    map of [0, 1] onto [sigma_min, sigma_max]. Before any fit, and while the fitted loss is flat, F is the unwarped
    CDF, rho_schedule's spacing with the run's rho (to piecewise-linear accuracy). state_dict() holds every
    tensor, so a resumed run draws what a straight one would. Raises ValueError for fewer than 2 bins.
    """

    def __init__(self, sigma_min, sigma_max, rho, bins=64, decay=0.95, floor=0.05, rate=0.2, device="cpu"):
        if bins < 2:
            raise ValueError(f"a time warp needs at least 2 bins, got {bins}")
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.bins, self.decay, self.floor, self.rate = bins, decay, floor, rate
        self.means, self.counts = torch.zeros(bins, dtype=torch.float64), torch.zeros(bins, dtype=torch.float64)
        self.window = torch.zeros(2, bins, device=device)  # this fit's summed cross-entropy and tokens per bin
        self.s_knots = torch.linspace(0, 1, bins + 1, dtype=torch.float64)  # the bin edges
        self.cdf_knots = self.unwarped_cdf(self.s_knots)  # F at the edges: no warp until the first fit

    def level(self, s):
        """sigma at coordinate s (tensor, any shape): sigma_min (sigma_max / sigma_min)^s."""
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** s

    def coordinate(self, sigma):
        """The coordinate s in [0, 1] of levels sigma (any shape): 0 at sigma_min, 1 at sigma_max."""
        ratio = sigma.clamp(self.sigma_min, self.sigma_max) / self.sigma_min
        return (ratio.log() / math.log(self.sigma_max / self.sigma_min)).clamp(0.0, 1.0)

    def unwarped_cdf(self, s):
        """The share of unwarped training levels (u ~ U(0, 1) through rho_schedule) below sigma(s)."""
        inv_rho = 1.0 / self.rho
        low, high = self.sigma_min ** inv_rho, self.sigma_max ** inv_rho
        return ((self.level(s) ** inv_rho - low) / (high - low)).clamp(0.0, 1.0)

    def __call__(self, u):
        """Levels sigma = sigma(F^-1(u)) for u in [0, 1], same shape and dtype as u (float)."""
        cdf, s_knots = self.cdf_knots.to(u.device, torch.float64), self.s_knots.to(u.device, torch.float64)
        u64 = u.double().clamp(0.0, 1.0)
        hi = torch.searchsorted(cdf, u64.contiguous(), right=True).clamp(1, len(cdf) - 1)
        lo = hi - 1
        w = ((u64 - cdf[lo]) / (cdf[hi] - cdf[lo]).clamp_min(1e-300)).clamp(0.0, 1.0)
        return self.level(s_knots[lo] + w * (s_knots[hi] - s_knots[lo])).to(u.dtype)

    def observe(self, sigma, ce, weight):
        """Add per-token cross-entropies (nats) ce at levels sigma, counted with weight (1 for a loss position, 0
        otherwise), to this fit's bins; all (B, L), on the device, without a host sync."""
        index = (self.coordinate(sigma.detach().float()) * self.bins).long().clamp(0, self.bins - 1).flatten()
        weight = weight.float().flatten()
        self.window[0].index_add_(0, index, ce.detach().float().flatten() * weight)
        self.window[1].index_add_(0, index, weight)

    def fitted_levels(self):
        """The non-decreasing fit of the bins' mean cross-entropies (nats), a list of `bins` floats."""
        return pool_adjacent_violators(self.means.tolist(), self.counts.tolist())

    def fit(self):
        """Fold the observed window into the running totals and refit F (a host sync); the window restarts."""
        window = self.window.double().cpu()
        observed = window[1] > 0
        mean = window[0] / window[1].clamp_min(1e-12)
        share = torch.where(self.counts > 0, self.rate, 1.0)  # a bin's first observation sets its mean
        self.means = torch.where(observed, (1 - share) * self.means + share * mean, self.means)
        self.counts = self.decay * self.counts + window[1]
        self.window.zero_()
        level = torch.tensor(self.fitted_levels(), dtype=torch.float64)  # at the bin centres
        inner = (level[1:] + level[:-1]) / 2
        first, last = level[0] - (inner[0] - level[0]), level[-1] + (level[-1] - inner[-1])
        edges = torch.cat([first[None], inner, last[None]])  # non-decreasing, at the bin edges
        rise = float(edges[-1] - edges[0])
        if rise > 0:  # the floor is uniform in s: an unwarped rho = 1 spacing would give the bins near sigma_min
            # almost nothing, and their estimates would go stale while the fit pools them with their neighbours
            self.cdf_knots = (1 - self.floor) * (edges - edges[0]) / rise + self.floor * self.s_knots
        else:
            self.cdf_knots = self.unwarped_cdf(self.s_knots)

    def fitted_loss(self):
        """(sigma at the bin centres, mean observed cross-entropy, its non-decreasing fit), lists of floats, for
        plots; bins never observed are left out."""
        seen = (self.counts > 0).tolist()
        sigmas = self.level((self.s_knots[1:] + self.s_knots[:-1]) / 2).tolist()
        return tuple([v for v, keep in zip(values, seen) if keep]
                     for values in (sigmas, self.means.tolist(), self.fitted_levels()))

    def state_dict(self):
        """Everything that defines the warp and its fit, as plain floats and CPU tensors (checkpoint-safe)."""
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "rho": self.rho, "bins": self.bins,
                "decay": self.decay, "floor": self.floor, "rate": self.rate, "means": self.means.clone(),
                "counts": self.counts.clone(), "window": self.window.cpu().clone(), "cdf_knots": self.cdf_knots.clone()}

    def load_state_dict(self, state):
        """Take the fit of state_dict() (of a warp with the same bins)."""
        self.means, self.counts = state["means"].double().clone(), state["counts"].double().clone()
        self.window.copy_(state["window"])
        self.cdf_knots = state["cdf_knots"].double().clone()

    @classmethod
    def from_state_dict(cls, state, device="cpu"):
        """The TimeWarp that state_dict() described."""
        warp = cls(state["sigma_min"], state["sigma_max"], state["rho"], state["bins"], state["decay"],
                   state["floor"], state["rate"], device)
        warp.load_state_dict(state)
        return warp


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


def network_logits(model, x, sigma, segment_ids=None, sigma_data=SIGMA_DATA, self_cond=None):
    """The preconditioned network: logits (B, L, V) float32 for noisy embeddings x (B, L, E) at levels sigma (B, L),
    given a previous estimate of the clean embeddings self_cond (B, L, E) or None (read by self-conditioned
    models only)."""
    c_in, c_noise = edm_preconditioning(sigma, sigma_data)
    if self_cond is None:  # keeps the signature of networks without self-conditioning
        return model((append_dims(c_in, x.ndim) * x).float(), c_noise.float(), segment_ids).float()
    return model((append_dims(c_in, x.ndim) * x).float(), c_noise.float(), segment_ids, self_cond.float()).float()


def denoiser_logits(model, x, sigma, segment_ids=None, sigma_data=SIGMA_DATA):
    """The logits of the denoiser evaluated afresh, with no earlier estimate (likelihood bound, loss curves):
    network_logits, and for a self-conditioned model a first pass without an estimate whose score-interpolated
    output feeds a second pass (Chen et al. 2022), a function of x alone as the bound requires. (B, L, V) float32."""
    if not model.cfg.self_cond:
        return network_logits(model, x, sigma, segment_ids, sigma_data)
    with torch.no_grad():
        first = network_logits(model, x, sigma, segment_ids, sigma_data)
        estimate = score_interpolation(first, x, sigma, model.embedding_table())
    return network_logits(model, x, sigma, segment_ids, sigma_data, estimate)


def score_interpolation(logits, x, sigma, table):
    """D(x; sigma) from the network's logits (B, L, V): the expected clean embedding under the predicted token
    distribution, softmax(logits) @ table (Dieleman et al. 2022, section 3), and exactly x where sigma = 0.
    x (B, L, E), sigma (B, L), table (V, E) -> (B, L, E) float32 (float64 for float64 logits)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    x0_hat = logits.to(dtype).softmax(dim=-1) @ table.to(dtype)  # (B, L, E)
    return torch.where(append_dims(sigma == 0, x.ndim), x.to(dtype), x0_hat)


def denoise(model, x, sigma, segment_ids=None, sigma_data=SIGMA_DATA):
    """The denoiser D(x; sigma) by score interpolation: x (B, L, E) float, sigma (B, L) float ->
    denoised (B, L, E) float32, exactly x where sigma = 0."""
    logits = denoiser_logits(model, x, sigma, segment_ids, sigma_data)
    return score_interpolation(logits, x, sigma, model.embedding_table())


def score_interpolation_loss(model, ids, sigma, noise, segment_ids=None, cond_mask=None, sigma_data=SIGMA_DATA,
                             return_logits=False, self_cond=False):
    """Per-token cross-entropy in nats, (B, L) float32, unreduced (CDCD's loss); with return_logits, also the
    logits (B, L, V) float32 it was computed from.

    ids (B, L) int64 clean tokens; sigma (B,) or (B, L) float noise levels (a per-sequence level is
    broadcast over the row); noise (B, L, E) standard normal; cond_mask (B, L) bool positions held clean
    (their sigma is set to 0). With self_cond (a self-conditioned model's share of batches), a first pass without
    gradient supplies the estimate of the clean embeddings that the second, trained pass reads (Chen et al. 2022,
    Analog Bits, sec. 3.2); otherwise the model reads none. The caller masks out conditioned and fill positions
    when reducing.
    """
    if sigma.ndim == 1:
        sigma = sigma[:, None].expand(ids.shape)
    if cond_mask is not None:
        sigma = sigma.masked_fill(cond_mask, 0.0)
    x = model.embed(ids) + append_dims(sigma, noise.ndim) * noise  # (B, L, E)
    estimate = None
    if self_cond:
        with torch.no_grad():
            first = network_logits(model, x, sigma, segment_ids, sigma_data)
            estimate = score_interpolation(first, x, sigma, model.embedding_table())  # (B, L, E), clean where held
    logits = network_logits(model, x, sigma, segment_ids, sigma_data, estimate)  # (B, L, V)
    ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(ids.shape)  # softmax over
    # the contiguous last dimension: on the CPU about twice as fast as over dim 1 of a transposed view
    return (ce, logits) if return_logits else ce


def autoregressive_loss(model, ids, segment_ids=None, return_logits=False):
    """The autoregressive baseline's loss: per-token cross-entropy in nats (B, L) float32, where position t holds
    -log p(ids[t] | the tokens before it in its row); 0 at t = 0. The network (built with causal=True) reads the
    clean embeddings with c_noise = 0, so it has no noise conditioning. With return_logits, also the logits
    (B, L, V) aligned the same way (position t: the prediction of ids[t]; zeros at t = 0). The caller keeps only
    positions that continue their own packed sequence (autoregressive_targets)."""
    logits = model(model.embed(ids), torch.zeros(ids.shape, device=ids.device), segment_ids).float()
    B, L, V = logits.shape
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(B, L - 1)
    ce = F.pad(ce, (1, 0))
    return (ce, F.pad(logits[:, :-1], (0, 0, 1, 0))) if return_logits else ce


def autoregressive_targets(segment_ids):
    """Positions the baseline is trained to predict: a token of a packed sequence that follows one of the same
    sequence (the first token, bos, has nothing to be predicted from). segment_ids (B, L) -> (B, L) bool."""
    follows = torch.zeros_like(segment_ids, dtype=torch.bool)
    follows[:, 1:] = segment_ids[:, 1:] == segment_ids[:, :-1]
    return follows & (segment_ids > 0)


@torch.no_grad()
def nll_bound(model, ids, cond_mask, sigma_min, sigma_max, draws, segment_ids=None, generator=None,
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
    difference of about 0.005 nats a token at sigma_max = 10. The variance
    returned treats the draws as independent, which overstates it under stratification (a conservative error).

    ids (B, L) int64; cond_mask (B, L) bool, held positions (bos, row padding); segment_ids (B, L) or None;
    draws >= 2 per row. Returns a dict of (B,) float64 CPU tensors: "reconstruction", "diffusion", "prior" (nats
    per row), "variance" (of the row's Monte Carlo estimate of their sum) and "tokens" (free positions).
    Raises ValueError if draws < 2 or sigma_min >= sigma_max.
    """
    if draws < 2 or not 0 < sigma_min < sigma_max:
        raise ValueError(f"need draws >= 2 and 0 < sigma_min < sigma_max, got {draws}, {sigma_min}, {sigma_max}")
    free = ~cond_mask
    x = model.embed(ids).double()  # (B, L, E)
    E, log_ratio = x.shape[-1], math.log(sigma_max / sigma_min)
    s2 = sigma_max ** 2 + sigma_data ** 2
    prior = 0.5 * ((E * sigma_max ** 2 + (x ** 2).sum(-1)) / s2 - E + E * math.log(s2 / sigma_max ** 2))  # (B, L)
    per_draw = []
    for j in range(draws):  # stratified: draw j of every row from the j-th of `draws` equal slices of [0, 1)
        u = ((j + torch.rand(ids.shape[0], generator=generator, dtype=torch.float64)) / draws).to(ids.device)
        sigma = sigma_min * torch.exp(u * log_ratio)  # (B,) log-uniform
        for level, diffusion_term in ((sigma, True), (torch.full_like(sigma, sigma_min), False)):
            sigma_tok = torch.where(free, level[:, None], 0.0)  # (B, L)
            eps = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(ids.device)
            z = x + append_dims(sigma_tok, 3) * eps
            logits = denoiser_logits(model, z, sigma_tok, segment_ids, sigma_data).double()  # (B, L, V)
            if diffusion_term:
                denoised = score_interpolation(logits, z, sigma_tok, model.embedding_table().double())
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
            "tokens": free.sum(-1).double().cpu()}


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


SAMPLERS = {"euler": euler_step, "heun": heun_step, "stochastic": stochastic_step, "iterative": iterative_step}


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
# the uniform progress to u in (0, 1] (state.u before it). Progress becomes sigma through rho_schedule.
# advance() keeps each position monotone and puts every one at sigma_min when u = 1, so a schedule only
# decides who moves how far. Adding one is adding a function here, its name to SCHEDULES, and its flags to
# sample.py's build_schedule.


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


def noise_levels(t, free, sigma_min, sigma_max, rho, dtype=torch.float32, warp=None):
    """Per-token sigma (B, L) `dtype` at progress t (B, L): rho_schedule on free positions, or with a TimeWarp
    `warp` the training warp's level warp(1 - t) (CDCD's warped sampling grid); 0 on the others."""
    sigma = rho_schedule(t, sigma_min, sigma_max, rho) if warp is None else warp(1.0 - t)
    return torch.where(free, sigma, 0.0).to(dtype)


def schedule_sigmas(schedule, cond_mask, steps, sigma_min, sigma_max, rho, warp=None):
    """The levels (steps + 1, B, L) float32 that `schedule` gives a batch, step by step: sigma_max on free
    positions at first, sigma_min at index steps - 1 (for steps >= 2), then 0; 0 throughout on conditioned ones.
    For a schedule that reads predictions (confidence) these are the levels when no position turns confident.
    Raises ValueError if steps < 1."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    state = ScheduleState.start(cond_mask)
    levels = [noise_levels(state.t, state.free, sigma_min, sigma_max, rho, warp=warp)]
    for i in range(1, steps):
        state.t, state.u = advance(schedule, i / (steps - 1), state), i / (steps - 1)
        levels.append(noise_levels(state.t, state.free, sigma_min, sigma_max, rho, warp=warp))
    return torch.stack(levels + [torch.zeros_like(levels[0])])


@torch.no_grad()
def generate(model, step, schedule, ids, cond_mask, seeds, steps, sigma_min, sigma_max, rho, segment_ids=None,
             early_exit=None, exit_confidence=0.5, precision="fp32", dtype=torch.float32, callback=None,
             sigma_data=SIGMA_DATA, warp=None):
    """Sample the free positions of a batch; conditioned ids come back exactly as given.

    ids (B, L) int64 (free positions may hold anything); cond_mask (B, L) bool; seeds: B ints, one noise
    generator per row, so that a sample does not depend on its batch (EDM's StackedRandomGenerator); step: a
    SAMPLERS function with its parameters bound; schedule: a SCHEDULES function likewise; `steps` steps on the
    progress grid u = i / (steps - 1), the last from sigma_min to 0; progress t becomes sigma through
    rho_schedule(t, sigma_min, sigma_max, rho), or, with a TimeWarp `warp`, through the training warp (noise_levels);
    segment_ids (B, L) int or None for rows
    shorter than the batch (attention stays within equal ids). early_exit K: a row stops once its argmax tokens
    have not changed for K steps in a row (the patience criterion of Lo Cicero Vaina et al. 2023), counting
    only steps whose latest prediction has a mean top probability over the free positions of at least
    exit_confidence: near sigma_max the prediction barely depends on x, so its argmax stands still long before
    anything is decided (0 counts every step). The network runs under `precision`'s autocast; x, sigma, the
    softmax and score interpolation in `dtype` (torch.float32 or torch.float64). A self-conditioned model reads
    the estimate of the row's previous network evaluation (none at the first). callback(i, rows, tokens, sigma),
    if given, sees every step i: the rows still sampling (b,) int64, their tokens (b, L) and levels (b, L) after it.

    Each free token is the argmax of its logits at the last evaluation where its sigma was above 0 (CDCD decodes
    the final logits; the nearest embedding to a score-interpolated mean can be a token no step predicted).
    Returns ids (B, L) int64, and per row the network evaluations and the steps taken, each (B,) int64 on the CPU.
    """
    device, (B, L), E = ids.device, ids.shape, model.cfg.embedding_dim
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    table = model.embedding_table().to(dtype)  # (V, E)
    out, tokens = ids.clone(), ids.clone()
    evaluations, steps_taken = torch.zeros(B, dtype=torch.long), torch.full((B,), steps, dtype=torch.long)
    rows = torch.arange(B)  # the rows still sampling, as indices into the batch
    state = ScheduleState.start(cond_mask)
    unchanged = torch.zeros(B, dtype=torch.long, device=device)

    # a row draws noise for its own length only, so that its stream does not depend on the longest row beside it
    lengths = [L] * B if segment_ids is None else (segment_ids != 0).sum(dim=1).tolist()

    def noise():
        drawn = [torch.randn(lengths[r], E, generator=generators[r], dtype=dtype) for r in rows.tolist()]
        return torch.stack([F.pad(n, (0, 0, 0, L - len(n))) for n in drawn]).to(device)  # (b, L, E), any device alike

    def denoiser(x, sigma):
        estimate = state.denoised if model.cfg.self_cond else None  # the previous evaluation's (Chen et al. 2022)
        with autocast(device, precision):
            logits = network_logits(model, x, sigma, segment_ids, sigma_data, estimate)
        probs = logits.to(dtype).softmax(dim=-1)  # (b, L, V)
        confidence, argmax = probs.max(dim=-1)
        state.stable = torch.zeros_like(state.free) if state.argmax is None else argmax == state.argmax
        state.confidence, state.argmax = confidence, argmax
        tokens.copy_(torch.where(sigma > 0, argmax, tokens))
        evaluations[rows] += 1
        state.denoised = torch.where(append_dims(sigma == 0, x.ndim), x, probs @ table)
        return state.denoised

    sigma = noise_levels(state.t, state.free, sigma_min, sigma_max, rho, dtype, warp)
    x = model.embed(ids).to(dtype) * append_dims(cond_mask, 3) + append_dims(sigma, 3) * noise()  # (B, L, E)
    for i in range(steps):
        last = i == steps - 1
        u = 1.0 if last else (i + 1) / (steps - 1)
        t_next = advance(schedule, u, state)
        sigma_next = torch.zeros_like(sigma) if last else noise_levels(t_next, state.free, sigma_min, sigma_max, rho,
                                                                       dtype, warp)
        before = tokens.clone()
        x = step(denoiser, x, sigma, sigma_next, noise)
        sigma, state.t, state.u = sigma_next, t_next, u
        if callback is not None:
            callback(i, rows, tokens, sigma)
        done = torch.full_like(unchanged, last, dtype=torch.bool)
        if early_exit:
            changed = ((tokens != before) & state.free).any(dim=1)
            confidence = (state.confidence * state.free).sum(dim=1) / state.free.sum(dim=1).clamp_min(1)
            unchanged = torch.where(changed | (confidence < exit_confidence), 0, unchanged + 1)
            done |= unchanged >= early_exit
        if done.any():  # a host sync once a step
            finished = rows[done.cpu()]
            out[finished.to(device)], steps_taken[finished] = tokens[done], i + 1  # held tokens were never touched
            keep = ~done
            rows, x, sigma, tokens, unchanged = rows[keep.cpu()], x[keep], sigma[keep], tokens[keep], unchanged[keep]
            state = state.select(keep)
            segment_ids = None if segment_ids is None else segment_ids[keep]
            if not len(rows):
                break
    return out, evaluations, steps_taken
