"""The diffusion process: noise levels, preconditioning, the score-interpolation denoiser, the training loss
and the samplers. The network is received as an argument (anything with `embed`, `embedding_table` and
`__call__(x, c_noise, segment_ids) -> logits`); model.py is never imported here.

Every noise level is per token: sigma has shape (B, L), and a position with sigma = 0 is conditioned (held
at its clean embedding). Process maths runs in float32 whatever the network's precision.
"""
import torch
import torch.nn.functional as F

from utils import append_dims

SIGMA_DATA = 1.0  # normalised embeddings of norm sqrt(E) have unit variance per coordinate
SIGMA_FLOOR = 1e-3  # sigma = 0 has ln(sigma) = -inf; the network sees conditioned positions at this level


def rho_schedule(u, sigma_min, sigma_max, rho):
    """Noise level at progress u in [0, 1]: sigma_max at u = 0, sigma_min at u = 1, spaced by rho
    (Karras et al. 2022, eq. 5; rho = 1 is linear in sigma, as the original project trains)."""
    inv_rho = 1.0 / rho
    return (sigma_max ** inv_rho + u * (sigma_min ** inv_rho - sigma_max ** inv_rho)) ** rho


def sigma_grid(steps, sigma_min, sigma_max, rho):
    """The sampling grid of Karras et al. (2022) eq. 5: (steps + 1,) float32 from sigma_max down to sigma_min,
    then a final 0. Raises ValueError if steps < 1."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    u = torch.arange(steps, dtype=torch.float64) / max(steps - 1, 1)
    return torch.cat([rho_schedule(u, sigma_min, sigma_max, rho), torch.zeros(1, dtype=torch.float64)]).float()


def uniform_schedule(grid, cond_mask):
    """Per-token schedule in which every free position follows `grid` (N + 1,) and every conditioned
    position stays at 0: cond_mask (B, L) bool -> sigmas (N + 1, B, L) float32."""
    sigmas = grid.to(cond_mask.device)[:, None, None].expand(-1, *cond_mask.shape)
    return sigmas.masked_fill(cond_mask, 0.0)


def draw_training_sigma(segment_ids, sigma_min, sigma_max, rho, per_token, generator=None):
    """Training noise levels (B, L) float32 from u ~ U(0, 1) through rho_schedule: one level per packed
    sequence (all tokens sharing a segment id share it), or, with `per_token`, an independent level at every
    position (multi-level diffusion, after AR-Diffusion, Wu et al. 2023)."""
    B, L = segment_ids.shape
    u = torch.rand(B, L + 1, generator=generator, device=segment_ids.device)  # segment ids lie in [0, L]
    u = u[:, :L] if per_token else u.gather(1, segment_ids)
    return rho_schedule(u, sigma_min, sigma_max, rho)


def edm_preconditioning(sigma, sigma_data=SIGMA_DATA):
    """Input scaling and noise input of the network (Karras et al. 2022, Table 1):
    c_in = 1 / sqrt(sigma^2 + sigma_data^2) and c_noise = ln(sigma) / 4, with sigma floored at SIGMA_FLOOR
    for c_noise only. sigma (B, L) float -> (c_in, c_noise), each (B, L) float32.

    EDM's output scalings c_skip and c_out are not used: with score interpolation the network's output,
    softmax(logits) @ embeddings, is already the estimate of the clean embedding (CDCD, section 3), and a
    skip connection would mix the noisy input into it. The one boundary condition they impose, D(x; 0) = x,
    is kept by `denoise`.
    """
    sigma = sigma.float()
    c_in = torch.rsqrt(sigma ** 2 + sigma_data ** 2)
    c_noise = sigma.clamp_min(SIGMA_FLOOR).log() / 4
    return c_in, c_noise


def network_logits(model, x, sigma, segment_ids=None, sigma_data=SIGMA_DATA):
    """The preconditioned network: logits (B, L, V) float32 for noisy embeddings x (B, L, E) at levels sigma (B, L)."""
    c_in, c_noise = edm_preconditioning(sigma, sigma_data)
    return model(append_dims(c_in, x.ndim) * x, c_noise, segment_ids).float()


def score_interpolation(logits, x, sigma, table):
    """D(x; sigma) from the network's logits (B, L, V): the expected clean embedding under the predicted token
    distribution, softmax(logits) @ table (Dieleman et al. 2022, section 3), and exactly x where sigma = 0.
    x (B, L, E), sigma (B, L), table (V, E) -> (B, L, E) float32."""
    x0_hat = logits.float().softmax(dim=-1) @ table  # (B, L, E)
    return torch.where(append_dims(sigma == 0, x.ndim), x.float(), x0_hat)


def denoise(model, x, sigma, segment_ids=None, sigma_data=SIGMA_DATA):
    """The denoiser D(x; sigma) by score interpolation: x (B, L, E) float, sigma (B, L) float ->
    denoised (B, L, E) float32, exactly x where sigma = 0."""
    logits = network_logits(model, x, sigma, segment_ids, sigma_data)
    return score_interpolation(logits, x, sigma, model.embedding_table())


def score_interpolation_loss(model, ids, sigma, noise, segment_ids=None, cond_mask=None, sigma_data=SIGMA_DATA,
                             return_logits=False):
    """Per-token cross-entropy in nats, (B, L) float32, unreduced (CDCD's loss); with return_logits, also the
    logits (B, L, V) float32 it was computed from.

    ids (B, L) int64 clean tokens; sigma (B,) or (B, L) float noise levels (a per-sequence level is
    broadcast over the row); noise (B, L, E) standard normal; cond_mask (B, L) bool positions held clean
    (their sigma is set to 0). The caller masks out conditioned and fill positions when reducing.
    """
    if sigma.ndim == 1:
        sigma = sigma[:, None].expand(ids.shape)
    if cond_mask is not None:
        sigma = sigma.masked_fill(cond_mask, 0.0)
    x = model.embed(ids) + append_dims(sigma, noise.ndim) * noise  # (B, L, E)
    logits = network_logits(model, x, sigma, segment_ids, sigma_data)  # (B, L, V)
    ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(ids.shape)  # softmax over
    # the contiguous last dimension: on the CPU about twice as fast as over dim 1 of a transposed view
    return (ce, logits) if return_logits else ce


def ode_derivative(x, denoised, sigma):
    """dx/dsigma = (x - D(x; sigma)) / sigma of the probability-flow ODE (Karras et al. 2022, eq. 4 with
    sigma(t) = t); 0 where sigma = 0, so conditioned positions never move."""
    sigma = append_dims(sigma, x.ndim)
    return torch.where(sigma > 0, (x - denoised) / sigma.clamp_min(SIGMA_FLOOR), torch.zeros_like(x))


@torch.no_grad()
def sample_euler(denoiser, x, sigmas):
    """Euler steps of the probability-flow ODE (Karras et al. 2022, Algorithm 1 without the Heun correction).

    denoiser(x, sigma) -> denoised; x (B, L, E) float32 at noise level sigmas[0]; sigmas (N + 1, B, L)
    per-token levels, non-increasing, ending at 0. Returns x (B, L, E) at sigmas[-1].
    """
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d = ode_derivative(x, denoiser(x, sigma), sigma)
        x = x + append_dims(sigma_next - sigma, x.ndim) * d
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas):
    """Heun's second-order steps (Karras et al. 2022, Algorithm 1): an Euler step, then the average of the
    slopes at both ends; positions stepping into sigma = 0 keep the Euler step (no division by zero).
    Arguments and result as sample_euler; two network evaluations per step while any sigma_next > 0."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        dt = append_dims(sigma_next - sigma, x.ndim)
        d = ode_derivative(x, denoiser(x, sigma), sigma)
        x_euler = x + dt * d
        if not (sigma_next > 0).any():
            x = x_euler
            continue
        d_next = ode_derivative(x_euler, denoiser(x_euler, sigma_next), sigma_next)
        x = torch.where(append_dims(sigma_next > 0, x.ndim), x + dt * (d + d_next) / 2, x_euler)
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun}


