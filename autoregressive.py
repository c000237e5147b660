"""The autoregressive baseline as an objective: its next-token loss, the positions it is trained on, and sampling
left to right with temperature and top-p (nucleus) truncation. The network is received as an argument (a causal
model.ScoreLM: `embed`, `features`, `head_weights`, `__call__(x, c_noise, segment_ids) -> logits`); it reads clean
embeddings with c_noise = 0. Shapes: B batch, L length, V vocabulary.
"""
import torch
import torch.nn.functional as F

from chunked import tied_cross_entropy
from utils import autocast, row_generators


def autoregressive_loss(model, ids, segment_ids=None, weight=None):
    """The autoregressive baseline's loss: (loss, ce, hit) as score_interpolation_loss's, where position t of ce
    (B, L) float32 holds -log p(ids[t] | the tokens before it in its row) in nats (0 at t = 0), hit (B, L) bool whether
    ids[t] was the most likely next token (False at t = 0) and loss the sum of weight * ce, weight (B, L) float or None
    (every position 1). The network (built with causal=True) reads the clean embeddings with c_noise = 0, so it has no
    noise conditioning. The caller's weights keep only positions that continue their own packed sequence
    (autoregressive_targets)."""
    features = model.features(model.embed(ids), torch.zeros(ids.shape, device=ids.device), segment_ids)
    weight = torch.ones(ids.shape, device=ids.device) if weight is None else weight
    table, bias = model.head_weights()
    loss, ce, hit = tied_cross_entropy(features[:, :-1], table, bias, ids[:, 1:], weight[:, 1:])
    return loss, F.pad(ce, (1, 0)), F.pad(hit, (1, 0), value=False)


def autoregressive_targets(segment_ids):
    """Positions the baseline is trained to predict: a token of a packed sequence that follows one of the same
    sequence (the first token, bos, has nothing to be predicted from). segment_ids (B, L) -> (B, L) bool."""
    follows = torch.zeros_like(segment_ids, dtype=torch.bool)
    follows[:, 1:] = segment_ids[:, 1:] == segment_ids[:, :-1]
    return follows & (segment_ids > 0)


def top_p_filter(probs, top_p):
    """Nucleus truncation (Holtzman et al. 2020, eq. 3): the smallest set of most likely tokens whose probabilities
    sum to at least top_p keeps its probabilities, renormalised, and every other token gets 0. probs (..., V) float,
    top_p in (0, 1] (1: unchanged) -> (..., V)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # the mass of the tokens more likely than each
    kept = torch.zeros_like(probs).scatter(-1, order, (before < top_p).to(probs.dtype))  # the first always stays
    filtered = probs * kept
    return filtered / filtered.sum(dim=-1, keepdim=True)


@torch.no_grad()
def generate_autoregressive(model, ids, cond_mask, seeds, eos_id, pad_id, segment_ids=None, temperature=1.0, top_p=1.0,
                            precision="fp32", callback=None):
    """Sample the free positions of a batch left to right: position t of a row is drawn from
    softmax(logits[t - 1] / temperature), truncated to its top_p nucleus (top_p_filter), by the row's own generator
    (seeded by its seed, so that a sample does not depend on its batch); after a row draws eos, its remaining free
    positions are pad. ids (B, L) int64, cond_mask (B, L) bool: the held positions of each row must come first (bos
    and a prompt; a free first position, or a held position after a free one, raises ValueError); segment_ids (B, L)
    or None: 0 on the held padding after a shorter row. The network runs under `precision`'s autocast, once per
    position (no key-value cache: L forwards of the whole batch). callback(t, tokens) is called after each position.
    Returns (tokens (B, L) int64, network evaluations per row (B,) int64, the same as steps taken (B,) int64), as
    diffusion.generate."""
    free = ~cond_mask & (segment_ids > 0 if segment_ids is not None else True)
    if bool((free[:, :-1] & cond_mask[:, 1:] & (segment_ids[:, 1:] > 0 if segment_ids is not None else True)).any()
            or free[:, 0].any()):
        raise ValueError("an autoregressive model samples after its held tokens (bos first), not before them (an "
                         "infill or suffix)")
    tokens = ids.clone()
    generators = row_generators(seeds)
    done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    evaluations = torch.zeros(len(ids), dtype=torch.long)
    positions = free.any(dim=0).nonzero().flatten().tolist()
    c_noise = torch.zeros(ids.shape, device=ids.device)
    for t in positions:
        tokens[:, t] = torch.where(free[:, t] & done, pad_id, tokens[:, t])  # after a row's eos
        drawing = free[:, t] & ~done  # rows that draw a token here
        if drawing.any():
            with autocast(ids.device, precision):
                logits = model(model.embed(tokens), c_noise, segment_ids)[:, t - 1].float()  # (B, V)
            probs = top_p_filter((logits / temperature).softmax(dim=-1), top_p).cpu()
            for b in drawing.nonzero().flatten().tolist():
                tokens[b, t] = int(torch.multinomial(probs[b], 1, generator=generators[b]))
            evaluations[drawing.cpu()] += 1
            done |= drawing & (tokens[:, t] == eos_id)
        if callback is not None:
            callback(t, tokens)
    return tokens, evaluations, evaluations.clone()
