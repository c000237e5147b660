"""What eval.py measures of texts, apart from any run: sample and word metrics, the judge (an autoregressive run that
scores texts) and the exact NLL it computes, perplexities, unigram entropy at a fixed token count, gen-PPL
interpolated at an entropy (the frontier's comparison), and lines with their words shuffled (the shuffle gap's
input)."""
import math
import random
from dataclasses import dataclass

import torch

from data import sample_rows
from objectives import Autoregressive
from sampling import sample_seed


def sequence_nll(model, sequences, batch_size, pad_id, device):
    """Exact negative log-likelihood under a causal model of each id list after its first token (bos): total
    nats and the number of tokens scored (eos included where the list has it)."""
    nats = tokens = 0.0
    objective = Autoregressive()
    for start in range(0, len(sequences), batch_size):
        layouts = [(ids, [True] + [False] * (len(ids) - 1)) for ids in sequences[start:start + batch_size]]
        ids, cond_mask, segment_ids = sample_rows(layouts, pad_id)
        segment_ids = None if segment_ids is None else segment_ids.to(device)
        scored = objective.nll(model, ids.to(device), cond_mask.to(device), segment_ids)
        nats, tokens = nats + float(scored["nll"].sum()), tokens + float(scored["tokens"].sum())
    return nats, tokens


def line_batches(lines, batch_size, pad_id, device):
    """(ids, cond_mask, segment_ids) batches of whole lines ((ids, characters) pairs), bos held, padding in
    segment 0 (segment_ids None where no row is padded)."""
    for start in range(0, len(lines), batch_size):
        layouts = [(ids, [True] + [False] * (len(ids) - 1)) for ids, _ in lines[start:start + batch_size]]
        ids, cond_mask, segment_ids = sample_rows(layouts, pad_id)
        yield ids.to(device), cond_mask.to(device), None if segment_ids is None else segment_ids.to(device)


def line_seeds(seed, indices):
    """The noise seeds of the lines at `indices` (ints) of a run's --seed `seed`: sampling.sample_seed's, so that a
    line's draws depend on its place in the file and the seed only, not on its batch."""
    return [sample_seed(seed, i) for i in indices]


def line_estimates(model, objective, lines, batch_size, pad_id, device, draws, seeds, bar=None):
    """The objective's NLL (objectives.py `nll`: exact for the baseline, a bound with `draws` draws otherwise) of
    each of the whole lines, line i's draws from a generator seeded by seeds[i]: a dict of float64 CPU tensors, the
    NLL's terms in nats, "variance" and "tokens" (N,) and for a bound "per_draw" (N, draws); `bar` (tqdm) is
    advanced by the lines done."""
    parts = {}
    batches = line_batches(lines, batch_size, pad_id, device)
    for start, (ids, cond_mask, segment_ids) in zip(range(0, len(lines), batch_size), batches):
        scored = objective.nll(model, ids, cond_mask, segment_ids, draws, seeds[start:start + len(ids)])
        for key, value in scored.items():
            parts.setdefault(key, []).append(value)
        if bar is not None:
            bar.update(len(ids))
    return {key: torch.cat(values) for key, values in parts.items()}


def totals(estimates):
    """line_estimates' dict summed over the lines: floats, "per_draw" left out."""
    return {key: float(value.sum()) for key, value in estimates.items() if key != "per_draw"}


def per_token(totals):
    """(NLL in nats per token, its Monte Carlo standard error) of a totals() dict."""
    tokens = max(totals["tokens"], 1.0)
    nats = sum(v for k, v in totals.items() if k not in ("tokens", "variance"))
    return nats / tokens, math.sqrt(totals["variance"]) / tokens


def paired_difference(first, second):
    """(per-token NLL of `first` minus that of `second`, its Monte Carlo standard error) of two line_estimates dicts of
    the same lines (or of each line and its counterpart) whose bounds drew with the same seeds and as many draws: per
    line i and draw j, first's estimate over first's tokens minus second's over second's, d_ij; the difference's
    variance is sum_i var_j(d_ij) / draws. Common draws make it far smaller than the two errors combined as if
    independent. An exact NLL (no "per_draw") adds no error."""
    (first_nll, _), (second_nll, _) = per_token(totals(first)), per_token(totals(second))
    parts = [e["per_draw"] / max(float(e["tokens"].sum()), 1.0) if "per_draw" in e
             else torch.zeros(len(e["tokens"]), 1, dtype=torch.float64) for e in (first, second)]
    paired = parts[0] - parts[1]  # (N, draws), or (N, 1) where both are exact
    variance = float((paired.var(1) / paired.shape[1]).sum()) if paired.shape[1] > 1 else 0.0
    return first_nll - second_nll, math.sqrt(variance)


def shuffle_gap(model, objective, lines, tokenizer, length, draws, seed, batch_size, pad_id, device, bar=None):
    """Word-order sensitivity: the NLL (nats per token) of the lines with their words shuffled (shuffled_words, from
    `seed`) minus that of the same lines as they are, as a dict: `shuffle_gap`, its Monte Carlo standard error
    (`shuffle_gap_stderr`), `ordered_nll`, `shuffled_nll` and `shuffle_lines` (the lines whose shuffled words still
    fit `length` tokens); {} when no line is left. A line and its shuffled words draw from generators of one seed
    (line_seeds of the line's index in `lines`), so a bound's draws share their noise levels, and the error is that of
    the paired differences (paired_difference). `bar` (tqdm) is advanced by the lines done, twice each."""
    ordered, shuffled, indices = shuffled_words(lines, tokenizer, seed, length)
    if not ordered:
        return {}
    seeds = line_seeds(seed, indices)
    real, mixed = (line_estimates(model, objective, part, batch_size, pad_id, device, draws, seeds, bar)
                   for part in (ordered, shuffled))
    gap, error = paired_difference(mixed, real)
    return {"shuffle_gap": gap, "shuffle_gap_stderr": error, "ordered_nll": per_token(totals(real))[0],
            "shuffled_nll": per_token(totals(mixed))[0], "shuffle_lines": len(ordered)}


