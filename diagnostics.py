"""What a training run shows of its learning beyond the loss, for a researcher asking where and when the model learns:
the training cross-entropy by noise level (every log line), and, every --probe_interval steps, the gradient each
noise level contributes to a step and the shuffle gap of held-out lines (scoring.shuffle_gap). A noise level is the
objective's own coordinate: sigma for continuous diffusion, the mask probability t for masked diffusion; the
autoregressive baseline has none. Shapes: B batch, L length, K level buckets, P parameters.
"""
import math
import time

import torch

from scoring import shuffle_gap
from utils import autocast

LEVELS = 8  # buckets of the noise level in the logs: geometric in sigma (about 1.6x apart at 1-50), equal in t


def level_edges(objective, buckets=LEVELS):
    """The K + 1 edges of the objective's noise-level buckets, a list of floats (objective.level_range: geometric
    between its ends for "log", equal steps for "linear"), or None for an objective without levels."""
    if objective.level_range is None:
        return None
    _, low, high, spacing = objective.level_range
    if spacing == "log":
        return [math.exp(math.log(low) + (math.log(high) - math.log(low)) * i / buckets) for i in range(buckets + 1)]
    return [low + (high - low) * i / buckets for i in range(buckets + 1)]


def level_buckets(level, edges):
    """Each position's bucket (B, L) int64 in [0, K): levels below the first edge fall in the first bucket, above the
    last in the last. level (B, L) float; edges a (K + 1,) float tensor on level's device."""
    return torch.bucketize(level.float(), edges[1:-1].float(), right=True)


def level_sums(level, ce, counted, edges):
    """Summed cross-entropy (nats) and the number of counted positions in each bucket: (2, K) float32 on the device,
    without a host sync (every position is added, uncounted ones with weight 0, so no indexing waits for the
    device). level, ce (B, L) float; counted (B, L) bool; edges (K + 1,) float tensor."""
    weight = counted.float().flatten()
    sums = torch.zeros(2, len(edges) - 1, device=ce.device)
    values = torch.stack([ce.detach().float().flatten() * weight, weight])  # (2, B L)
    return sums.index_add_(1, level_buckets(level, edges).flatten(), values)


def level_figures(sums, edges, name):
    """A log line's per-level figures from summed level_sums (2, K), as JSON-ready lists: the mean cross-entropy of
    each bucket (`loss_by_level`, None where it saw no position), each bucket's share of the counted positions
    (`level_share`), the bucket edges (`level_edges`) and the level's name (`level_name`: "sigma" or "t")."""
    ce, counts = sums.tolist()
    total = max(sum(counts), 1.0)
    return {"loss_by_level": [c / n if n else None for c, n in zip(ce, counts)],
            "level_share": [n / total for n in counts], "level_edges": [round(e, 4) for e in edges],
            "level_name": name}


def gradient_by_level(model, objective, ids, segment_ids, cond_mask, edges, step, warp, precision):
    """The gradient of one training micro-batch's loss split by noise-level bucket: the objective draws the batch's
    noise as training would (from a fork of the global generators, which are left as they were, so a probed run
    trains exactly as an unprobed one), and bucket k's loss is the training loss with the weights of the positions
    outside it set to 0; the K losses add up to the step's loss (the mean over the batch's loss positions) and their
    gradients g_k to its gradient g. Returns JSON-ready lists over the buckets: `grad_norm_by_level` |g_k|,
    `grad_share_by_level` <g_k, g> / |g|^2 (the part of g along itself that bucket k supplies; the shares sum to 1,
    and a negative one pulls against the rest), `grad_cosine_by_level` cos(g_k, g) and `loss_share_by_level` (the
    bucket's part of the loss), all None for a bucket without a position. Costs a forward and backward pass per
    occupied bucket; gradients are taken with torch.autograd.grad, so the parameters' .grad are untouched.
    ids, segment_ids (B, L) int64, cond_mask (B, L) bool, on the model's device; edges (K + 1,) float tensor."""
    device = ids.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        noise = objective.draw(model, ids, segment_ids, cond_mask, step, warp)
    targets = objective.targets(segment_ids, cond_mask)
    weight = targets.float() / targets.sum().clamp_min(1)
    level, _, counted = objective.observed(noise, torch.zeros(ids.shape, device=device), targets)
    bucket = level_buckets(level, edges)
    params = [p for p in model.parameters() if p.requires_grad]
    grads, losses = [], []
    for k in range(len(edges) - 1):
        inside = (bucket == k) & counted
        if not bool(inside.any()):
            grads.append(None)
            losses.append(None)
            continue
        with autocast(device, precision):
            loss, _, _ = objective.loss(model, ids, segment_ids, cond_mask, weight * inside, noise)
        parts = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append(torch.cat([(g if g is not None else torch.zeros_like(p)).float().flatten()
                                for g, p in zip(parts, params)]))  # (P,)
        losses.append(float(loss.detach()))
    total = sum(g for g in grads if g is not None)
    total_sq = float(total.square().sum()) if torch.is_tensor(total) else 0.0
    loss_total = sum(v for v in losses if v is not None)
    return {"grad_norm_by_level": [None if g is None else float(g.norm()) for g in grads],
            "grad_share_by_level": [None if g is None else float(g @ total) / max(total_sq, 1e-30) for g in grads],
            "grad_cosine_by_level": [None if g is None else float(g @ total) / max(float(g.norm()) * total_sq ** 0.5,
                                                                                   1e-30) for g in grads],
            "loss_share_by_level": [None if v is None else v / loss_total if loss_total else None for v in losses]}


class Probe:
    """What train.py measures every --probe_interval steps (rank 0 only): gradient_by_level on the step's first
    micro-batch (for an objective with levels) and, with held-out `lines` (corpus.read_lines' pairs; empty: none),
    their shuffle gap (scoring.shuffle_gap with `draws` draws a line for a bound, from generators seeded by `seed`,
    the same at every probe, so that probes differ by the model only). `length`: the longest shuffled line kept."""

    def __init__(self, objective, edges, lines, tokenizer, length, draws, seed, batch_size, precision):
        self.objective, self.edges, self.lines, self.tokenizer, self.length = objective, edges, lines, tokenizer, length
        self.draws, self.seed, self.batch_size, self.precision = draws, seed, batch_size, precision

    def __call__(self, model, batch, step, warp):
        """The figures of one probe, a JSON-ready dict with the step and the seconds it took (`probe_seconds`); the
        model is put in eval mode for the shuffle gap and back in train mode after. batch: (ids, segment_ids,
        cond_mask) on the model's device."""
        started = time.perf_counter()
        line = {"step": step}
        if self.edges is not None:
            line.update(gradient_by_level(model, self.objective, *batch, self.edges, step, warp, self.precision))
        if self.lines:
            model.eval()
            try:
                line.update(shuffle_gap(model, self.objective, self.lines, self.tokenizer, self.length, self.draws,
                                        self.seed, self.batch_size, self.tokenizer.pad_id, batch[0].device))
            finally:
                model.train()
        line["probe_seconds"] = round(time.perf_counter() - started, 2)
        return line
