"""Clean a raw text file into train/valid splits and train a SentencePiece BPE tokenizer for them.

    python prepare.py -i raw.txt -o DIR [--vocab_size 8000] [--lowercase] [--valid_fraction 0.01]
    python prepare.py --demo -o DIR     # a corpus of English sentences from the Python standard library's docstrings

Writes DIR/train.txt, DIR/valid.txt (one example a line) and DIR/bpe.model (with bpe.vocab): bos 0, eos 1, pad 2,
unk 3 and the ten digits as user-defined symbols (the recipe of the original project). Lines are stripped, runs of
whitespace become one space, blank lines are dropped and invalid UTF-8 is replaced, each counted in the report;
the split is by a hash of the line. Nothing in DIR is replaced unless all four files are written.
"""
import math
import os
import sys

from corpus import Tokenizer, build_demo, line_lengths, prepare_corpus, read_raw
from flags import DEFAULTS
from utils import ArgumentParser, UsageError, run_command


def build_parser():
    """prepare.py's command line."""
    p = ArgumentParser(prog="prepare.py", description=__doc__)
    p.add_argument("-i", "--input", help="raw text file, one example a line (may be DIR/train.txt itself)")
    p.add_argument("-o", "--output_dir", required=True, help="folder for train.txt, valid.txt and bpe.model")
    p.add_argument("--vocab_size", type=int, help="SentencePiece vocabulary size (default 8000; 2000 with --demo)")
    p.add_argument("--lowercase", action="store_true", help="lower-case every line")
    p.add_argument("--valid_fraction", type=float, default=0.01, help="share of lines held out for validation")
    p.add_argument("--demo", action="store_true", help="build the demo corpus instead of reading --input")
    return p


def report_lengths(folder, row):
    """Say how many of the prepared lines in `folder` are longer than train.py's default row of `row` tokens (bos and
    eos included) and the -slen that holds 99% of them whole (all of them, where 99% already fit): training crops a
    longer line and eval.py leaves it out."""
    lengths = line_lengths([os.path.join(folder, name) for name in ("train.txt", "valid.txt")],
                           Tokenizer(os.path.join(folder, "bpe.model")))
    longer = sum(n > row for n in lengths)
    fit = lengths[math.ceil(0.99 * len(lengths)) - 1]
    if longer:
        hold = f"-slen {fit} holds 99% of the lines whole" if fit > row else f"-slen {lengths[-1]} holds all of them"
        print(f"note: {longer:,} of {len(lengths):,} lines ({100 * longer / len(lengths):.1f}%) are longer than "
              f"train.py's default rows of {row} tokens (bos and eos included): training crops them and eval.py "
              f"leaves them out; {hold}", file=sys.stderr)
    else:
        print(f"every line fits train.py's default rows of {row} tokens (the longest: {lengths[-1]})", file=sys.stderr)


def main(argv=None):
    """Clean, split and train a tokenizer as `argv` asks; raises UsageError on bad input."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.vocab_size is not None and args.vocab_size < 16:
        p.error(f"--vocab_size {args.vocab_size}: must be at least 16 (4 special ids and 10 digits come first)")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UsageError(f"{args.output_dir}: exists and is not a folder")
    if args.demo:
        vocab_size = args.vocab_size or 2000
        n_train, n_valid = build_demo(args.output_dir, vocab_size)
        print(f"{args.output_dir}: {n_train:,} train and {n_valid:,} valid sentences, tokenizer of {vocab_size:,} "
              "pieces", file=sys.stderr)
        return
    if not args.input:
        p.error("--input is required (or use --demo)")
    if not 0 <= args.valid_fraction < 1:
        p.error(f"--valid_fraction {args.valid_fraction}: must be in [0, 1)")
    if not os.path.isfile(args.input):
        raise UsageError(f"{args.input}: {'is a folder, not a file' if os.path.isdir(args.input) else 'no such file'}")
    counts = {"read": 0, "blank": 0, "undecodable": 0}
    vocab_size = 8000 if args.vocab_size is None else args.vocab_size
    n_train, n_valid = prepare_corpus(read_raw(args.input, args.lowercase, counts), args.output_dir,
                                      args.valid_fraction, vocab_size, source=args.input)
    print(f"{args.output_dir}: {counts['read']:,} lines read; {n_train:,} train and {n_valid:,} valid; "
          f"{counts['blank']:,} blank lines dropped; {counts['undecodable']:,} lines had invalid UTF-8 "
          f"(replaced by U+FFFD); tokenizer of {vocab_size:,} pieces", file=sys.stderr)
    report_lengths(args.output_dir, DEFAULTS["every"]["sequence_length"])
    if n_valid == 0 and args.valid_fraction > 0:
        print(f"warning: {args.output_dir}/valid.txt is empty: no line fell to the --valid_fraction "
              f"{args.valid_fraction} share of {n_train:,} (the split is by a hash of each line, so a file that is "
              "already one side of such a split, a prepared train.txt, stays whole); give a larger --valid_fraction, "
              "or hold out lines of your own for eval.py", file=sys.stderr)


if __name__ == "__main__":
    run_command(main)
