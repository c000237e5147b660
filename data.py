"""Tokens to batches: crops, length expansion, conditioning masks and dense packing of several examples into one
row with segment ids, served by DataLoader worker processes; and the rows that sampling starts from (prompts,
infill templates, suffixes). Reads the token cache of corpus.py; knows nothing of models or noise."""
import math
import random
import re
import signal

import numpy as np
import torch

from utils import UsageError


def example_window(length, seq_len, expand_prob, rng):
    """Where an example of `length` tokens (bos and eos included) goes in a row of `seq_len`: a random window
    if longer; else all of it, padded with probability `expand_prob` after eos to a random total in
    [length, seq_len] (so that the model learns where text ends). Returns (start, stop, padded length)."""
    if length > seq_len:
        start = rng.randint(0, length - seq_len)
        return start, start + seq_len, seq_len
    if rng.random() < expand_prob:
        return 0, length, rng.randint(length, seq_len)
    return 0, length, length


def conditioning_mask(length, real, rng, cond_prob=1.0):
    """Positions of one example held clean (True = conditioned, sigma = 0), drawn as the original project
    does: a contiguous span of random length in [0, length - 1] at a random place, shuffled to scattered
    positions half of the time. At least one of the first `real` (non-padding) positions stays free. With
    cond_prob < 1, only that share of examples is conditioned at all; the rest are wholly free, as unconditional
    sampling starts (cond_prob 1 draws exactly as the original, nothing more)."""
    if cond_prob < 1 and rng.random() >= cond_prob:
        return [False] * length
    span = rng.randint(0, length - 1)
    start = rng.randint(0, length - span)
    mask = [start <= i < start + span for i in range(length)]
    if rng.random() < 0.5:
        rng.shuffle(mask)
    if all(mask[:real]):
        mask[rng.randrange(real)] = False
    return mask


