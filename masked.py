"""Masked (absorbing-state) diffusion as an objective, MDLM (Sahoo et al. 2024, arXiv 2406.07524): the forward process
replaces each free token by [MASK] with probability t (the log-linear schedule, alpha_t = 1 - t), the network
predicts the clean tokens of the masked positions from the rest (bidirectionally), the loss is the continuous-time
ELBO, and sampling unmasks positions from t = 1 to 0 (ancestral steps). The network is received as an argument (a
model.ScoreLM built with masked=True: its embedding table has one row more, [MASK] at id `vocab_size`, and
`head_weights()` leaves that row out, so the prediction gives [MASK] probability zero, MDLM's SUBS
parameterisation); it reads the embeddings of the partly masked row with c_noise = 0: the MDLM denoiser needs no
time input (Sahoo et al. 2024, section 3.2.3), which is also what lets a step that changed nothing reuse the last
output. Shapes: B batch, L length, V vocabulary (without [MASK]).
"""
import torch
import torch.nn.functional as F

from autoregressive import top_p_filter
from chunked import tied_cross_entropy
from diffusion import draw_uniform
from utils import autocast, row_draws, row_generators, row_lengths

T_MIN = 1e-3  # the lowest training t: the 1/t weight of a lower one would make the loss's variance unbounded


def mask_id(model):
    """The id of [MASK]: one past the tokenizer's pieces."""
    return model.cfg.vocab_size


def draw_mask_times(segment_ids, per_token, generator=None, t_min=T_MIN):
    """Training times t (B, L) float32 in [t_min, 1], each token's mask probability: one per packed sequence (all
    tokens sharing a segment id share it), or with `per_token` one per position, stratified over the batch (MDLM's
    low-discrepancy draws: n draws take one value from each of n equal slices; diffusion.draw_uniform)."""
    u = draw_uniform(segment_ids, per_token, generator, stratified=True)
    return (t_min + (1 - t_min) * u).float()


def draw_masks(t, free, generator=None):
    """Which positions the forward process masks at times t (B, L): each free position (B, L) bool independently with
    probability t; held ones (bos, prompts, the training's conditioning spans, fill) never. (B, L) bool."""
    return (torch.rand(t.shape, generator=generator, device=t.device) < t) & free


def masked_loss(model, ids, t, masked, segment_ids=None, weight=None, uniform=False):
    """MDLM's continuous-time ELBO integrand for the log-linear schedule (Sahoo et al. 2024, eq. 11 with
    alpha_t = 1 - t, so -alpha'_t / (1 - alpha_t) = 1 / t): ce (B, L) float32 holds -log p(ids | masked row) / t in
    nats at masked positions and 0 elsewhere (SUBS: unmasked tokens are carried over, so they cost nothing); with
    `uniform`, the masked cross-entropy unweighted (not a bound; a common lower-variance choice). hit (B, L) bool is
    whether the most likely token at a masked position is its own, True elsewhere. loss is the sum of weight * ce,
    weight (B, L) float or None (every position 1). ids (B, L) int64 in [0, V); t (B, L) float in (0, 1]; masked (B, L)
    bool; segment_ids (B, L) or None (one sequence a row). Returns (loss, ce, hit) as score_interpolation_loss does."""
    x = model.embed(torch.where(masked, mask_id(model), ids))
    features = model.features(x, torch.zeros(ids.shape, device=ids.device), segment_ids)
    scale = masked.float() if uniform else masked.float() / t
    weight = scale if weight is None else weight * scale
    table, bias = model.head_weights()  # the pieces' rows only: [MASK] is never predicted
    loss, ce, hit = tied_cross_entropy(features, table, bias, ids, weight)
    return loss, ce * scale, hit | ~masked


