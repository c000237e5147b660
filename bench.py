"""Measure the project's speed on this machine; the README's figures come from here.

    python bench.py data -d corpus.txt -spm bpe.model [-slen 64] [-bsz 128] [--json]
"""
import argparse
import json
import os
import resource
import sys
import tempfile
import time

from data import ENCODING_ERRORS, PackedBatches, PackedRows, Tokenizer, load_corpus
from utils import UsageError, die


def bench_data(args):
    """Cache build time (s, from a cold cache unless --cache_dir is given) and the largest resident memory of
    this process or a tokenising one by then (MB), loader throughput (examples/s and real tokens/s after the first
    batch) and packing efficiency (real tokens / row slots) over --batches."""
    tokenizer = Tokenizer(args.spm_model)
    with tempfile.TemporaryDirectory() as cold:
        started = time.perf_counter()
        cache = load_corpus(args.data_path, tokenizer, args.cache_dir or cold, args.encoding_errors, progress=False)
        build_s = time.perf_counter() - started
        peak_mb = max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024
        rows = PackedRows(cache, args.sequence_length, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id,
                          seed=args.seed, expand_prob=args.expand_prob)
        batches = PackedBatches(rows, args.batch_size, args.num_workers)
        try:
            started = time.perf_counter()
            next(batches)  # worker start-up and the first chunk
            first_s = time.perf_counter() - started
            examples = real = used = slots = 0
            started = time.perf_counter()
            for _ in range(args.batches):
                batch = next(batches)
                segment_ids, ids = batch["segment_ids"], batch["ids"]
                examples += int(segment_ids.max(dim=1).values.sum())
                real += int(((segment_ids > 0) & (ids != tokenizer.pad_id)).sum())
                used += int((segment_ids > 0).sum())
                slots += ids.numel()
            elapsed = time.perf_counter() - started
        finally:
            batches.close()
    return {"corpus": args.data_path, "examples_in_corpus": len(cache), "tokens_in_corpus": cache.meta["tokens"],
            "sequence_length": args.sequence_length, "batch_size": args.batch_size, "expand_prob": args.expand_prob,
            "num_workers": args.num_workers, "batches": args.batches, "cache_build_s": round(build_s, 3),
            "cache_build_peak_rss_mb": round(peak_mb),
            "first_batch_s": round(first_s, 3), "loader_examples_per_s": round(examples / elapsed),
            "loader_tokens_per_s": round(real / elapsed), "packing_efficiency": round(real / slots, 4),
            "slot_use": round(used / slots, 4)}


def parse_args(argv=None):
    """Subcommand and its flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="token cache build, loader throughput and packing efficiency")
    d.add_argument("-d", "--data_path", required=True, help="corpus, one example a line")
    d.add_argument("-spm", "--spm_model", required=True, help="SentencePiece model")
    d.add_argument("-slen", "--sequence_length", type=int, default=64, help="row length L in tokens")
    d.add_argument("-bsz", "--batch_size", type=int, default=128, help="rows per batch")
    d.add_argument("--expand_prob", type=float, default=0.0,
                   help="share of lines padded after eos (default 0: packing alone; expansion pads are not text)")
    d.add_argument("--num_workers", type=int, default=2, help="DataLoader worker processes (0: none), as train.py")
    d.add_argument("--batches", type=int, default=1000,
                   help="batches timed after the first (enough that chunks prefetched meanwhile hardly count)")
    d.add_argument("--cache_dir", help="an existing cache folder (default: a new temporary one, so the build is timed)")
    d.add_argument("--encoding_errors", choices=ENCODING_ERRORS, default="strict",
                   help="invalid UTF-8 in the corpus: strict stops with its line number, replace uses U+FFFD")
    d.add_argument("--seed", type=int, default=0, help="data order")
    for sub_parser in (d,):
        sub_parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if args.sequence_length < 2 or args.batch_size < 1 or args.batches < 1 or args.num_workers < 0:
        p.error("-slen must be at least 2, -bsz and --batches at least 1, --num_workers at least 0")
    if not 0 <= args.expand_prob <= 1:
        p.error(f"--expand_prob {args.expand_prob}: must be in [0, 1]")
    return args


def main(argv=None):
    """Run the benchmark `argv` names and print its figures."""
    args = parse_args(argv)
    result = {"data": bench_data}[args.command](args)
    if args.json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key:<{width}}  {value:,}" if isinstance(value, (int, float)) else f"{key:<{width}}  {value}")


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        die(str(e))
    except BrokenPipeError:
        sys.stderr.close()
        os._exit(0)
