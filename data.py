"""Text to batches: tokenizer, lazy line-per-example corpus, crops, length expansion, conditioning masks,
and packing of several examples into one row with segment ids. Knows nothing of models or noise."""
import os
import random

import sentencepiece as spm
import torch

from utils import UsageError


class Tokenizer:
    """A SentencePiece model with the special ids this project needs (bos, eos, pad, unk), checked on load.

    Raises UsageError naming `path` if the file is missing or unreadable, if any special id is missing
    (-1; SentencePiece trains without a pad id unless asked), or if two special ids clash.
    """

    def __init__(self, path):
        if not os.path.isfile(path):
            raise UsageError(f"{path}: no SentencePiece model there")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as e:
            raise UsageError(f"{path}: not a readable SentencePiece model ({e})") from None
        self.path = path
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id, self.unk_id = self.sp.pad_id(), self.sp.unk_id()
        ids = {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id, "unk": self.unk_id}
        missing = [name for name, i in ids.items() if i < 0]
        if missing:
            raise UsageError(
                f"{path}: the tokenizer has no {', '.join(missing)} id; retrain it with "
                "bos_id=0 eos_id=1 pad_id=2 unk_id=3 (prepare.py does)")
        if len(set(ids.values())) < len(ids):
            raise UsageError(f"{path}: special ids clash ({ids}); bos, eos, pad and unk must be distinct")

    def encode(self, text, bos=True, eos=True):
        """Token ids of `text` (a list of int), with bos and eos added as asked."""
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        """Text of `ids`: cut at the first eos; bos and pad dropped; ids outside the vocabulary refused."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids outside the vocabulary of {self.vocab_size}: {bad[:5]}")
        return self.sp.decode([i for i in ids if i not in (self.bos_id, self.pad_id)])


BOM = "\ufeff"


def decode_line(raw):
    """Text of one corpus line (bytes): UTF-8, a byte-order mark dropped, surrounding whitespace (Unicode's,
    non-breaking spaces included) stripped. Raises UnicodeDecodeError."""
    return raw.decode("utf-8").replace(BOM, "").strip()


def line_offsets(path):
    """Byte offsets of the non-blank lines of a text file, found once by streaming it (memory O(lines));
    every line is checked to be UTF-8 here, before training starts.

    Raises UsageError naming `path` (and the line number) if it is missing, a directory, not UTF-8, uses bare
    carriage returns as line ends, or has no non-blank line.
    """
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory, expected a text file with one example a line")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    offsets, position = [], 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = decode_line(raw)
            except UnicodeDecodeError as e:
                raise UsageError(f"{path}:{number}: not UTF-8 ({e.reason} at byte {e.start} of the line)") from None
            if b"\r" in raw.rstrip(b"\r\n"):
                raise UsageError(f"{path}:{number}: carriage return inside a line (old Mac line ends?); "
                                 "prepare.py normalises them")
            if text:
                offsets.append(position)
            position += len(raw)
    if not offsets:
        raise UsageError(f"{path}: no non-blank line to train on")
    return offsets


class LineDataset:
    """Examples of a line-per-example text file, read lazily: `dataset[i]` is the i-th non-blank line as
    token ids with bos and eos. Each process opens its own file handle."""

    def __init__(self, path, tokenizer):
        self.path, self.tokenizer = path, tokenizer
        self.offsets = line_offsets(path)
        self._file, self._pid = None, None

    def __len__(self):
        return len(self.offsets)

    def text(self, i):
        """The i-th non-blank line, decoded and stripped (str)."""
        if self._pid != os.getpid():
            self._file, self._pid = open(self.path, "rb"), os.getpid()
        self._file.seek(self.offsets[i])
        return decode_line(self._file.readline())

    def __getitem__(self, i):
        return self.tokenizer.encode(self.text(i))


def crop_or_expand(ids, seq_len, pad_id, expand_prob, rng):
    """Fit one example to a row of `seq_len`: a random window if longer; otherwise, with probability
    `expand_prob`, pad ids appended after eos up to a random length in [len(ids), seq_len] (so that the model
    learns where text ends). Returns (ids, number of ids before the appended padding)."""
    if len(ids) > seq_len:
        start = rng.randint(0, len(ids) - seq_len)
        return ids[start:start + seq_len], seq_len
    real = len(ids)
    if rng.random() < expand_prob:
        ids = ids + [pad_id] * rng.randint(0, seq_len - len(ids))
    return ids, real


def conditioning_mask(length, real, rng):
    """Positions of one example held clean (True = conditioned, sigma = 0), drawn as the original project
    does: a contiguous span of random length in [0, length - 1] at a random place, shuffled to scattered
    positions half of the time. At least one of the first `real` (non-padding) positions stays free."""
    span = rng.randint(0, length - 1)
    start = rng.randint(0, length - span)
    mask = [start <= i < start + span for i in range(length)]
    if rng.random() < 0.5:
        rng.shuffle(mask)
    if all(mask[:real]):
        mask[rng.randrange(real)] = False
    return mask


def first_fit_decreasing(lengths, num_rows, seq_len):
    """Place items of the given lengths into `num_rows` rows of capacity `seq_len`, longest first, each into
    the first row with room. Returns (rows, leftover): lists of item indices; every item is in one of them."""
    rows, room, leftover = [[] for _ in range(num_rows)], [seq_len] * num_rows, []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r in range(num_rows) if room[r] >= lengths[i]), None)
        if row is None:
            leftover.append(i)
        else:
            rows[row].append(i)
            room[row] -= lengths[i]
    return rows, leftover


def collate_rows(rows, seq_len, pad_id):
    """Rows of examples (each a list of (ids, cond_mask) pairs) to tensors, all (B, L):
    ids int64 (pad where no example), segment_ids int64 (1, 2, ... per example; 0 where no example),
    cond_mask bool (True where the example is conditioned)."""
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    segment_ids = torch.zeros((len(rows), seq_len), dtype=torch.long)
    cond_mask = torch.zeros((len(rows), seq_len), dtype=torch.bool)
    for b, row in enumerate(rows):
        start = 0
        for segment, (example_ids, example_mask) in enumerate(row, start=1):
            end = start + len(example_ids)
            ids[b, start:end] = torch.tensor(example_ids)
            segment_ids[b, start:end] = segment
            cond_mask[b, start:end] = torch.tensor(example_mask)
            start = end
    return {"ids": ids, "segment_ids": segment_ids, "cond_mask": cond_mask}


def prompt_rows(tokenizer, prompts, n, length):
    """Rows to fill: each prompt (bos + its tokens, no eos) repeated n times and held, the rest free.
    Returns ids (B, L) int64 and cond_mask (B, L) bool, B = n * len(prompts).
    Raises UsageError if a prompt leaves no position to generate."""
    ids = torch.full((n * len(prompts), length), tokenizer.pad_id, dtype=torch.long)
    cond_mask = torch.zeros_like(ids, dtype=torch.bool)
    for p, prompt in enumerate(prompts):
        prefix = tokenizer.encode(prompt, eos=False)
        if len(prefix) >= length:
            raise UsageError(f"--prompt {prompt!r}: {len(prefix)} tokens with bos leave nothing of --length {length}")
        rows = slice(p * n, (p + 1) * n)
        ids[rows, :len(prefix)] = torch.tensor(prefix)
        cond_mask[rows, :len(prefix)] = True
    return ids, cond_mask


class PackedBatches:
    """Endless batches of `batch_size` packed rows of `seq_len` tokens, shuffled per epoch from `seed`.

    Each example is processed (crop, expansion, conditioning mask) with a generator keyed by
    (seed, epoch, index), and the state (epoch, cursor, examples waiting in the pool) is a dict of ints, so
    a resumed run continues the data stream exactly. Batches are dicts as returned by collate_rows.
    """

    def __init__(self, dataset, batch_size, seq_len, pad_id, seed=0, expand_prob=0.5, pool_factor=1.5):
        self.dataset, self.batch_size, self.seq_len, self.pad_id = dataset, batch_size, seq_len, pad_id
        self.seed, self.expand_prob, self.pool_factor = seed, expand_prob, pool_factor
        self.epoch, self.cursor, self.pool = 0, 0, []  # pool: [(epoch, index)]
        self._order_epoch, self._order = None, None
        self._processed = {}  # (epoch, index) -> example, for the examples in the pool

    def state_dict(self):
        """Position in the stream as plain ints: epoch, cursor, the (epoch, index) pairs waiting in the pool."""
        return {"epoch": self.epoch, "cursor": self.cursor, "pool": [list(p) for p in self.pool],
                "num_examples": len(self.dataset)}

    def load_state_dict(self, state):
        """Continue the stream of a saved state. Raises UsageError if the corpus size has changed."""
        if state["num_examples"] != len(self.dataset):
            raise UsageError(f"{self.dataset.path}: has {len(self.dataset):,} examples, the run was started on "
                             f"{state['num_examples']:,}; resuming needs the same corpus")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.pool = [tuple(int(v) for v in p) for p in state["pool"]]

    def _order_for(self, epoch):
        if self._order_epoch != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = torch.randperm(len(self.dataset), generator=generator).tolist()
            self._order_epoch = epoch
        return self._order

    def _example(self, epoch, index):
        if (epoch, index) not in self._processed:
            rng = random.Random(f"{self.seed}/{epoch}/{index}")
            ids, real = crop_or_expand(self.dataset[index], self.seq_len, self.pad_id, self.expand_prob, rng)
            self._processed[epoch, index] = ids, conditioning_mask(len(ids), real, rng)
        return self._processed[epoch, index]

    def _fill_pool(self):
        examples = [self._example(*p) for p in self.pool]
        target = self.pool_factor * self.batch_size * self.seq_len
        total = sum(len(ids) for ids, _ in examples)
        while total < target:
            order = self._order_for(self.epoch)
            key = (self.epoch, order[self.cursor])
            self.cursor += 1
            if self.cursor == len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
            self.pool.append(key)
            examples.append(self._example(*key))
            total += len(examples[-1][0])
        return examples

    def __iter__(self):
        return self

    def __next__(self):
        examples = self._fill_pool()
        rows, leftover = first_fit_decreasing([len(ids) for ids, _ in examples], self.batch_size, self.seq_len)
        batch = collate_rows([[examples[i] for i in row] for row in rows], self.seq_len, self.pad_id)
        self.pool = [self.pool[i] for i in sorted(leftover)]
        self._processed = {key: self._processed[key] for key in self.pool}
        return batch