def seeded_noise(shape, seeds, device):
    """Standard normal noise (B, *shape) with row b drawn from its own generator seeded seeds[b], so a
    sample does not depend on the batch it is drawn in (EDM's StackedRandomGenerator)."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device)


@torch.no_grad()
def generate(model, sampler, ids, cond_mask, sigmas, seeds, sigma_data=SIGMA_DATA):
    """Sample token ids for the free positions of a batch; conditioned ids come back exactly as given.

    ids (B, L) int64 (free positions may hold anything); cond_mask (B, L) bool; sigmas (N + 1, B, L) float32
    per-token schedule, 0 wherever cond_mask; seeds: B ints for the initial noise. Each free position's token
    is the argmax of its logits at the last evaluation where its sigma was above 0 (CDCD decodes the final
    logits; the nearest embedding to a score-interpolated mean can be a token no step predicted).
    Returns ids (B, L) int64.
    """
    if (sigmas[:, cond_mask] != 0).any():
        raise ValueError("conditioned positions must stay at sigma = 0 throughout the schedule")
    tokens = ids.clone()

    def denoiser(x, sigma):
        logits = network_logits(model, x, sigma, None, sigma_data)
        tokens.copy_(torch.where(sigma > 0, logits.argmax(dim=-1), tokens))
        return score_interpolation(logits, x, sigma, model.embedding_table())

    x_clean = model.embed(ids) * append_dims(cond_mask, 3)
    sampler(denoiser, x_clean + append_dims(sigmas[0], 3) * seeded_noise(x_clean.shape[1:], seeds, ids.device), sigmas)
    return torch.where(cond_mask, ids, tokens)