def shuffled_words(lines, tokenizer, seed, length):
    """The lines with their words (split at white space) in a random order, from one generator seeded by `seed`, and
    encoded again: (kept, shuffled, indices), kept and shuffled lists of read_lines' (ids, characters) pairs, where a
    line whose shuffled words take more than `length` tokens is left out of both (a line of one word stays as it
    is), and indices the kept lines' places in `lines`."""
    rng, kept, shuffled, indices = random.Random(seed), [], [], []
    for index, (ids, chars) in enumerate(lines):
        words = tokenizer.decode(ids).split()
        rng.shuffle(words)
        mixed = tokenizer.encode(" ".join(words))
        if len(mixed) <= length:
            kept.append((ids, chars))
            shuffled.append((mixed, chars))
            indices.append(index)
    return kept, shuffled, indices


def sample_metrics(samples):
    """Scores of token lists (bos, eos and pads removed): unigram entropy of all their tokens pooled (nats),
    distinct-n for n = 1, 2, 3 (distinct n-grams over all n-grams, pooled), rep-4 (Welleck et al. 2020: a
    sample's share of 4-grams that repeat an earlier one in it, averaged over samples with any), mean length
    in tokens and the share of empty samples (no token before eos)."""
    counts = {}
    for tokens in samples:
        for t in tokens:
            counts[t] = counts.get(t, 0) + 1
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0
    result = {"entropy": entropy, "mean_length": total / max(len(samples), 1),
              "empty": sum(not tokens for tokens in samples) / max(len(samples), 1)}
    for n in (1, 2, 3):
        grams = [tuple(tokens[i:i + n]) for tokens in samples for i in range(len(tokens) - n + 1)]
        result[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    reps = [1 - len(set(g)) / len(g) for g in ([tuple(t[i:i + 4]) for i in range(len(t) - 3)] for t in samples) if g]
    result["rep_4"] = sum(reps) / len(reps) if reps else 0.0
    return result


def word_metrics(texts):
    """Word-level scores of texts, comparable across tokenizers (words split at whitespace): the unigram entropy of
    all their words pooled (nats), the share of distinct words, and the mean words per text."""
    counts = {}
    for text in texts:
        for word in text.split():
            counts[word] = counts.get(word, 0) + 1
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0
    return {"word_entropy": entropy, "distinct_words": len(counts) / max(total, 1),
            "mean_words": total / max(len(texts), 1)}


@dataclass
class Judge:
    """An autoregressive run that scores texts: its model, its tokenizer, and whether that tokenizer is the evaluated
    run's (then the evaluated token ids are scored as they are; otherwise each text is encoded anew by the judge's,
    so that runs of different tokenizers can be scored by one judge, per word and per character)."""
    model: torch.nn.Module
    tokenizer: object
    shared: bool

    def nll(self, sequences, texts, batch_size, device):
        """(total NLL in nats, tokens scored) of the judge on the sequences (token ids of the evaluated run, bos and
        eos included) whose decoded texts are `texts`."""
        if not self.shared:
            sequences = [self.tokenizer.encode(text) for text in texts]
        return sequence_nll(self.model, sequences, batch_size, self.tokenizer.pad_id, device)


def perplexities(nats, tokens, texts):
    """Perplexity from a total NLL (nats) over `tokens` judge tokens (eos included), per token and per word (the
    same NLL over the words of the decoded texts plus one for each line's end, comparable across tokenizers)."""
    words = sum(len(text.split()) + 1 for text in texts)
    return {"gen_ppl": math.exp(nats / tokens), "gen_ppl_word": math.exp(nats / words)}


def pooled_entropy(token_lists, count):
    """Unigram entropy (nats) of the first `count` tokens of the lists pooled in order: entropy grows with the
    tokens it is measured on (rarer types turn up), so frontier points are compared at one count."""
    pooled = [t for tokens in token_lists for t in tokens][:count]
    counts = {}
    for t in pooled:
        counts[t] = counts.get(t, 0) + 1
    return -sum(c / len(pooled) * math.log(c / len(pooled)) for c in counts.values()) if pooled else 0.0


def at_entropy(points, entropy):
    """gen-PPL interpolated at `entropy` on the curve through `points` (dicts of gen_ppl and entropy), linear in
    log gen-PPL between the two neighbouring points; None where `entropy` lies outside the points' range, or where
    only points of one entropy hold it (no curve there to read a value from)."""
    points = sorted(points, key=lambda point: point["entropy"])
    for left, right in zip(points, points[1:]):
        if left["entropy"] <= entropy <= right["entropy"] and left["entropy"] < right["entropy"]:
            share = (entropy - left["entropy"]) / (right["entropy"] - left["entropy"])
            return math.exp((1 - share) * math.log(left["gen_ppl"]) + share * math.log(right["gen_ppl"]))
    return None
