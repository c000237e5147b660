"""A text corpus on disk: cleaning and splitting raw text, training and loading the SentencePiece tokenizer, the
demo corpus, and the tokenised cache that training reads. Knows nothing of batches, models or noise."""
import ast
import codecs
import hashlib
import json
import multiprocessing
import os
import re
import signal
import socket
import sysconfig

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from utils import UsageError


class Tokenizer:
    """A SentencePiece model with the special ids this project needs (bos, eos, pad, unk), checked on load; with
    Tokenizer.open, a Hugging Face tokenizer.json (HFTokenizer) behind the same interface.

    Raises UsageError naming `path` if the file is missing or unreadable, if any special id is missing
    (-1; SentencePiece trains without a pad id unless asked), or if two special ids clash.
    """
    kind = "sentencepiece"
    file_name = "tokenizer.model"  # its copy in a run folder

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
        self.check_special_ids("retrain it with bos_id=0 eos_id=1 pad_id=2 unk_id=3 (prepare.py does)")

    @staticmethod
    def open(path):
        """The tokenizer of the file `path`: a Hugging Face tokenizer.json (a JSON file; HFTokenizer) or a
        SentencePiece model (anything else); UsageError naming the file as each class raises it."""
        if os.path.isfile(path):
            with open(path, "rb") as f:
                if f.read(1) == b"{":
                    return HFTokenizer(path)
        return Tokenizer(path)

    def check_special_ids(self, advice):
        """UsageError naming the file if a special id is missing (-1, or None) or two clash."""
        ids = {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id, "unk": self.unk_id}
        missing = [name for name, i in ids.items() if i is None or i < 0]
        if missing:
            raise UsageError(f"{self.path}: the tokenizer has no {', '.join(missing)} id; {advice}")
        if len(set(ids.values())) < len(ids):
            raise UsageError(f"{self.path}: special ids clash ({ids}); bos, eos, pad and unk must be distinct")

    @property
    def model_proto(self):
        """The serialised tokenizer (bytes): what worker processes load (batch_encoder), and part of the corpus cache
        key; equal for equal tokenizers."""
        return self.sp.serialized_model_proto()

    def encode_batch(self, texts):
        """Token ids of each text (lists of int), no bos or eos."""
        return self.sp.encode(texts)

    def encode(self, text, bos=True, eos=True):
        """Token ids of `text` (a list of int), with bos and eos added as asked."""
        ids = self.encode_batch([text])[0]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode_ids(self, ids):
        """Text of ids (no special ones left to drop)."""
        return self.sp.decode(ids)

    def decode(self, ids):
        """Text of `ids`: cut at the first eos; bos and pad dropped; ids outside the vocabulary refused."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids outside the vocabulary of {self.vocab_size}: {bad[:5]}")
        return self.decode_ids([i for i in ids if i not in (self.bos_id, self.pad_id)])

    def decode_sample(self, ids, held):
        """Text of a sample whose `held` positions (list of bool) were given: every held token is kept, each
        generated span is cut at its first eos (the model ended the text there); then as decode."""
        kept, ended = [], False
        for i, is_held in zip(ids, held):
            ended = not is_held and (ended or int(i) == self.eos_id)
            if not ended:
                kept.append(i)
        return self.decode([i for i in kept if int(i) != self.eos_id])


# The special tokens an HFTokenizer looks for, in order, by their text; the first one the tokenizer has is taken, and
# where it has none the last is added to it (as Hugging Face's add_special_tokens does, at the end of the vocabulary)
SPECIAL_TOKENS = {"bos": ("<s>", "<bos>", "[BOS]", "<|begin_of_text|>", "<|bos|>"),
                  "eos": ("</s>", "<eos>", "[EOS]", "<|endoftext|>", "<|end_of_text|>", "<|eos|>"),
                  "pad": ("<pad>", "[PAD]", "<|pad|>"),
                  "unk": ("<unk>", "[UNK]", "<|unk|>")}


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json behind Tokenizer's interface (needs the tokenizers package). Its
    special tokens are found by SPECIAL_TOKENS' rule: for each of bos, eos, pad and unk, the first of its names that
    the tokenizer knows, else the last name added as a new special token (so GPT-2's vocabulary, whose only special
    token <|endoftext|> is its eos, gets <|bos|>, <|pad|> and <|unk|> at ids 50257-50259). The rule depends on the file
    alone, so every load gives the same ids. The text it encodes gets no post-processing (no special tokens added
    by the file's own template): bos and eos are the tool's to add. Raises UsageError naming the file if it is
    unreadable or the package missing."""
    kind = "huggingface"
    file_name = "tokenizer.json"

    def __init__(self, path):
        try:
            from tokenizers import Tokenizer as Loaded
        except ImportError:
            raise UsageError(f"{path}: a tokenizer.json needs the tokenizers package: pip install -r "
                             "requirements-extra.txt") from None
        try:
            with open(path, "rb") as f:
                self.data = f.read()
            if b'"model"' not in self.data:
                raise ValueError("no \"model\" in it")
            self.hf = Loaded.from_str(self.data.decode("utf-8"))
        except Exception as e:
            raise UsageError(f"{path}: not a readable tokenizer.json ({' '.join(str(e).split())})") from None
        self.hf.encode_special_tokens = True  # a special token's text inside a line is text, as SentencePiece reads it
        self.path = path
        self.added = []
        for name, candidates in SPECIAL_TOKENS.items():
            found = next((self.hf.token_to_id(t) for t in candidates if self.hf.token_to_id(t) is not None), None)
            if found is None:
                self.hf.add_special_tokens([candidates[-1]])
                self.added.append(candidates[-1])
                found = self.hf.token_to_id(candidates[-1])
            setattr(self, f"{name}_id", found)
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        self.check_special_ids("name them as one of " + "; ".join(f"{k}: {', '.join(v)}"
                                                                   for k, v in SPECIAL_TOKENS.items()))

    @property
    def model_proto(self):
        """The tokenizer.json's bytes: what worker processes load (batch_encoder) and part of the corpus cache key."""
        return self.data

    def encode_batch(self, texts):
        return [encoding.ids for encoding in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode_ids(self, ids):
        return self.hf.decode(ids, skip_special_tokens=False)


def batch_encoder(model_proto):
    """texts -> lists of token ids (no bos or eos) of a serialised tokenizer (Tokenizer.model_proto's bytes: a
    tokenizer.json's, or a SentencePiece model's), for the worker processes that tokenise a corpus."""
    if model_proto[:1] == b"{":
        from tokenizers import Tokenizer as Loaded
        hf = Loaded.from_str(model_proto.decode("utf-8"))
        hf.encode_special_tokens = True  # as HFTokenizer encodes
        return lambda texts: [e.ids for e in hf.encode_batch(list(texts), add_special_tokens=False)]
    return spm.SentencePieceProcessor(model_proto=model_proto).encode


BOM = "\ufeff"
ENCODING_ERRORS = ("strict", "replace")
CACHE_VERSION = 1
SPAN_BYTES = 4 << 20  # text per tokenisation task: a worker holds about this much at a time
ENCODE_LINES = 8192  # lines per SentencePiece call inside a task (bounds the Python lists it returns)
KEY_BYTES = 1 << 20  # bytes of the corpus's head and of its tail hashed into the cache key


def default_cache_dir():
    """$XDG_CACHE_HOME/score-diffusion-lm, else ~/.cache/score-diffusion-lm."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "score-diffusion-lm")


def decode_line(raw, errors="strict"):
    """Text of one corpus line (bytes): UTF-8, byte-order marks dropped, surrounding whitespace (Unicode's,
    non-breaking spaces included) stripped. With errors="replace", invalid bytes become U+FFFD and a carriage
    return inside the line a space; with "strict" both raise (UnicodeDecodeError, ValueError)."""
    text = raw.decode("utf-8", errors).replace(BOM, "").strip()
    if "\r" in text:
        if errors == "strict":
            raise ValueError("carriage return inside a line (old Mac line ends?)")
        text = text.replace("\r", " ")
    return text


def read_lines(path, tokenizer, length, max_lines, flag="--valid"):
    """Held-out lines as (token ids with bos and eos, characters + 1 for the line end), at most `max_lines`
    (-1: all), and the number of lines read but left out for not fitting `length` tokens. Raises UsageError
    naming `flag` and the file, or path:line for a line that is not text."""
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: {'is a folder, not a file' if os.path.isdir(path) else 'no such file'}")
    lines, skipped = [], 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                text = decode_line(raw)
            except ValueError as e:
                raise UsageError(f"{path}:{number}: {e}") from None
            ids = tokenizer.encode(text) if text else []
            if len(ids) > length:
                skipped += 1
            elif ids:
                lines.append((ids, len(text) + 1))
            if len(lines) == max_lines:
                break
    if not lines and skipped:
        raise UsageError(f"{flag} {path}: each of its {skipped:,} lines is longer than the training rows of {length} "
                         "tokens")
    if not lines:
        raise UsageError(f"{flag} {path}: no line with text in it")
    return lines, skipped


def lines_starting_in(f, start, end):
    """The lines (bytes) of an open binary file that start in the byte range [start, end)."""
    f.seek(max(start - 1, 0))
    if start > 0:
        f.readline()  # the rest of a line that began before `start` belongs to the previous range
    position = f.tell()
    while position < end:
        raw = f.readline()
        if not raw:
            return
        yield raw
        position += len(raw)


def tokenize_span(task):
    """Tokenise the lines starting in one byte range of a corpus; runs in a worker process.

    task: (path, serialised tokenizer (Tokenizer.model_proto), start, end, encoding errors, numpy dtype name).
    Returns (lines in the range, lengths int64 (N,) of its N lines with tokens, their ids concatenated
    (sum of lengths,) in the dtype, the first problem as (line number within the range, reason) or None).
    """
    path, model_proto, start, end, errors, dtype = task
    encode = batch_encoder(model_proto)
    lengths, ids, texts, problem, number = [], [], [], None, 0

    def encode_waiting():
        for pieces in encode(texts):
            if pieces:  # a line of characters the tokenizer drops (zero-width spaces, controls) has no text
                lengths.append(len(pieces))
                ids.append(np.asarray(pieces, dtype=dtype))
        texts.clear()

    with open(path, "rb") as f:
        for number, raw in enumerate(lines_starting_in(f, start, end), start=1):
            try:
                text = decode_line(raw, errors)
            except UnicodeDecodeError as e:
                problem = problem or (number, f"not UTF-8 ({e.reason} at byte {e.start} of the line)")
                continue
            except ValueError as e:
                problem = problem or (number, str(e))
                continue
            if text:
                texts.append(text)
            if len(texts) == ENCODE_LINES:
                encode_waiting()
    encode_waiting()
    return number, np.asarray(lengths, dtype=np.int64), np.concatenate(ids or [np.zeros(0, dtype)]), problem


def cache_prefix(path, tokenizer, cache_dir, errors):
    """Where the cache of `path` lives: cache_dir/<file name>.<key>, the key hashing the corpus's size,
    modification time, first and last MiB, the tokenizer model and the encoding-error mode."""
    stat = os.stat(path)
    digest = hashlib.sha256(f"{CACHE_VERSION}|{stat.st_size}|{stat.st_mtime_ns}|{errors}|".encode())
    with open(path, "rb") as f:
        digest.update(f.read(KEY_BYTES))
        f.seek(max(stat.st_size - KEY_BYTES, 0))
        digest.update(f.read())
    digest.update(tokenizer.model_proto)
    return os.path.join(cache_dir, f"{os.path.basename(path)}.{digest.hexdigest()[:16]}")


def build_cache(path, tokenizer, prefix, errors="strict", num_proc=None, progress=True):
    """Tokenise `path` once into prefix.ids (flat, uint16 if the vocabulary fits, else uint32),
    prefix.offsets (int64, N + 1) and prefix.json (written last: its presence marks a finished cache).

    Streams the corpus in SPAN_BYTES ranges over `num_proc` processes (default: every core), so memory does not
    grow with the corpus. Raises UsageError naming file and line for invalid UTF-8 or a carriage return inside
    a line (unless errors="replace"), and naming the file if no line gives any token.
    """
    size = os.path.getsize(path)
    spans = [(start, min(start + SPAN_BYTES, size)) for start in range(0, size, SPAN_BYTES)]
    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
    tasks = [(path, tokenizer.model_proto, start, end, errors, dtype) for start, end in spans]
    num_proc = min(num_proc or os.cpu_count() or 1, len(tasks))
    temporary = f"{prefix}.{os.getpid()}@{socket.gethostname()}.tmp"  # a cache folder may be shared by hosts
    lines = examples = tokens = 0
    # Ctrl-C reaches the whole process group: the tokenising processes leave it to this one, which cleans up. They
    # start from a fork server, not a fork of this process, whose torch threads (a training or compiling run's) a
    # fork would copy mid-lock: two test runs hung so, their workers dead
    context = multiprocessing.get_context("forkserver")
    pool = context.Pool(num_proc, signal.signal, (signal.SIGINT, signal.SIG_IGN)) if num_proc > 1 else None
    try:
        with open(temporary + ".ids", "wb") as ids_file, open(temporary + ".offsets", "wb") as offsets_file, \
                tqdm(total=size, unit="B", unit_scale=True, desc=f"tokenising {os.path.basename(path)}",
                     disable=not progress, leave=False, delay=1.0) as bar:
            offsets_file.write(np.zeros(1, np.int64).tobytes())
            results = pool.imap(tokenize_span, tasks) if pool else map(tokenize_span, tasks)
            for (start, end), (span_lines, lengths, ids, problem) in zip(spans, results):
                if problem:
                    raise UsageError(f"{path}:{lines + problem[0]}: {problem[1]}; fix the file (prepare.py "
                                     "cleans it) or pass --encoding_errors replace")
                ids_file.write(ids.tobytes())
                offsets_file.write((tokens + np.cumsum(lengths)).tobytes())
                lines, examples, tokens = lines + span_lines, examples + len(lengths), tokens + len(ids)
                bar.update(end - start)
        if examples == 0:
            raise UsageError(f"{path}: no line with text to train on ({lines:,} lines, all blank or made only of "
                             "characters the tokenizer drops)")
        os.replace(temporary + ".ids", prefix + ".ids")
        os.replace(temporary + ".offsets", prefix + ".offsets")
        meta = {"version": CACHE_VERSION, "corpus": os.path.abspath(path), "tokenizer": tokenizer.path,
                "dtype": dtype, "lines": lines, "examples": examples, "tokens": tokens, "encoding_errors": errors}
        with open(temporary + ".json", "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(temporary + ".json", prefix + ".json")
    finally:
        if pool:
            pool.terminate()
        for suffix in (".ids", ".offsets", ".json"):
            if os.path.exists(temporary + suffix):
                os.remove(temporary + suffix)


def load_corpus(path, tokenizer, cache_dir=None, errors="strict", num_proc=None, progress=True):
    """The TokenCache of a line-per-example corpus, built on first use and reused while neither the corpus nor
    the tokenizer changes. Raises UsageError naming the path for a missing, unreadable or empty corpus, a
    directory or other non-file, an unwritable cache folder, and (with errors="strict") invalid UTF-8 with its
    line. A cache whose files are cut short or half written is rebuilt."""
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory, expected a text file with one example a line")
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: not a regular file (a pipe or a device?); the corpus must be a file on disk")
    if errors not in ENCODING_ERRORS:
        raise UsageError(f"--encoding_errors {errors}: expected one of {', '.join(ENCODING_ERRORS)}")
    cache_dir = cache_dir or default_cache_dir()
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise UsageError(f"--cache_dir {cache_dir}: exists and is not a folder")
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--cache_dir {cache_dir}: {e.strerror}") from None
    try:
        prefix = cache_prefix(path, tokenizer, cache_dir, errors)
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None
    if not cache_is_whole(prefix):
        remove_abandoned_builds(cache_dir)
        try:
            build_cache(path, tokenizer, prefix, errors, num_proc, progress)
        except OSError as e:
            where = f"--cache_dir {cache_dir}" if e.filename and e.filename.startswith(prefix) else e.filename or path
            raise UsageError(f"{where}: {e.strerror} (while building the token cache)") from None
    return TokenCache(prefix)


def cache_is_whole(prefix):
    """Whether prefix.json exists and the .ids and .offsets files have the sizes and end offsets its counts give
    (a cache cut short or half written is rebuilt, not read; contents are not checked further)."""
    try:
        with open(prefix + ".json") as f:
            meta = json.load(f)
        offsets = np.memmap(prefix + ".offsets", dtype=np.int64, mode="r")
        return (os.path.getsize(prefix + ".ids") == meta["tokens"] * np.dtype(meta["dtype"]).itemsize
                and len(offsets) == meta["examples"] + 1 and offsets[0] == 0 and offsets[-1] == meta["tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def remove_abandoned_builds(cache_dir):
    """Delete the temporary files of cache builds on this host whose process no longer runs (killed mid-build),
    whatever corpus version they were building."""
    for entry in os.listdir(cache_dir):
        match = re.search(r"\.(\d+)@(.+)\.tmp\.(ids|offsets|json)$", entry)
        if not match or match[2] != socket.gethostname():
            continue
        try:
            os.kill(int(match[1]), 0)
        except ProcessLookupError:
            os.remove(os.path.join(cache_dir, entry))
        except PermissionError:
            pass  # alive, another user's


class TokenCache:
    """A tokenised corpus on disk: example i holds the token ids of the i-th non-blank line (no bos, eos).

    The ids are a flat memory map; each process maps the files itself on first use, so DataLoader workers
    share no file handle. `meta` holds the counts of lines, examples and tokens.
    """

    def __init__(self, prefix):
        self.prefix = prefix
        with open(prefix + ".json") as f:
            self.meta = json.load(f)
        self._pid, self._ids, self._offsets, self._counts = None, None, None, {}

    def __getstate__(self):
        return {"prefix": self.prefix, "meta": self.meta, "_pid": None, "_ids": None, "_offsets": None, "_counts": {}}

    def _map(self):
        if self._pid != os.getpid():
            empty = self.meta["tokens"] == 0  # numpy cannot map an empty file
            self._ids = (np.zeros(0, self.meta["dtype"]) if empty else
                         np.memmap(self.prefix + ".ids", dtype=self.meta["dtype"], mode="r"))
            self._offsets = np.memmap(self.prefix + ".offsets", dtype=np.int64, mode="r")
            self._pid = os.getpid()
        return self._ids, self._offsets

    def __len__(self):
        return self.meta["examples"]

    def length(self, i):
        """Tokens of example i (int)."""
        offsets = self._map()[1]
        return int(offsets[i + 1] - offsets[i])

    def length_counts(self, seq_len):
        """How many examples have each length as a training row holds them, bos and eos included: a list of
        seq_len + 1 ints, counts[n] the examples of n tokens, those longer than seq_len (cropped to a full row)
        counted at seq_len. What sampling draws unconditional lengths from; read once per seq_len (every
        checkpoint keeps it)."""
        if seq_len not in self._counts:
            lengths = np.minimum(np.diff(self._map()[1]) + 2, seq_len)
            self._counts[seq_len] = np.bincount(lengths, minlength=seq_len + 1).tolist()
        return list(self._counts[seq_len])

    def ids(self, i, start=0, stop=None):
        """Token ids [start, stop) of example i, int64 (stop - start,); only that window is read."""
        ids, offsets = self._map()
        begin = int(offsets[i])
        stop = self.length(i) if stop is None else stop
        return ids[begin + start:begin + stop].astype(np.int64)


# Preparing a corpus: raw text to train.txt, valid.txt and a tokenizer (prepare.py, train.py --demo, the tests)

def clean_line(line, lowercase=False):
    """One example: byte-order marks removed, surrounding whitespace stripped, inner runs of whitespace (tabs,
    CR, non-breaking spaces, ...) made one space."""
    line = " ".join(line.replace("\ufeff", "").split())
    return line.lower() if lowercase else line


def is_valid_line(line, valid_fraction):
    """Deterministic split by a hash of the line: equal lines always land on the same side."""
    digest = int.from_bytes(hashlib.sha1(line.encode("utf-8")).digest()[:8], "big")
    return digest / 2 ** 64 < valid_fraction


def read_raw(path, lowercase, counts):
    """Cleaned non-blank lines of a raw text file; undecodable bytes become U+FFFD. Yields str and counts
    the lines read, blank and undecodable ones in the dict `counts`."""
    errors = [0]

    def replace_and_count(error):
        errors[0] += 1
        return "\ufffd", error.end

    codecs.register_error("prepare.count", replace_and_count)
    with open(path, encoding="utf-8-sig", errors="prepare.count") as f:  # universal newlines; a BOM is dropped
        for line in f:
            counts["read"] += 1
            counts["undecodable"] += errors[0] > 0
            errors[0] = 0
            line = clean_line(line, lowercase)
            if line:
                yield line
            else:
                counts["blank"] += 1


def write_splits(lines, train_path, valid_path, valid_fraction):
    """Write the lines to train_path and valid_path (split by is_valid_line); returns (train, valid) counts."""
    counts = [0, 0]
    with open(train_path, "w", encoding="utf-8", newline="\n") as train, \
            open(valid_path, "w", encoding="utf-8", newline="\n") as valid:
        for line in lines:
            is_valid = is_valid_line(line, valid_fraction)
            (valid if is_valid else train).write(line + "\n")
            counts[is_valid] += 1
    return counts


SPM_LINE_BYTES = 4192  # SentencePiece's default longest training line; longer ones are skipped


def train_tokenizer(train_path, model_prefix, vocab_size, where):
    """Train a SentencePiece BPE model on train_path into model_prefix.model and .vocab: bos 0, eos 1, pad 2, unk 3
    and the ten digits as user-defined symbols (the original project's recipe). Raises UsageError naming
    --vocab_size (and `where`, the corpus as the user knows it) if the corpus cannot support that many pieces, or
    naming `where` if every line is too long to train on."""
    try:
        spm.SentencePieceTrainer.train(
            input=train_path, model_prefix=model_prefix, model_type="bpe", vocab_size=vocab_size,
            user_defined_symbols=[str(i) for i in range(10)], bos_id=0, eos_id=1, pad_id=2, unk_id=3,
            input_sentence_size=2_000_000, shuffle_input_sentence=True, max_sentence_length=SPM_LINE_BYTES,
            minloglevel=2)
    except RuntimeError as e:
        most = re.search(r"value <= (\d+)", str(e))
        if "sentences_.empty()" in str(e):  # SentencePiece skips lines over max_sentence_length bytes
            raise UsageError(f"{where}: every training line is longer than SentencePiece's {SPM_LINE_BYTES:,} bytes "
                             "(one line is one example; split the text into lines)") from None
        if most:
            raise UsageError(f"--vocab_size {vocab_size}: {where} supports at most {int(most[1]):,} pieces; "
                             "give a smaller --vocab_size") from None
        raise UsageError(f"--vocab_size {vocab_size}: SentencePiece could not train on {where} ({e})") from None


PREPARED = ("train.txt", "valid.txt", "bpe.model", "bpe.vocab")


def prepare_corpus(lines, out_dir, valid_fraction, vocab_size, source="the corpus"):
    """Write out_dir/train.txt and valid.txt (the lines split by a hash of each) and bpe.model (with bpe.vocab)
    trained on the train split; returns the (train, valid) line counts. All four are written under temporary
    names and renamed only once the tokenizer is trained, so a failure leaves out_dir as it was (a folder made
    for it is removed again), and an input that is one of them (prepare.py run on its own output) is read whole
    before it is replaced. Raises UsageError naming `source` (the input as the user knows it) if no training line
    is left or the tokenizer cannot be trained (train_tokenizer)."""
    made = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    final = [os.path.join(out_dir, name) for name in PREPARED]
    temporary = [os.path.join(out_dir, f"tmp.{name}") for name in PREPARED]  # bpe.model: prefix tmp.bpe
    done = False
    try:
        counts = write_splits(lines, temporary[0], temporary[1], valid_fraction)
        if counts[0] == 0:
            raise UsageError(f"{source}: no training line left after cleaning" if counts[1] == 0 else
                             f"{source}: every line fell to valid.txt (the split is by a hash of each line, so a file "
                             "that is already the valid side of such a split stays whole); give --valid_fraction 0")
        train_tokenizer(temporary[0], os.path.join(out_dir, "tmp.bpe"), vocab_size, source)
        for tmp, path in zip(temporary, final):
            os.replace(tmp, path)
        done = True
    finally:
        for tmp in temporary:
            if os.path.exists(tmp):
                os.remove(tmp)
        if made and not done and not os.listdir(out_dir):
            os.rmdir(out_dir)
    return counts


def line_lengths(paths, tokenizer):
    """The length in tokens (bos and eos included, as a training row holds it) of every line of the prepared files
    `paths` (one example a line, UTF-8), as a sorted list of int."""
    lengths = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            while lines := [line.rstrip("\n") for _, line in zip(range(ENCODE_LINES), f)]:
                lengths += [len(ids) + 2 for ids in tokenizer.encode_batch(lines)]
    return sorted(lengths)


def docstring_sentences(root):
    """English sentences from the docstrings of the .py files under `root`, parsed (never imported), in a
    stable order. Keeps sentences of 5 to 40 words, made mostly of letters, that end with a full stop."""
    seen = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("test", "tests", "idlelib", "site-packages", "__pycache__"))
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                doc = ast.get_docstring(node) or ""
                for paragraph in doc.split("\n\n"):
                    for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(paragraph.split())):
                        if looks_like_prose(sentence) and sentence not in seen:
                            seen.add(sentence)
                            yield sentence


def looks_like_prose(sentence):
    """Whether a docstring sentence reads as English prose rather than code, a signature or a list."""
    words = sentence.split()
    letters = sum(c.isalpha() or c in " ,.'-" for c in sentence)
    return (5 <= len(words) <= 40 and sentence[0].isupper() and sentence.endswith(".")
            and letters / len(sentence) > 0.97 and not re.search(r"\w\.\w|__|\s-\s*$", sentence))


def demo_sentences():
    """The demo corpus: about 9,000 English sentences from the docstrings of this Python's standard library (which
    sentences depends on the Python version)."""
    return list(docstring_sentences(sysconfig.get_paths()["stdlib"]))


def build_demo(out_dir, vocab_size=2000):
    """The demo corpus, split, with its tokenizer, in out_dir (prepare_corpus); returns the (train, valid) counts."""
    return prepare_corpus(demo_sentences(), out_dir, valid_fraction=0.02, vocab_size=vocab_size,
                          source="the demo corpus")
