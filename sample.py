"""Sample text from a trained checkpoint: one sample a line (or a JSON line) on stdout, logs on stderr.

    python sample.py -mdir out [-n 8] [--steps 200] [--sampler iterative|euler|heun|stochastic]
                     [--schedule uniform|ar|confidence] [--length 64 | --length 16:48]
                     [--prompt "text" ... | --prompt_file FILE | --infill "the [5] of the [3]" ...]
                     [--suffix TEXT] [--early_exit K] [--jsonl] [--seed 0] [--ema RATE]

Unconditional by default. Prompts, templates and suffixes are held at sigma = 0, so their tokens come out exactly
as given; each prompt or template gives -n samples.
"""
import argparse
import json
import math
import os
import sys
from functools import partial

import numpy as np
import torch

from data import MAX_SAMPLE_LENGTH, Tokenizer, decode_line, parse_template, sample_layout, sample_rows
from diffusion import (SAMPLERS, SAMPLING_RHO, SCHEDULES, TimeWarp, ar_schedule, confidence_schedule, generate,
                       stochastic_step)
from model import ModelConfig, ScoreLM
from utils import (PRECISIONS, UsageError, die, keep_freed_memory, load_checkpoint, load_state_dict_strict,
                   resolve_device)

CHECKPOINT = "ckpt.pt"


def load_model(model_dir, ema=None, device="cpu"):
    """Rebuild the model of `model_dir` from its checkpoint alone, with the raw weights or those of EMA rate
    `ema`. Returns (model in eval mode, tokenizer, checkpoint's sampling settings dict).
    Raises UsageError if the folder, checkpoint, tokenizer or EMA rate is missing or does not match."""
    path = os.path.join(model_dir, CHECKPOINT)
    checkpoint = load_checkpoint(path, map_location="cpu")
    model = ScoreLM(ModelConfig(**checkpoint["config"]))
    if ema is None:
        state, what = checkpoint["model"], f"{path} [model]"
    else:
        rates = {float(r): r for r in checkpoint["ema"]}
        try:
            ema = float(ema)
        except ValueError:
            raise UsageError(f"--ema {ema!r}: expected a rate such as 0.999") from None
        if ema not in rates:
            raise UsageError(f"--ema {ema}: {path} has EMA rates {sorted(rates) or 'none'}")
        state, what = checkpoint["ema"][rates[ema]], f"{path} [ema {ema}]"
    load_state_dict_strict(model, state, what)
    tokenizer = Tokenizer(os.path.join(model_dir, "tokenizer.model"))
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise UsageError(f"{model_dir}/tokenizer.model: vocabulary {tokenizer.vocab_size} != the model's "
                         f"{model.cfg.vocab_size}")
    warp = checkpoint.get("time_warp")
    return model.to(device).eval(), tokenizer, {**checkpoint["sampling"],
                                                "warp": warp and TimeWarp.from_state_dict(warp)}