@torch.no_grad()
def nll_bound(model, ids, cond_mask, draws, segment_ids=None, seeds=None):
    """Monte Carlo estimate of MDLM's ELBO, an upper bound on -log p(free tokens | held tokens), per row, in nats.

    With n free positions and t ~ U(0, 1), the continuous-time bound E_t[(1/t) sum_{masked l} -log p(x_l | z_t)]
    (Sahoo et al. 2024, eq. 11) equals sum_{k=1..n} (1/k) E_{|M| = k}[sum_{l in M} -log p(x_l | x with M masked)],
    M a uniformly random set of k free positions: given t, k is Binomial(n, t), and
    int_0^1 (1/t) C(n, k) t^k (1 - t)^(n-k) dt = 1/k (the any-order autoregressive form; Ou et al. 2024, arXiv
    2406.03736, Theorem 1). That form is estimated here: k uniform on 1..n (weight n), stratified over the draws
    (draw j of a row takes k from the j-th of `draws` equal slices), so that the estimate is exact in expectation
    without the 1/t weight's unbounded variance near t = 0. The variance returned treats the draws as independent,
    which overstates it under stratification (a conservative error). Each row draws from its own generator, seeded by
    its seed: first its `draws` values of k, then each draw's order for its own length only (utils.row_draws), so
    that a row's estimate does not depend on its batch, and two rows of one seed share their k slices.

    ids (B, L) int64; cond_mask (B, L) bool, held positions (bos, prompts, row padding); segment_ids (B, L) or
    None; draws >= 2; seeds: B ints (default 0, 1, ...). Returns a dict of float64 CPU tensors: "masked" (the
    estimate, nats per row, (B,)), "variance" (of that estimate, (B,)), "tokens" (free positions, (B,)) and
    "per_draw" (B, draws), each draw's estimate. Raises ValueError if draws < 2."""
    if draws < 2:
        raise ValueError(f"need draws >= 2, got {draws}")
    free = ~cond_mask & (segment_ids > 0 if segment_ids is not None else True)
    n = free.sum(-1).cpu()  # (B,), on the host once: k is drawn there
    generators = row_generators(range(len(ids)) if seeds is None else seeds)
    lengths = row_lengths(ids, segment_ids)
    v = (torch.arange(draws) + torch.stack([torch.rand(draws, generator=g, dtype=torch.float64) for g in generators])
         ) / draws  # (B, draws), stratified
    estimates = []
    for j in range(draws):
        k = (v[:, j] * n).floor().long().clamp_max(n - 1) + 1  # uniform on 1..n
        keys = row_draws(generators, lengths, ids.shape[1], uniform=True).to(ids.device).masked_fill(~free, 2.0)
        rank = keys.argsort(-1).argsort(-1)  # each free position's place in a random order
        masked = rank < k.to(ids.device)[:, None]
        x = model.embed(torch.where(masked, mask_id(model), ids))
        with autocast(ids.device, "fp32"):
            logits = model(x, torch.zeros(ids.shape, device=ids.device), segment_ids).double()
        ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(ids.shape)
        estimates.append((ce * masked).sum(-1).cpu() * (n / k))
    estimates = torch.where(n > 0, torch.stack(estimates), 0.0)  # (draws, B); a row with nothing free scores 0
    return {"masked": estimates.mean(0), "variance": estimates.var(0) / draws, "tokens": n.double(),
            "per_draw": estimates.T.contiguous()}


@torch.no_grad()
def generate_masked(model, ids, cond_mask, seeds, steps, segment_ids=None, temperature=1.0, top_p=1.0,
                    precision="fp32", callback=None):
    """Ancestral sampling (Sahoo et al. 2024, eq. 7 with the log-linear schedule): the free positions start masked at
    t = 1; a step from t_i = 1 - i/steps to s = t_i - 1/steps unmasks each masked position with probability
    (t_i - s) / t_i, giving it a token drawn from softmax(logits / temperature) truncated to its top_p nucleus; at
    s = 0 every position left is unmasked. A position then survives step i with probability s, so it unmasks at a step
    uniform on 0..steps-1, independently of the others: that step is drawn once per position, and only the steps in
    which some position unmasks are run (the same process, without the empty steps). The network has no time input,
    so its output is reused until a row's tokens change (MDLM's caching): a row counts an evaluation only when its
    tokens changed since its last one. Each row draws from its own generator seeded by its seed, as many values as the
    row is long, so a sample does not depend on its batch. Held positions (bos, prompts, infill context, suffixes, row
    padding) are never masked. ids (B, L) int64, cond_mask (B, L) bool, segment_ids (B, L) or None (0 on the padding
    after a shorter row); callback(i, tokens) after each step run. Returns (tokens (B, L) int64, network evaluations
    per row (B,) int64, the steps until the row's last unmasking (B,) int64), as diffusion.generate."""
    free = (~cond_mask & (segment_ids > 0 if segment_ids is not None else True)).cpu()
    tokens = torch.where(free.to(ids.device), mask_id(model), ids)
    generators = row_generators(seeds)
    draws = row_draws(generators, row_lengths(ids, segment_ids), ids.shape[1], uniform=True)
    unmask_at = torch.where(free, (draws * steps).long().clamp_max(steps - 1), steps)  # steps: never (held)
    evaluations = torch.zeros(len(ids), dtype=torch.long)
    stale = torch.ones(len(ids), dtype=torch.bool)  # rows whose tokens changed since the network last read them
    c_noise = torch.zeros(ids.shape, device=ids.device)
    logits = None
    for i in unmask_at[free].unique().tolist():  # ascending: the steps in which something unmasks
        unmasking = unmask_at == i
        if logits is None or (stale & unmasking.any(-1)).any():
            with autocast(ids.device, precision):
                logits = model(model.embed(tokens), c_noise, segment_ids).float()  # (B, L, V)
            evaluations += (stale & ((unmask_at >= i) & free).any(-1)).long()  # rows with tokens still to draw
            stale[:] = False
        for b in unmasking.any(-1).nonzero().flatten().tolist():
            where = unmasking[b].nonzero().flatten().to(ids.device)
            probs = top_p_filter((logits[b, where] / temperature).softmax(dim=-1), top_p).cpu()  # (n, V)
            tokens[b, where] = torch.multinomial(probs, 1, generator=generators[b]).flatten().to(tokens.device)
            stale[b] = True
        if callback is not None:
            callback(i, tokens)
    steps_taken = torch.where(free.any(-1), torch.where(free, unmask_at, -1).amax(-1) + 1, 0)
    return tokens, evaluations, steps_taken
