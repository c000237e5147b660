"""Clean a raw text file into train/valid splits and train a SentencePiece BPE tokenizer for them.

    python prepare.py -i raw.txt -o DIR [--vocab_size 8000] [--lowercase] [--valid_fraction 0.01]
    python prepare.py --demo -o DIR     # a corpus of English sentences from the Python standard library's docstrings

Writes DIR/train.txt, DIR/valid.txt (one example a line) and DIR/bpe.model with bos 0, eos 1, pad 2, unk 3
and the ten digits as user-defined symbols (the recipe of the original project).
"""
import argparse
import ast
import codecs
import hashlib
import os
import re
import sys
import sysconfig

import sentencepiece as spm

from utils import UsageError, die


def clean_line(line, lowercase=False):
    """One example: byte-order marks removed, surrounding whitespace stripped, inner runs of whitespace (tabs,
    CR, non-breaking spaces, ...) made one space."""
    line = " ".join(line.replace("\ufeff", "").split())
    return line.lower() if lowercase else line


def is_valid_line(line, valid_fraction):
    """Deterministic split by a hash of the line: equal lines always land on the same side."""
    digest = int.from_bytes(hashlib.sha1(line.encode("utf-8")).digest()[:8], "big")
    return digest / 2 ** 64 < valid_fraction


def write_splits(lines, out_dir, valid_fraction):
    """Write the cleaned lines to out_dir/train.txt and out_dir/valid.txt; returns (train, valid) counts.
    Both are written to temporary files and renamed at the end, so an input that is one of them (re-running
    prepare.py on its own output) is read whole before it is replaced."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in ("train.txt", "valid.txt")]
    counts = [0, 0]
    with open(paths[0] + ".tmp", "w", encoding="utf-8", newline="\n") as train, \
            open(paths[1] + ".tmp", "w", encoding="utf-8", newline="\n") as valid:
        for line in lines:
            is_valid = is_valid_line(line, valid_fraction)
            (valid if is_valid else train).write(line + "\n")
            counts[is_valid] += 1
    if counts[0] == 0:
        for path in paths:
            os.remove(path + ".tmp")
        raise UsageError(f"{out_dir}/train.txt: no training line left after cleaning")
    for path in paths:
        os.replace(path + ".tmp", path)
    return counts


def train_tokenizer(train_path, out_dir, vocab_size):
    """Train out_dir/bpe.model on train_path. Raises UsageError if the corpus cannot support vocab_size."""
    try:
        spm.SentencePieceTrainer.train(
            input=train_path, model_prefix=os.path.join(out_dir, "bpe"), model_type="bpe", vocab_size=vocab_size,
            user_defined_symbols=[str(i) for i in range(10)], bos_id=0, eos_id=1, pad_id=2, unk_id=3,
            input_sentence_size=2_000_000, shuffle_input_sentence=True, minloglevel=2)
    except RuntimeError as e:
        raise UsageError(f"{train_path}: SentencePiece could not train a vocabulary of {vocab_size} ({e})") from None
    return os.path.join(out_dir, "bpe.model")


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


def build_demo(out_dir, vocab_size=2000):
    """Demo corpus from the standard library's docstrings, split and with its tokenizer, in out_dir."""
    lines = list(docstring_sentences(sysconfig.get_paths()["stdlib"]))
    n_train, n_valid = write_splits(lines, out_dir, valid_fraction=0.02)
    train_tokenizer(os.path.join(out_dir, "train.txt"), out_dir, vocab_size)
    print(f"{out_dir}: {n_train:,} train and {n_valid:,} valid sentences, tokenizer of {vocab_size}", file=sys.stderr)


def main(argv=None):
    """Clean, split and train a tokenizer as `argv` asks; raises UsageError on bad input."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", help="raw text file, one example a line")
    p.add_argument("-o", "--output_dir", required=True, help="folder for train.txt, valid.txt and bpe.model")
    p.add_argument("--vocab_size", type=int, help="SentencePiece vocabulary size (default 8000; 2000 with --demo)")
    p.add_argument("--lowercase", action="store_true", help="lower-case every line")
    p.add_argument("--valid_fraction", type=float, default=0.01, help="share of lines held out for validation")
    p.add_argument("--demo", action="store_true", help="build the demo corpus instead of reading --input")
    args = p.parse_args(argv)
    if args.vocab_size is not None and args.vocab_size < 16:
        p.error(f"--vocab_size {args.vocab_size}: must be at least 16 (4 special ids and 10 digits come first)")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UsageError(f"{args.output_dir}: exists and is not a folder")
    if args.demo:
        return build_demo(args.output_dir, args.vocab_size or 2000)
    if not args.input:
        p.error("--input is required (or use --demo)")
    if not 0 <= args.valid_fraction < 1:
        p.error(f"--valid_fraction {args.valid_fraction}: must be in [0, 1)")
    if not os.path.isfile(args.input):
        raise UsageError(f"{args.input}: no such file")
    counts = {"read": 0, "blank": 0, "undecodable": 0}
    n_train, n_valid = write_splits(read_raw(args.input, args.lowercase, counts), args.output_dir, args.valid_fraction)
    vocab_size = 8000 if args.vocab_size is None else args.vocab_size
    train_tokenizer(os.path.join(args.output_dir, "train.txt"), args.output_dir, vocab_size)
    print(f"{args.output_dir}: {counts['read']:,} lines read; {n_train:,} train and {n_valid:,} valid; "
          f"{counts['blank']:,} blank lines dropped; {counts['undecodable']:,} lines had invalid UTF-8 "
          "(replaced by U+FFFD)", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        die(str(e))
