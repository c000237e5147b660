"""CDCD's time warping (Dieleman et al. 2022, section 4): a map from u ~ U(0, 1) to training noise levels, fitted
online to the training loss by noise level so that levels are drawn where the loss changes. No project imports:
diffusion.py and train.py call a warp as `warp(u) -> sigma`."""
import math

import torch

WARP_SHAPES = ("monotone", "gumbel")  # the fit of the loss by level: isotonic, or a Gumbel CDF in log sigma


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


def gumbel_levels(gamma, means, counts):
    """The Gumbel CDF curve H exp(-exp(-(gamma - mu) / beta)) closest to the bins' mean cross-entropies `means` at
    log noise-to-signal ratios `gamma` (weighted least squares, weights `counts`), evaluated at `gamma`: the shape of
    LangFlow's information-uniform density (arXiv 2604.11748, a Gumbel density over log-SNR fitted to the loss), a
    smooth parametric alternative to the isotonic fit. mu and beta come from a grid search (mu across the observed
    range and 2 beyond, beta from 0.05 to 20 in log steps) refined once on a finer grid around the best pair, H in
    closed form for each pair. 1-D float64 tensors in; a list of floats out, non-decreasing in gamma."""
    seen = counts > 0
    g, m, w = gamma[seen], means[seen], counts[seen]

    def best(mu, beta):  # the (mu, beta, H) of least weighted squared error on the grid mu x beta
        curve = torch.exp(-torch.exp(-(g[None, None] - mu[:, None, None]) / beta[None, :, None]))  # (mu, beta, bins)
        height = ((w * m * curve).sum(-1) / (w * curve.square()).sum(-1).clamp_min(1e-300)).clamp_min(0.0)
        i, j = divmod(int((w * (height[..., None] * curve - m).square()).sum(-1).argmin()), len(beta))
        return float(mu[i]), float(beta[j]), float(height[i, j])

    mu_step, beta_ratio = (float(g.max() - g.min()) + 4) / 160, 400 ** (1 / 80)
    mu, beta, _ = best(torch.linspace(float(g.min()) - 2, float(g.max()) + 2, 161, dtype=torch.float64),
                       torch.logspace(math.log10(0.05), math.log10(20), 81, dtype=torch.float64))
    mu, beta, height = best(torch.linspace(mu - mu_step, mu + mu_step, 41, dtype=torch.float64),
                            beta * torch.logspace(-1, 1, 41, base=beta_ratio, dtype=torch.float64))
    return (height * torch.exp(-torch.exp(-(gamma - mu) / beta))).tolist()


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
    CDF, rho_schedule's spacing with the run's rho (to piecewise-linear accuracy). With shape "gumbel" the
    non-decreasing fit is a Gumbel CDF in gamma = 2 ln sigma, the log noise-to-signal ratio of an embedding dimension
    (gumbel_levels), instead of the isotonic one. state_dict() holds every tensor, so a resumed run draws what a
    straight one would. Raises ValueError for fewer than 2 bins or an unknown shape.
    """

    def __init__(self, sigma_min, sigma_max, rho, bins=64, decay=0.95, floor=0.05, rate=0.2, device="cpu",
                 shape="monotone"):
        if bins < 2:
            raise ValueError(f"a time warp needs at least 2 bins, got {bins}")
        if shape not in WARP_SHAPES:
            raise ValueError(f"a time warp's shape is one of {', '.join(WARP_SHAPES)}, not {shape!r}")
        self.shape = shape
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.bins, self.decay, self.floor, self.rate = bins, decay, floor, rate
        self.means, self.counts = torch.zeros(bins, dtype=torch.float64), torch.zeros(bins, dtype=torch.float64)
        self.window = torch.zeros(2, bins, device=device)  # this fit's summed cross-entropy and tokens per bin
        self.s_knots = torch.linspace(0, 1, bins + 1, dtype=torch.float64)  # the bin edges
        self.cdf_knots = self.unwarped_cdf(self.s_knots)  # F at the edges: no warp until the first fit
        self._on_device = None  # (the cdf_knots copied, their copy and s_knots' on a device): knots_on

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

    def knots_on(self, device):
        """(cdf_knots, s_knots), float64 on `device`: copied from the host once per fit, not at every draw."""
        if self._on_device is None or self._on_device[0] is not self.cdf_knots or self._on_device[1].device != device:
            self._on_device = (self.cdf_knots, self.cdf_knots.to(device), self.s_knots.to(device))
        return self._on_device[1:]

    def density(self, sigma):
        """The density (per unit of sigma) of the levels this warp draws, at sigma (any shape, in [sigma_min,
        sigma_max]): F'(s) ds/dsigma, F piecewise linear in s = coordinate(sigma), so F' is the slope of the segment
        that holds s and ds/dsigma = 1 / (sigma ln(sigma_max / sigma_min)). float64, same shape."""
        cdf, s_knots = self.knots_on(sigma.device)
        s = self.coordinate(sigma.double())
        hi = torch.searchsorted(s_knots, s.contiguous(), right=True).clamp(1, len(s_knots) - 1)
        slope = (cdf[hi] - cdf[hi - 1]) / (s_knots[hi] - s_knots[hi - 1])
        return slope / (sigma.double().clamp(self.sigma_min, self.sigma_max) * math.log(self.sigma_max / self.sigma_min))

    def __call__(self, u):
        """Levels sigma = sigma(F^-1(u)) for u in [0, 1], same shape and dtype as u (float)."""
        cdf, s_knots = self.knots_on(u.device)
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
        """The non-decreasing fit of the bins' mean cross-entropies (nats), a list of `bins` floats: isotonic, or with
        shape "gumbel" a Gumbel CDF in 2 ln sigma."""
        if self.shape == "gumbel" and bool((self.counts > 0).any()):
            centres = self.level((self.s_knots[1:] + self.s_knots[:-1]) / 2)
            return gumbel_levels(2 * centres.log(), self.means, self.counts)
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
                "decay": self.decay, "floor": self.floor, "rate": self.rate, "shape": self.shape,
                "means": self.means.clone(),
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
                   state["floor"], state["rate"], device, state.get("shape", "monotone"))  # older: monotone
        warp.load_state_dict(state)
        return warp