def parse_length(text):
    """--length: "N" or a range "A:B" (each sample draws its length uniformly from A..B) -> (A, B)."""
    lo, colon, hi = text.partition(":")
    try:
        lo, hi = int(lo), int(hi if colon else lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a length such as 64 or a range such as 16:48") from None
    if not 2 <= lo <= hi <= MAX_SAMPLE_LENGTH:
        raise argparse.ArgumentTypeError(f"{text!r}: lengths go from 2 to {MAX_SAMPLE_LENGTH:,}, and a range goes up "
                                         "(16:48)")
    return lo, hi


def checked_text(text, where):
    """`text` from the command line, refused (UsageError naming `where`) if it is not valid UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{where}: not valid UTF-8 text") from None
    return text


def open_prompt_file(path):
    """The prompt file opened for reading bytes ("-" is standard input); UsageError if it cannot be."""
    if path == "-":
        return open(sys.stdin.fileno(), "rb", closefd=False)
    if os.path.isdir(path):
        raise UsageError(f"--prompt_file {path}: is a folder, not a file")
    try:
        return open(path, "rb")
    except OSError as e:
        raise UsageError(f"--prompt_file {path}: {e.strerror.lower()}") from None


def read_prompts(args):
    """The prompts to sample from, as (text as given, pieces for data.sample_layout, where it came from)."""
    if args.infill:
        return [(t, parse_template(checked_text(t, "--infill"), "--infill"), "--infill") for t in args.infill]
    if args.prompt_file is not None:
        prompts, path = [], args.prompt_file
        with open_prompt_file(path) as f:
            for number, raw in enumerate(f, 1):
                try:
                    text = decode_line(raw)
                except ValueError as e:
                    raise UsageError(f"{path}:{number}: {e}") from None
                if text:
                    prompts.append((text, [text, None], f"{path}:{number}"))
        if not prompts:
            raise UsageError(f"--prompt_file {path}: no prompt in it (one a line; blank lines are skipped)")
        return prompts
    return [(checked_text(t, "--prompt"), [t, None], f"--prompt {t!r}") if t else ("", [None], "an unprompted sample")
            for t in args.prompt or [""]]


def build_step(args):
    """The sampler step with its parameters bound."""
    if args.sampler == "stochastic":
        return partial(stochastic_step, steps=args.steps, S_churn=args.S_churn, S_tmin=args.S_tmin,
                       S_tmax=args.S_tmax, S_noise=args.S_noise)
    return SAMPLERS[args.sampler]


def build_schedule(args):
    """The per-token schedule with its parameters bound; a schedule added to diffusion.SCHEDULES gets its
    flags here."""
    if args.schedule == "ar":
        return partial(ar_schedule, skew=args.skew)
    if args.schedule == "confidence":
        return partial(confidence_schedule, threshold=args.threshold, patience=args.patience)
    return SCHEDULES[args.schedule]


GRIDS = ("rho", "warped")


def grid_warp(args, sampling, model_dir):
    """The TimeWarp that --grid warped spaces the levels by (None for --grid rho); UsageError for a run trained
    without --time_warp."""
    if args.grid != "warped":
        return None
    if sampling.get("warp") is None:
        raise UsageError(f"--grid warped: {model_dir} was trained without --time_warp")
    return sampling["warp"]


# Flags that belong to one sampler or schedule, with their defaults; None on the command line means "not given"
SAMPLER_FLAGS = {"stochastic": {"S_churn": 40.0, "S_tmin": 0.0, "S_tmax": math.inf, "S_noise": 1.0}}
SCHEDULE_FLAGS = {"ar": {"skew": 1.0}, "confidence": {"threshold": 0.9, "patience": 0.5}}


def check_flags(p, args):
    """Refuse flags of another sampler or schedule and out-of-range values; fill in the defaults."""
    owners = (("--sampler", args.sampler, SAMPLER_FLAGS), ("--schedule", args.schedule, SCHEDULE_FLAGS))
    for kind, chosen, table in owners:
        for owner, defaults in table.items():
            for name, default in defaults.items():
                if owner != chosen and getattr(args, name) is not None:
                    p.error(f"--{name} applies to {kind} {owner}, not {chosen}")
                if getattr(args, name) is None:
                    setattr(args, name, default)
    if args.steps < 1 or args.num_samples < 1 or args.batch_size < 1:
        p.error("--steps, -n and --batch_size must be at least 1")
    if args.early_exit is not None and args.early_exit < 1:
        p.error(f"--early_exit {args.early_exit}: must be at least 1 (steps without a change)")
    if args.exit_confidence is not None and args.early_exit is None:
        p.error("--exit_confidence applies to --early_exit")
    args.exit_confidence = 0.5 if args.exit_confidence is None else args.exit_confidence
    if not 0 <= args.exit_confidence <= 1:
        p.error(f"--exit_confidence {args.exit_confidence}: a probability in [0, 1]")
    if args.grid == "warped" and args.rho is not None:
        p.error("--rho applies to --grid rho, not warped")
    args.rho = SAMPLING_RHO if args.rho is None else args.rho
    if not 0.1 <= args.rho <= 100:
        p.error(f"--rho {args.rho}: must be in [0.1, 100] (1 is linear in sigma, 7 is EDM's)")
    if not 0 <= args.skew < math.inf:
        p.error(f"--skew {args.skew}: must be 0 (uniform) or more, and finite")
    if args.seed < 0:
        p.error(f"--seed {args.seed}: must be 0 or more")
    if not 0 < args.threshold <= 1:
        p.error(f"--threshold {args.threshold}: a probability in (0, 1]")
    if not 0 <= args.patience < 1:
        p.error(f"--patience {args.patience}: a share of the steps in [0, 1)")
    if not (args.S_churn >= 0 and 0 <= args.S_noise < math.inf and args.S_tmin <= args.S_tmax):
        p.error("--S_churn must be 0 or more, --S_noise finite and 0 or more, --S_tmin at most --S_tmax")
    if args.infill and args.length is not None:
        p.error("--length does not apply to --infill: the template's text and blanks fix the length")


def sample_seed(seed, i):
    """The noise seed of sample i of a run with --seed `seed` (>= 0): 64 bits of numpy's SeedSequence of
    (seed, i), so that no two (seed, i) pairs share their noise in practice."""
    return int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0])


def sample_length(lengths, seed, i):
    """Sample i's length: fixed, or drawn uniformly from the range by a generator of its own (seed, i)."""
    lo, hi = lengths
    return lo if lo == hi else int(np.random.default_rng([seed, i]).integers(lo, hi + 1))


def parse_args(argv=None):
    """sample.py's flags, checked, with the defaults of the chosen sampler and schedule filled in."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-mdir", "--model_dir", required=True, help="folder written by train.py")
    p.add_argument("-n", "--num_samples", type=int, default=8, help="samples (per prompt, when prompts are given)")
    p.add_argument("--steps", type=int, default=200, help="sampler steps (network evaluations for iterative and euler)")
    p.add_argument("--sampler", choices=SAMPLERS, default="iterative",
                   help="iterative (the original's: denoise, then re-noise at the next level), euler, heun (2 "
                        "evaluations a step) or stochastic (EDM's churn, 2 a step)")
    p.add_argument("--schedule", choices=SCHEDULES, default="uniform",
                   help="per-token schedule: uniform (one grid), ar (left to right), confidence (adaptive)")
    p.add_argument("--skew", type=float, help="ar: how far earlier positions run ahead (0: uniform; default 1)")
    p.add_argument("--threshold", type=float, help="confidence: top probability at which a position may advance "
                                                  "(default 0.9)")
    p.add_argument("--patience", type=float, help="confidence: share of the steps an unconfident position may wait "
                                                 "before a deadline moves it (0: uniform; default 0.5)")
    p.add_argument("--S_churn", type=float, help="stochastic: noise added a step, gamma = min(S_churn / steps, "
                                                "sqrt(2) - 1) (default 40)")
    p.add_argument("--S_tmin", type=float, help="stochastic: churn only at sigma >= S_tmin (default 0)")
    p.add_argument("--S_tmax", type=float, help="stochastic: churn only at sigma <= S_tmax (default inf)")
    p.add_argument("--S_noise", type=float, help="stochastic: scale of the churn noise (default 1)")
    p.add_argument("--length", type=parse_length, help="tokens per sample, bos, prompt and suffix included, or a "
                                                       "range A:B drawn per sample (default: training length)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", nargs="+", action="extend", help="texts to continue; their tokens are kept exactly")
    source.add_argument("--prompt_file", help="a file of prompts, one a line (blank lines skipped; - reads stdin)")
    source.add_argument("--infill", nargs="+", action="extend",
                        help="templates with blanks, e.g. 'the [5] of the [3]': [n] is n tokens to generate; the "
                             "text is kept exactly")
    p.add_argument("--suffix", help="text held at the end of every sample, followed by eos ('' holds eos alone, "
                                    "so that samples end cleanly)")
    p.add_argument("--early_exit", type=int, metavar="K", help="stop a sample once its tokens have not changed "
                                                              "for K steps")
    p.add_argument("--exit_confidence", type=float,
                   help="--early_exit counts only steps whose prediction has at least this mean top probability "
                        "(0: every step; default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise; sample i depends on (seed, i) only")
    p.add_argument("--ema", help="use the EMA weights of this rate (e.g. 0.999) instead of the raw weights")
    p.add_argument("--grid", choices=GRIDS, default="rho",
                   help="the sigma grid: rho (EDM's spacing, see --rho) or warped (the time warp fitted in training, "
                        "CDCD: more steps where the loss changes fastest; needs a run trained with --time_warp)")
    p.add_argument("--rho", type=float, help=f"--grid rho: spacing of the sigma grid, 1 linear in sigma, "
                                             f"{SAMPLING_RHO:g} (default) more steps at low noise")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="the network's autocast precision")
    p.add_argument("--fp64", action="store_true", help="sampling maths (x, sigma, softmax, denoiser) in float64 "
                                                       "instead of float32")
    p.add_argument("--jsonl", action="store_true", help="write JSON lines (sample, seed, prompt, text, ids, "
                                                        "steps, evaluations) instead of plain text")
    p.add_argument("--batch_size", type=int, default=64, help="samples drawn at once")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, else cpu), cpu, cuda, ...")
    args = p.parse_args(argv)
    check_flags(p, args)
    return args


def warn_unknown(tokenizer, texts, where):
    """Warn on stderr if the tokenizer has no pieces for some of the held `texts` (they become unk)."""
    if any(tokenizer.unk_id in tokenizer.encode(text, bos=False, eos=False) for text in texts):
        print(f"warning: {where}: the tokenizer has no piece for some of this text; it is held as unk (shown as "
              "\u2047) in the samples", file=sys.stderr)


def build_layouts(args, tokenizer, training_length):
    """Every sample's (ids, held) layout and the prompt or template it came from, -n per prompt, in order.
    Raises UsageError if a prompt or template does not fit (the shortest length of a range)."""
    lengths = args.length or (training_length,) * 2
    if args.suffix is not None:
        warn_unknown(tokenizer, [args.suffix], "--suffix")
    layouts, sources = [], []
    for prompt, pieces, where in read_prompts(args):
        try:
            shortest, held = sample_layout(tokenizer, pieces, lengths[0], args.suffix, where)
        except UsageError as e:
            raise UsageError(f"{e} (the shortest of --length {lengths[0]}:{lengths[1]})" if lengths[0] < lengths[1]
                             else str(e)) from None
        if len(shortest) > MAX_SAMPLE_LENGTH:
            raise UsageError(f"{where}: {len(shortest):,} tokens; samples hold at most {MAX_SAMPLE_LENGTH:,}")
        warn_unknown(tokenizer, [piece for piece in pieces if isinstance(piece, str)], where)
        for _ in range(args.num_samples):
            length = sample_length(lengths, args.seed, len(layouts))
            layouts.append(sample_layout(tokenizer, pieces, length, args.suffix, where))
            sources.append(prompt)
    longest = max(len(ids) for ids, _ in layouts)
    if longest > training_length:
        print(f"warning: samples of up to {longest} tokens are longer than the training rows ({training_length}); "
              "positions past them were never trained", file=sys.stderr)
    return layouts, sources


def main(argv=None):
    """Print samples of the run folder given in `argv`; raises UsageError on bad input."""
    args = parse_args(argv)
    keep_freed_memory()
    if args.suffix is not None:
        checked_text(args.suffix, "--suffix")
    device = resolve_device(args.device)
    model, tokenizer, sampling = load_model(args.model_dir, args.ema, device)
    if model.cfg.causal:
        raise UsageError(f"{args.model_dir}: an autoregressive baseline (train.py --objective ar); eval.py scores "
                         "it and uses it as a judge")
    layouts, sources = build_layouts(args, tokenizer, sampling["sequence_length"])
    step, schedule = build_step(args), build_schedule(args)
    warp = grid_warp(args, sampling, args.model_dir)
    print(f"{len(layouts)} samples, {args.sampler} sampler, {args.schedule} schedule, {args.steps} steps, "
          f"sigma {sampling['sigma_max']} -> {sampling['sigma_min']}", file=sys.stderr)
    evaluations = 0
    for start in range(0, len(layouts), args.batch_size):
        batch = layouts[start:start + args.batch_size]
        ids, cond_mask, segment_ids = sample_rows(batch, tokenizer.pad_id)
        seeds = [sample_seed(args.seed, i) for i in range(start, start + len(batch))]
        out, evals, steps_taken = generate(
            model, step, schedule, ids.to(device), cond_mask.to(device), seeds, args.steps, sampling["sigma_min"],
            sampling["sigma_max"], args.rho, None if segment_ids is None else segment_ids.to(device), args.early_exit,
            args.exit_confidence, args.precision, torch.float64 if args.fp64 else torch.float32, warp=warp)
        evaluations += int(evals.sum())
        for b, (row, (layout, held)) in enumerate(zip(out.tolist(), batch)):
            row, i = row[:len(layout)], start + b
            text = tokenizer.decode_sample(row, held)
            if args.jsonl:
                text = json.dumps({"sample": i, "seed": args.seed, "prompt": sources[i], "text": text, "ids": row,
                                   "steps": int(steps_taken[b]), "evaluations": int(evals[b])}, ensure_ascii=False)
            print(text, flush=True)
    print(f"mean network evaluations per sample: {evaluations / len(layouts):.1f}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        die(str(e))
    except BrokenPipeError:  # the reader (head, a closed pager) left; no traceback
        sys.stderr.close()
        os._exit(0)
    except KeyboardInterrupt:  # samples already printed are complete lines
        sys.exit(130)