def fullest_subset(room, counts):
    """Lengths, at most counts[v] of each length v, whose sum is the largest that fits in `room`: a bounded
    subset sum over a bitset (bit s set: sum s is reachable). Returns a list of lengths, longest first."""
    reach, rounds = 1, []  # rounds: (length added, reach before), to trace the chosen sum back
    for v in sorted(counts, reverse=True):
        for _ in range(min(counts[v], room // v)):
            grown = (reach | reach << v) & ((2 << room) - 1)
            if grown == reach or reach >> room:
                break
            rounds.append((v, reach))
            reach = grown
    total, chosen = reach.bit_length() - 1, []
    for v, before in reversed(rounds):
        if not before >> total & 1:  # `total` first became reachable by adding this v
            total -= v
            chosen.append(v)
    return chosen[::-1]


def minimum_bin_slack(lengths, capacity):
    """Pack items of the given lengths (each at most `capacity`) into few rows, each row as full as the items
    left allow (after Gupta & Ho 1999, "Minimum Bin Slack"). Items longer than half a row cannot share one, so
    each starts a row, longest first; each of those rows then takes the fullest subset of the short items left,
    and the short items still left fill new rows the same way. Returns rows as lists of item indices, every
    item in exactly one; deterministic."""
    short = {}  # length -> indices of the short items of that length not yet placed
    for i, n in enumerate(lengths):
        if 2 * n <= capacity:
            short.setdefault(n, []).append(i)
    rows = [[i] for i in sorted((i for i, n in enumerate(lengths) if 2 * n > capacity), key=lambda i: -lengths[i])]

    def fill(row, room):
        for v in fullest_subset(room, {v: len(items) for v, items in short.items() if items}):
            row.append(short[v].pop())

    for row in rows:
        fill(row, capacity - lengths[row[0]])
    while any(short.values()):
        rows.append([])
        fill(rows[-1], capacity)
    return rows


def collate_rows(rows, seq_len, pad_id):
    """Rows of examples (each a list of (ids, cond_mask) array pairs) to tensors, all (R, L):
    ids int64 (pad where no example), segment_ids int64 (1, 2, ... per example; 0 where no example),
    cond_mask bool (True where the example is conditioned)."""
    ids = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    segment_ids = np.zeros((len(rows), seq_len), dtype=np.int64)
    cond_mask = np.zeros((len(rows), seq_len), dtype=bool)
    for r, row in enumerate(rows):
        start = 0
        for segment, (example_ids, example_mask) in enumerate(row, start=1):
            end = start + len(example_ids)
            ids[r, start:end] = example_ids
            segment_ids[r, start:end] = segment
            cond_mask[r, start:end] = example_mask
            start = end
    return {"ids": torch.from_numpy(ids), "segment_ids": torch.from_numpy(segment_ids),
            "cond_mask": torch.from_numpy(cond_mask)}


BLANK = re.compile(r"\[(\d+)\]")  # an infill template's blank: [n], n tokens to generate
MAX_SAMPLE_LENGTH = 4096  # tokens per sample: far past any training row; memory grows as batch x length x V


def parse_template(template, where="--infill"):
    """The pieces of an infill template: held text (str) and blanks (int, how many tokens to generate there),
    e.g. "the [5] of the [3]" -> ["the", 5, "of the", 3]. Text next to a blank is tokenised as a word of its
    own. Raises UsageError naming `where` (a flag or file:line) if there is no blank, or a blank of 0 tokens or
    more than MAX_SAMPLE_LENGTH."""
    pieces = []
    for k, part in enumerate(BLANK.split(template)):  # text, count, text, count, ..., text
        if k % 2 == 0:
            if part.strip():
                pieces.append(part.strip())
        elif not 1 <= int(part) <= MAX_SAMPLE_LENGTH:
            raise UsageError(f"{where} {template!r}: a blank asks for 1 to {MAX_SAMPLE_LENGTH:,} tokens, not [{part}]")
        else:
            pieces.append(int(part))
    if not any(isinstance(piece, int) for piece in pieces):
        raise UsageError(f"{where} {template!r}: no blank to fill; mark how many tokens go where, "
                         "as in 'the [5] of the [3]'")
    return pieces


def sample_layout(tokenizer, pieces, length=None, suffix=None, where="--prompt"):
    """One sample's token ids and held flags, two lists as long as the sample: bos, then the pieces in order
    (str: its tokens, held; list: these token ids, held; int n: n free positions; None, last: free positions up
    to `length` tokens in all), then with a `suffix` (str) its tokens and eos, held at the end. Raises
    UsageError naming `where` if the held tokens leave no free position."""
    tail = [] if suffix is None else tokenizer.encode(suffix, bos=False, eos=True)
    ids, held = [tokenizer.bos_id], [True]
    for piece in pieces:
        if isinstance(piece, (str, list)):
            text = tokenizer.encode(piece, bos=False, eos=False) if isinstance(piece, str) else piece
            ids, held = ids + text, held + [True] * len(text)
        else:
            n = length - len(ids) - len(tail) if piece is None else piece
            ids, held = ids + [tokenizer.pad_id] * max(n, 0), held + [False] * max(n, 0)
    ids, held = ids + tail, held + [True] * len(tail)
    if all(held):
        text = any(isinstance(piece, (str, list)) and piece for piece in pieces)
        what = ", ".join(["bos"] + ["text"] * text + ["suffix and eos"] * bool(tail))
        raise UsageError(f"{where}: {len(ids)} held tokens ({what}) leave nothing to generate"
                         f"{f' in --length {length}' if length else ''}")
    return ids, held


def sample_rows(layouts, pad_id):
    """A batch of sample layouts (ids, held) as tensors, L the longest: ids (B, L) int64, cond_mask (B, L) bool,
    and segment_ids (B, L) int64, 1 on each sample and 0 on the held padding after a shorter one (so that the
    sample never attends to it), or None when all samples have one length."""
    L = max(len(ids) for ids, _ in layouts)
    ids = torch.full((len(layouts), L), pad_id, dtype=torch.long)
    cond_mask = torch.ones_like(ids, dtype=torch.bool)
    segment_ids = torch.zeros_like(ids)
    for b, (row, held) in enumerate(layouts):
        ids[b, :len(row)], cond_mask[b, :len(row)], segment_ids[b, :len(row)] = torch.tensor(row), torch.tensor(held), 1
    return ids, cond_mask, None if bool(segment_ids.all()) else segment_ids


class PackedRows(torch.utils.data.IterableDataset):
    """The endless stream of packed rows, one chunk at a time.

    Each epoch's examples, shuffled from `seed`, are cut into chunks of `buffer_size`. A chunk's examples are
    cropped or expanded and given conditioning masks (with a generator keyed by (seed, epoch, index)), packed
    into as few rows of `seq_len` as minimum_bin_slack finds, and the rows shuffled. Chunk g is a
    function of (seed, g) alone, so DataLoader workers take chunks round-robin (worker w of W makes
    first_chunk + w, + w + W, ...) and the stream does not depend on their number. Yields (g, batch of (R, L)
    tensors as collate_rows returns).
    """

    def __init__(self, cache, seq_len, bos_id, eos_id, pad_id, seed=0, expand_prob=0.1, buffer_size=8192,
                 first_chunk=0, cond_prob=1.0):
        self.cache, self.seq_len, self.bos_id, self.eos_id, self.pad_id = cache, seq_len, bos_id, eos_id, pad_id
        self.seed, self.expand_prob, self.buffer_size, self.first_chunk = seed, expand_prob, buffer_size, first_chunk
        self.cond_prob = cond_prob
        self.chunks_per_epoch = math.ceil(len(cache) / buffer_size)
        self._order_epoch, self._order = None, None

    def order(self, epoch):
        """The examples of `epoch` in their shuffled order, int32 (N,) (int64 past 2**31 lines)."""
        if self._order_epoch != epoch:
            n = len(self.cache)  # int32 halves the order's memory for corpora of up to 2**31 lines
            indices = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
            self._order = np.random.default_rng([self.seed, epoch]).permutation(indices)
            self._order_epoch = epoch
        return self._order

    def example(self, epoch, index):
        """Example `index` as it appears in `epoch`: (ids int64 (n,), cond_mask bool (n,)), n <= seq_len."""
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        length = self.cache.length(index) + 2  # with bos and eos
        start, stop, padded = example_window(length, self.seq_len, self.expand_prob, rng)
        ids = np.full(padded, self.pad_id, dtype=np.int64)
        first, last = max(start, 1), min(stop, length - 1)  # the window's text: position k holds text token k - 1
        ids[first - start:last - start] = self.cache.ids(index, first - 1, last - 1)
        if start == 0:
            ids[0] = self.bos_id
        if stop == length:
            ids[stop - start - 1] = self.eos_id
        return ids, np.array(conditioning_mask(padded, stop - start, rng, self.cond_prob))

    def chunk_rows(self, g):
        """Chunk g packed: rows as lists of (example index, ids, cond_mask), in the order they are served."""
        epoch, chunk = divmod(g, self.chunks_per_epoch)
        indices = self.order(epoch)[chunk * self.buffer_size:(chunk + 1) * self.buffer_size].tolist()
        examples = [(i, *self.example(epoch, i)) for i in indices]
        packed = minimum_bin_slack([len(ids) for _, ids, _ in examples], self.seq_len)
        rows = [[examples[k] for k in row] for row in packed]
        random.Random(f"{self.seed}/{epoch}/chunk {chunk}").shuffle(rows)
        return rows

    def chunk_batch(self, g):
        """Chunk g as tensors: ids, segment_ids, cond_mask, each (R, L)."""
        return collate_rows([[(ids, mask) for _, ids, mask in row] for row in self.chunk_rows(g)],
                            self.seq_len, self.pad_id)

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        w, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        for g in range(self.first_chunk + w, 1 << 62, workers):
            yield g, self.chunk_batch(g)


def ignore_stop_signals(worker_id):
    """DataLoader workers leave Ctrl-C (sent to the whole process group) and SIGTERM to the main process,
    which stops at a step boundary and saves; the workers end when it does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class PackedBatches:
    """Batches of `batch_size` packed rows from a PackedRows stream, made by `num_workers` DataLoader worker
    processes (0: in this process). Each batch is a dict of (B, L) tensors: ids, segment_ids, cond_mask.

    With several processes, every rank walks the same stream and takes its own `batch_size` rows of each
    global batch of batch_size * world_size rows, so the position is the same on every rank.
    state_dict() is the position of the next row (chunk, row within it), so a resumed run continues the epoch
    where it stopped instead of replaying it.
    """

    def __init__(self, rows, batch_size, num_workers=0, rank=0, world_size=1):
        self.rows, self.batch_size, self.num_workers = rows, batch_size, num_workers
        self.rank, self.world_size = rank, world_size
        self.chunk, self.row = rows.first_chunk, 0
        self._stream, self._current = None, None

    @property
    def epoch(self):
        """The epoch the next row belongs to (int)."""
        return self.chunk // self.rows.chunks_per_epoch

    def state_dict(self):
        """Position in the stream and what the chunks depend on, as plain numbers."""
        rows = self.rows
        return {"chunk": self.chunk, "row": self.row, "num_examples": len(rows.cache),
                "num_tokens": rows.cache.meta["tokens"], "buffer_size": rows.buffer_size,
                "sequence_length": rows.seq_len, "expand_prob": rows.expand_prob, "cond_prob": rows.cond_prob}

    def load_state_dict(self, state, source="the checkpoint"):
        """Continue from a saved position (read from `source`, a path for messages). If --expand_prob or --cond_prob
        has changed, the current chunk was packed otherwise, so the stream continues at the start of the next one.
        Raises UsageError for a position saved before the corpus's counts were kept, another corpus (counts of
        examples and tokens), row length or chunk size."""
        now = self.state_dict()
        if "num_tokens" not in state:
            raise UsageError(f"{source}: its data position is from an older version of data.py; start a new run")
        if (state["num_examples"], state["num_tokens"]) != (now["num_examples"], now["num_tokens"]):
            raise UsageError(f"{self.rows.cache.meta['corpus']}: has {now['num_examples']:,} examples and "
                             f"{now['num_tokens']:,} tokens, the run was started on {state['num_examples']:,} and "
                             f"{state['num_tokens']:,}; resuming needs the same corpus and tokenizer")
        if state["sequence_length"] != now["sequence_length"]:
            raise UsageError(f"-slen/--sequence_length {now['sequence_length']}: the run was started with "
                             f"{state['sequence_length']}; resuming needs the same row length")
        if state["buffer_size"] != now["buffer_size"]:
            raise UsageError(f"chunks of {now['buffer_size']} examples: the run was started with "
                             f"{state['buffer_size']}")
        self.chunk, self.row = int(state["chunk"]), int(state["row"])
        changed = state["expand_prob"] != now["expand_prob"] or state.get("cond_prob", 1.0) != now["cond_prob"]
        if changed and self.row:
            self.chunk, self.row = self.chunk + 1, 0
        self.close()

    def close(self):
        """Stop the worker processes now (they ignore SIGTERM, so the interpreter's exit cannot); the next
        batch starts them again from the current position."""
        stream, self._stream, self._current = self._stream, None, None
        if hasattr(stream, "_shutdown_workers"):  # DataLoader's multi-process iterator
            stream._shutdown_workers()

    def _next_chunk(self):
        if self._stream is None:
            self.rows.first_chunk = self.chunk
            self._stream = iter(torch.utils.data.DataLoader(
                self.rows, batch_size=None, num_workers=self.num_workers,
                prefetch_factor=2 if self.num_workers else None, worker_init_fn=ignore_stop_signals,
                generator=torch.Generator()))  # its own: drawing worker seeds must not move the global RNG
        g, batch = next(self._stream)
        assert g == self.chunk, (g, self.chunk)
        return batch

    def __iter__(self):
        return self

    def __next__(self):
        parts, needed = [], self.batch_size * self.world_size
        while needed:
            if self._current is None:
                self._current = self._next_chunk()
            available = len(self._current["ids"]) - self.row
            take = min(needed, available)
            parts.append({k: v[self.row:self.row + take] for k, v in self._current.items()})
            self.row, needed = self.row + take, needed - take
            if self.row == len(self._current["ids"]):
                self.chunk, self.row, self._current = self.chunk + 1, 0, None
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return {k: torch.cat([p[k] for p in parts])[mine] for k in parts[0]}
