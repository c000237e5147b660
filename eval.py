"""Evaluate a trained run on held-out lines: its negative log-likelihood (nats per token and bits per character; an
upper bound for a continuous or masked diffusion run, exact for the autoregressive baseline), a continuous run's
cross-entropy and accuracy at a grid of noise levels, how much less likely the lines are with their words shuffled
(the shuffle gap), and, with --samples, the quality of its samples, scored by an autoregressive judge (--judge, a run
of train.py --objective ar), and their likelihood under the run itself; with --frontier, gen-PPL against entropy over
temperatures (or top-p) for this run and others, under one judge.

    python eval.py -mdir out --valid valid.txt [--ema RATE] [--judge ar_out] [--samples 64] [--json]
    python eval.py -mdir out --valid valid.txt --judge ar_out --sweep steps=16,32,64 --sweep schedule=uniform,ar
    python eval.py -mdir out --valid valid.txt --judge judge_out --frontier temperature=0.7,0.8,0.9,1 --compare out-mdlm

Each line is scored as its own sequence, bos held, its tokens and eos free; lines longer than the training rows
cannot be, and are left out with a warning that gives their share. Progress goes to stderr, the figures to stdout;
curves are drawn to PNGs when matplotlib is installed. docs/evaluation.md explains every figure.
"""
import argparse
import itertools
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from checkpoint import load_model
from corpus import read_lines
from diffusion import SAMPLERS, SCHEDULES, denoiser_logits, rho_schedule
from objectives import objective_name, run_objective
from sampling import (GRIDS, beyond_training, check_objective_flags, draw, given_flags, length_flag, parse_length,
                      reads_flag, sample_lengths, sampler_settings, setting_defaults, unconditional_layouts)
from scoring import (Judge, at_entropy, line_batches, line_estimates, line_seeds, paired_difference, perplexities,
                     pooled_entropy, sample_metrics, shuffle_gap, totals, word_metrics)
from utils import (PRECISION_CHOICES, ArgumentParser, UsageError, keep_freed_memory, resolve_device, run_command,
                   seed_all, warn_if_emulated)


def progress_bar(total, desc, args):
    """A tqdm bar on stderr (off with --no-progress)."""
    return tqdm(total=total, desc=desc, unit="line", file=sys.stderr, disable=not args.progress, dynamic_ncols=True)


def line_estimates_of(model, objective, lines, args, device, desc=None):
    """The run's NLL of each line (scoring.line_estimates: the baseline's exact NLL, a diffusion run's bound with
    args.draws draws a line, seeded by args.seed and the line's place, scoring.line_seeds), with a progress bar."""
    with progress_bar(len(lines), desc or ("bound" if objective.name != "ar" else "NLL"), args) as bar:
        return line_estimates(model, objective, lines, args.batch_size, args.pad_id, device, args.draws,
                              line_seeds(args.seed, range(len(lines))), bar)


def likelihood(model, objective, lines, args, device, estimates=None):
    """The run's NLL of the lines (line_estimates_of, or its `estimates` where given), totalled: nats per token
    (`nll_nats_per_token`; also under `nll_bound_nats_per_token` for a bound), bits per character, the standard error
    of the Monte Carlo estimate in nats per token (`nll_stderr`, 0 where exact; also `bound_stderr` for a bound), the
    terms of the sum per token (`nll_terms`; `bound_terms` for a bound) and the counts."""
    if estimates is None:
        estimates = line_estimates_of(model, objective, lines, args, device)
    summed = totals(estimates)
    tokens, variance, chars = summed.pop("tokens"), summed.pop("variance"), sum(c for _, c in lines)
    nats = sum(summed.values())
    result = {"nll_nats_per_token": nats / tokens, "bits_per_char": nats / chars / math.log(2),
              "nll_stderr": math.sqrt(variance) / tokens, "nll_terms": {k: v / tokens for k, v in summed.items()},
              "tokens": int(tokens), "characters": chars}
    if objective.name != "ar":  # the names a bound's figures have always had
        result.update(nll_bound_nats_per_token=result["nll_nats_per_token"], bound_stderr=result["nll_stderr"],
                      bound_terms=result["nll_terms"])
    return result


@torch.no_grad()
def ce_by_sigma(model, lines, sigmas, args, device, generator):
    """Cross-entropy (nats) and accuracy of the free tokens with every one at the same sigma, for each sigma."""
    curve = []
    with progress_bar(len(lines) * len(sigmas), "loss by sigma", args) as bar:
        for sigma in sigmas:
            ce = correct = count = 0.0
            for ids, cond_mask, segment_ids in line_batches(lines, args.batch_size, args.pad_id, device):
                free = ~cond_mask
                level = torch.where(free, sigma, 0.0)  # (B, L)
                noise = torch.randn(*ids.shape, model.cfg.embedding_dim, generator=generator).to(device)
                logits = denoiser_logits(model, model.embed(ids) + level[..., None] * noise, level, segment_ids)
                nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none")
                ce += float((nll.view(ids.shape) * free).sum())
                correct += float(((logits.argmax(-1) == ids) & free).sum())
                count += float(free.sum())
                bar.update(len(ids))
            curve.append({"sigma": round(float(sigma), 4), "ce": ce / count, "accuracy": correct / count})
    return curve


def line_nll(model, objective, lines, args, device):
    """The run's negative log-likelihood of `lines` ((ids, characters) pairs), nats per token, and its standard
    error (likelihood: exact for the baseline, error 0; else the bound with args.draws draws a line seeded by
    args.seed, and its Monte Carlo error)."""
    result = likelihood(model, objective, lines, args, device)
    return result["nll_nats_per_token"], result["nll_stderr"]


def order_figures(model, objective, lines, tokenizer, args, device):
    """Word-order sensitivity of the first --shuffle_lines lines (scoring.shuffle_gap, --draws draws a line for a
    bound, --seed): the shuffle gap in nats per token with its standard error, both NLLs, the lines scored and the
    seconds it took; {} with --shuffle_lines 0."""
    started = time.perf_counter()
    if not args.shuffle_lines:
        return {}
    part = lines[:args.shuffle_lines]
    with progress_bar(2 * len(part), "shuffle gap", args) as bar:
        result = shuffle_gap(model, objective, part, tokenizer, args.length_limit, args.draws, args.seed,
                             args.batch_size, args.pad_id, device, bar)
    return {**result, "shuffle_seconds": round(time.perf_counter() - started, 1)} if result else {}


def judge_figures(judge, sequences, texts, args, device):
    """The judge's perplexity of the sequences per token of its tokenizer (eos included) and per word:
    perplexities() of judge.nll."""
    return perplexities(*judge.nll(sequences, texts, args.batch_size, device), texts)


def draw_samples(model, tokenizer, sampling, settings, lengths, args, device):
    """args.samples unconditional samples drawn with `settings` (a SamplerSettings), sample i of length
    sampling.sample_length(lengths, args.seed, i): (each as bos + its tokens up to and including its first eos, less
    pads and bos, which its text leaves out, so that the judge and the own NLL score the text shown; mean network
    evaluations per sample)."""
    layouts = unconditional_layouts(tokenizer, lengths, args.samples, args.seed)
    grid = settings.sigma_grid(sampling, args.model_dir) if objective_name(model.cfg) == "diffusion" else None
    sequences, evaluations = [], 0
    for _, row, _, evals in draw(model, layouts, settings, grid, args.seed, args.batch_size, tokenizer.pad_id,
                                 device, args.progress, tokenizer.eos_id):
        end = row.index(tokenizer.eos_id) + 1 if tokenizer.eos_id in row else len(row)
        sequences.append(row[:1] + [t for t in row[1:end] if t not in (tokenizer.pad_id, tokenizer.bos_id)])
        evaluations += evals
    return sequences, evaluations / args.samples


def score_samples(sequences, tokenizer, judge, args, device):
    """sample_metrics of the sequences' text tokens, word_metrics of their text, and their generative perplexity under
    the judge (exp of its total NLL over its total tokens, eos included, and over their words) when there is one."""
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    texts = [tokenizer.decode(ids) for ids in sequences]
    tokens = [[t for t in ids if t not in special] for ids in sequences]
    result = {**sample_metrics(tokens), **word_metrics(texts)}
    if judge is not None and not any(tokens):
        print(f"warning: all {len(tokens)} samples are empty: their gen-PPL is the judge's on the line end alone and "
              "means nothing; give longer --length", file=sys.stderr)
    if judge is not None:
        result.update(judge_figures(judge, sequences, texts, args, device))
    return result


def pyplot():
    """matplotlib.pyplot drawing to files (Agg), or None where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(plt, fig, path):
    """Write `fig` to `path`; False, with a warning naming the path, where it cannot be written (the figures are
    still reported)."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # a --plot_dir not made yet
        fig.savefig(path, dpi=120)
        return True
    except OSError as e:
        print(f"warning: {path}: cannot write the plot ({e.strerror or e}); use --plot_dir", file=sys.stderr)
        return False
    finally:
        plt.close(fig)


def plot_curve(curve, path, title):
    """Draw cross-entropy and accuracy against sigma to `path` under `title`, the legend below the axes; returns
    False without matplotlib or where the file cannot be written."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    sigmas = [point["sigma"] for point in curve]
    ax.plot(sigmas, [point["ce"] for point in curve], marker="o", label="cross-entropy (nats)")
    ax.set_xscale("log")
    ax.set_xlabel("sigma")
    ax.set_ylabel("cross-entropy (nats)")
    right = ax.twinx()
    right.plot(sigmas, [point["accuracy"] for point in curve], marker="s", color="tab:orange", label="accuracy")
    right.set_ylabel("accuracy")
    ax.set_title(title, fontsize="medium")
    fig.legend(loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room below the axes for the legend
    return save_figure(plt, fig, path)


def plot_sweep(rows, path):
    """Generative perplexity (or, without a judge, entropy) against network evaluations, one labelled point a
    setting; returns False without matplotlib or where the file cannot be written."""
    plt = pyplot()
    if plt is None:
        return False
    key = "gen_ppl" if "gen_ppl" in rows[0] else "entropy"
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        ax.scatter(row["evaluations"], row[key])
        label = setting_label(row).replace(" grid", "").replace("rho, ", "")
        ax.annotate(label, (row["evaluations"], row[key]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per sample")
    ax.set_ylabel("generative perplexity (judge)" if key == "gen_ppl" else "unigram entropy (nats)")
    fig.tight_layout()
    return save_figure(plt, fig, path)


SWEEP_KEYS = ("steps", "schedule", "sampler", "grid", "temperature", "clamp", "length", "top_p")
FRONTIER_KEYS = ("temperature", "top_p")
FRONTIER_FEWEST = 200  # text tokens a frontier point should hold, below which eval.py warns


def parse_sweep(text):
    """--sweep KEY=V1,V2,...: (key, [values]) for a key of SWEEP_KEYS, each value checked."""
    key, _, values = text.partition("=")
    if key not in SWEEP_KEYS or not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=V1,V2 with KEY one of {', '.join(SWEEP_KEYS)}")
    allowed = {"schedule": SCHEDULES, "sampler": SAMPLERS, "grid": GRIDS}.get(key)
    values = values.split(",")
    for value in values:
        if key == "steps" and not (value.isdigit() and int(value) >= 1):
            raise argparse.ArgumentTypeError(f"{text!r}: steps are whole numbers of at least 1, not {value!r}")
        if key in ("temperature", "clamp", "top_p") and not is_number(value):
            raise argparse.ArgumentTypeError(f"{text!r}: {key} takes numbers, not {value!r}")
        if allowed is not None and value not in allowed:
            raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not one of {', '.join(allowed)}")
        if key == "length":
            try:
                parse_length(value)
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"{text!r}: length {e}") from None
    convert = {"steps": int, "temperature": float, "clamp": float, "length": parse_length, "top_p": float}.get(key, str)
    return key, [convert(v) for v in values]


def parse_frontier(text):
    """--frontier KEY=V1,V2,...: (key, [values]) for KEY temperature or top_p, at least two values."""
    key, values = parse_sweep(text)
    if key not in FRONTIER_KEYS:
        raise argparse.ArgumentTypeError(f"{text!r}: a frontier runs over {' or '.join(FRONTIER_KEYS)}")
    if len(set(values)) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: a frontier needs at least two values (a curve, not a point)")
    return key, sorted(set(values))


def is_number(text):
    """Whether `text` reads as a finite float."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def build_parser():
    """eval.py's command line."""
    p = ArgumentParser(prog="eval.py", description=__doc__)
    p.add_argument("-mdir", "--model_dir", required=True, help="folder written by train.py")
    p.add_argument("--valid", required=True, help="held-out lines, one example a line")
    p.add_argument("--ema", help="use the EMA weights of this rate (e.g. 0.999) instead of the raw weights")
    p.add_argument("--draws", type=int, default=16, help="Monte Carlo draws per line for a bound (of sigma; "
                   "for a masked run, of how many tokens are masked)")
    p.add_argument("--max_lines", type=int, default=2000, help="lines scored from --valid (0: all)")
    p.add_argument("--sigmas", type=int, default=10, help="points of the cross-entropy curve, sigma_min to "
                                                          "sigma_max spaced by rho 7 (0: no curve)")
    p.add_argument("--judge", help="run folder of an autoregressive model (train.py --objective ar) that scores "
                                   "samples and valid lines, with its raw weights; with another tokenizer than the "
                                   "run's it scores their texts encoded by its own")
    p.add_argument("--shuffle_lines", type=int, default=256,
                   help="valid lines scored again with their words shuffled, for the shuffle gap (0: none)")
    p.add_argument("--samples", type=int,
                   help="unconditional samples to score (with --sweep or --frontier: per setting; default 0, 64 with "
                        "--sweep or --frontier)")
    p.add_argument("--length", type=parse_length, help="tokens per sample, as in sample.py: data (drawn from the "
                                                       "training lines' lengths; the default where the run keeps "
                                                       "them), N, or a range A:B (default for earlier runs: the "
                                                       "training rows)")
    p.add_argument("--sampler", choices=SAMPLERS, default="iterative", help="sampler of the samples, as in sample.py")
    p.add_argument("--steps", type=int, help="sampler steps of the samples (default 200)")
    p.add_argument("--schedule", choices=SCHEDULES, default="uniform",
                   help="per-token schedule of the samples, as in sample.py")
    p.add_argument("--grid", choices=GRIDS, default="rho",
                   help="sigma grid of the samples, as in sample.py (warped: the run's time warp)")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature of the samples, as in sample.py (score "
                                                                  "temperature; the softmax's for a masked run or the baseline)")
    p.add_argument("--clamp", type=float, default=0.0, help="clamping noise level of the samples, as in sample.py")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus of a masked or autoregressive run's "
                                                            "samples, as in sample.py")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                   help="the network's autocast precision while sampling, as in sample.py (the bound stays fp32)")
    p.add_argument("--sweep", type=parse_sweep, action="append", metavar="KEY=V1,V2",
                   help="score samples at every combination of these values (keys: steps, schedule, sampler, grid, "
                        "temperature, clamp, length, top_p; repeat the flag; each objective takes those its sampler reads)")
    p.add_argument("--frontier", type=parse_frontier, metavar="KEY=V1,V2",
                   help="gen-PPL against unigram entropy at each value of temperature or top_p (at least two), for "
                        "this run and every --compare run, under --judge, to frontier.png and the JSON, with gen-PPL "
                        "interpolated at the real lines' entropy; --samples samples a point (default 64; the single --samples "
                        "block is then drawn only where --samples is given)")
    p.add_argument("--compare", nargs="+", default=[], metavar="MODEL_DIR",
                   help="other runs (any objective, the same --ema) drawn and judged alike on the --frontier")
    p.add_argument("--against", nargs="+", default=[], metavar="MODEL_DIR",
                   help="other runs of the same tokenizer (any objective, the same --ema) scored on the same lines with "
                        "the same draws: each one's NLL and this run's minus it, with the error of the paired "
                        "differences, far below the two errors combined (for comparing two runs of one objective)")
    p.add_argument("--plot_dir", help="folder for ce_by_sigma.png, sweep.png and frontier.png, made if missing "
                                       "(default: MODEL_DIR)")
    p.add_argument("--batch_size", type=int, default=64, help="lines scored, or samples drawn, at once")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws and of the samples")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, else cpu), cpu, cuda, ...")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show progress bars on stderr")
    return p


def parse_args(argv=None):
    """eval.py's flags, checked by themselves, before any run loads (a frontier without a judge, a --plot_dir that is
    a file); exits with a one-line error."""
    p = build_parser()
    args = p.parse_args(argv)
    args.steps_given, args.steps = args.steps is not None, 200 if args.steps is None else args.steps
    at_least = {"draws": 2, "sigmas": 0, "batch_size": 1, "steps": 1, "max_lines": 0, "samples": 0, "seed": 0,
                "shuffle_lines": 0}
    for name, low in at_least.items():
        if getattr(args, name) is not None and getattr(args, name) < low:
            p.error(f"--{name} {getattr(args, name)}: must be at least {low}")
    if args.sigmas == 1:
        p.error("--sigmas 1: a curve needs at least 2 points (0: none)")
    keys = [key for key, _ in args.sweep or []]
    if len(set(keys)) < len(keys):
        p.error("--sweep: give each key once, with all its values (steps=16,32)")
    if args.samples == 0 and (args.sweep or args.frontier):
        p.error("--samples 0: --sweep and --frontier score samples at each setting (64 unless given)")
    args.samples_given = bool(args.samples)
    if not args.samples:
        args.samples = 64 if args.sweep or args.frontier else 0
    if args.compare and not args.frontier:
        p.error("--compare: the runs compared on a --frontier; give --frontier temperature=... too")
    if args.frontier and args.judge is None:  # before any run loads
        p.error("--frontier: needs --judge, the autoregressive run that scores every point")
    if args.plot_dir and os.path.exists(args.plot_dir) and not os.path.isdir(args.plot_dir):
        p.error(f"--plot_dir {args.plot_dir}: not a folder (a missing one is made)")
    return args


def settings_of(args, sampling, **override):
    """The sample settings (sampler, steps, schedule, grid, temperature, clamp, precision, top_p, length), with
    `override`
    (a sweep's values), the SamplerSettings they give and the lengths the samples draw from (sampling.sample_lengths,
    for the checkpoint's `sampling` settings); UsageError for a value out of range. The length is recorded as given,
    or as "data" or the training length where the default chose it."""
    chosen = {"sampler": args.sampler, "steps": args.steps, "schedule": args.schedule, "grid": args.grid,
              "temperature": args.temperature, "clamp": args.clamp, "precision": args.precision,
              "top_p": args.top_p, "length": args.length, **override}
    length = chosen.pop("length")
    try:
        settings, lengths = sampler_settings(**chosen), sample_lengths(length, sampling, args.model_dir,
                                                                       args.objective == "ar")
    except UsageError as e:
        raise UsageError(f"{e} (a sample setting of eval.py)") from None
    chosen["length"] = "data" if isinstance(lengths, list) else \
        str(lengths[0]) if lengths[0] == lengths[1] else f"{lengths[0]}:{lengths[1]}"
    return chosen, settings, lengths


def load_judge(path, tokenizer, length, device):
    """The Judge of the causal run in `path`; UsageError for a diffusion run. Warns when it was trained on rows
    shorter than `length`, the evaluated run's (it would score positions it never saw)."""
    try:
        judge, judge_tokenizer, judge_sampling = load_model(path, device=device)
    except UsageError as e:
        raise UsageError(f"--judge {path}: {e}") from None
    if not judge.cfg.causal:
        raise UsageError(f"--judge {path}: not an autoregressive run (train it with --objective ar)")
    shared = judge_tokenizer.model_proto == tokenizer.model_proto
    if not shared:
        print(f"note: --judge {path} has another tokenizer than the evaluated run's: it scores the texts encoded by "
              "its own, so compare its figures per word and per character", file=sys.stderr)
    if judge_sampling["sequence_length"] < length:
        print(f"warning: --judge {path} was trained on rows of {judge_sampling['sequence_length']} tokens, shorter "
              f"than the {length} of the evaluated run: its scores of later positions mean little", file=sys.stderr)
    return Judge(judge, judge_tokenizer, shared)


def check_request(args, objective, sampling, compared=()):
    """Refuse, before any work, what the run cannot do: sample flags (and sweep or frontier keys) its objective does not
    read (sampling.check_objective_flags; a sample flag that a --compare run of the frontier reads passes, each run
    reading those its sampler takes: `compared` are their objectives' names), a warped grid without a warp, samples
    longer than the training rows, a sample flag's, --sweep's or --frontier's value out of range."""
    swept = [key for key, _ in (args.sweep or []) + ([args.frontier] if args.frontier else [])]
    given = given_flags({name: getattr(args, name, None) for name in setting_defaults()},
                        args.steps if args.steps_given else None)
    for flag in given:
        if not any(reads_flag(name, flag) for name in compared):
            check_objective_flags(objective.name, [flag], args.model_dir)
    check_objective_flags(objective.name, [f"--{key} (in --sweep or --frontier)" for key in swept], args.model_dir)
    if args.samples or args.sweep or args.frontier:
        settings_of(args, sampling)  # the sample flags' own values (a bad --temperature), before the bound
    for key, values in (args.sweep or []) + ([args.frontier] if args.frontier else []):
        for value in values:  # each value's range, now rather than after the bound (a sweep's keys are independent)
            settings_of(args, sampling, **{key: value})
    grids = {args.grid, *dict(args.sweep or []).get("grid", [])}
    if "warped" in grids and sampling["warp"] is None:
        raise UsageError(f"--grid warped: {args.model_dir} was trained without --time_warp")
    for length in [args.length, *dict(args.sweep or []).get("length", [])] if args.samples or args.sweep else []:
        if isinstance(length, tuple) and length[1] > sampling["sequence_length"]:
            raise beyond_training(length_flag(length), length[1], sampling["sequence_length"], args.model_dir)


def evaluate(args, device):
    """Every figure eval.py reports, as one dict."""
    model, tokenizer, sampling = load_model(args.model_dir, args.ema, device)
    objective = run_objective(model, sampling)
    args.pad_id, args.length_limit, args.objective = tokenizer.pad_id, sampling["sequence_length"], objective.name
    lines, skipped = read_lines(args.valid, tokenizer, sampling["sequence_length"], args.max_lines or -1)
    compared = load_compared(args, tokenizer, device) if args.frontier else []
    check_request(args, objective, sampling, [run_objective(run[1], run[3]).name for run in compared])
    judge = None if args.judge is None else load_judge(args.judge, tokenizer, sampling["sequence_length"], device)
    against = [(model_dir, load_against(model_dir, args, tokenizer, sampling, device)) for model_dir in args.against]
    judged = {os.path.realpath(d) for d in [args.model_dir] + args.compare}
    if args.judge is not None and os.path.realpath(args.judge) in judged:
        print(f"warning: --judge {args.judge} is also a judged run: it scores its own beliefs, which favours it; judge "
              "with a run none of the compared runs is", file=sys.stderr)
    if args.samples or args.sweep or args.frontier:  # --precision is sampling's (the bound stays fp32)
        warn_if_emulated(args.precision, device)
    share = skipped / (skipped + len(lines))
    if skipped:
        print(f"warning: {skipped:,} of {skipped + len(lines):,} lines read from {args.valid} ({percent(share)}) are "
              f"longer than the {sampling['sequence_length']}-token rows and are not scored", file=sys.stderr)
    result = {"model_dir": args.model_dir, "objective": objective.name, "valid_path": args.valid, "ema": args.ema,
              "lines": len(lines), "skipped_lines": skipped, "skipped_share": share}
    started = time.perf_counter()
    estimates = line_estimates_of(model, objective, lines, args, device)
    result.update(likelihood(model, objective, lines, args, device, estimates))
    if objective.name == "ar":  # exact; a bound's perplexity is only bounded (print_table)
        result["perplexity"] = math.exp(result["nll_nats_per_token"])
    else:
        result["draws"] = args.draws
    result["nll_seconds"] = round(time.perf_counter() - started, 1)
    if against:
        result["against"] = [against_figures(estimates, other, lines, args, device) for other in against]
    if objective.name == "diffusion" and args.sigmas:
        result.update(ce_figures(model, lines, sampling, args, device, torch.Generator().manual_seed(args.seed)))
    result.update(order_figures(model, objective, lines, tokenizer, args, device))
    texts = [tokenizer.decode(ids) for ids, _ in lines]
    result["valid"] = {**sample_metrics([ids[1:-1] for ids, _ in lines]), **word_metrics(texts)}
    if judge is not None:
        chars = sum(c for _, c in lines)
        nats, tokens = judge.nll([ids for ids, _ in lines], texts, args.batch_size, device)
        result["judge"] = {"model_dir": args.judge, "nll_nats_per_token": nats / tokens,
                           "perplexity": math.exp(nats / tokens), "bits_per_char": nats / chars / math.log(2)}
        result["valid"].update(perplexities(nats, tokens, texts))
        result["valid_gen_ppl"] = result["valid"]["gen_ppl"]
        result["valid_entropy"] = result["valid"]["entropy"]
        weak_judge_warning(result, args.judge)
    result.update(sample_figures(model, objective, tokenizer, sampling, judge, lines, args, device))
    if args.frontier:
        runs = [(args.model_dir, model, tokenizer, sampling)] + compared
        result["frontier"] = frontier_figures(judge, lines, tokenizer, args, device, runs)
    return result


def weak_judge_warning(result, judge):
    """Warn (one line on stderr, and returned; else None) when the judge scores the valid lines worse than the
    evaluated run's own NLL or bound does, compared in bits per character (tokenizers may differ): a judge that
    knows the text less well than the judged model cannot say much about its samples."""
    own, judged = result["bits_per_char"], result["judge"]["bits_per_char"]
    if judged <= own:
        return None
    warning = (f"warning: --judge {judge} scores the valid lines at {judged:.4f} bits/char, worse than this run's own "
               f"{own:.4f}: its gen-PPL of the samples says little; train a judge at least as long as the runs it "
               "judges (the small preset's baseline: 1,000 steps, about 10 minutes on two cores with bf16, RESULTS.md), "
               "but on a small corpus not so long that it overfits (many passes: try --dropout_prob 0.1)")
    print(warning, file=sys.stderr)
    return warning


def ce_figures(model, lines, sampling, args, device, generator):
    """A continuous diffusion run's cross-entropy by sigma (and that curve's plot)."""
    grid = torch.linspace(0, 1, args.sigmas, dtype=torch.float64)
    sigmas = rho_schedule(grid, sampling["sigma_min"], sampling["sigma_max"], 7.0).flip(0).tolist()
    result = {"ce_by_sigma": ce_by_sigma(model, lines, sigmas, args, device, generator)}
    plot = os.path.join(args.plot_dir or args.model_dir, "ce_by_sigma.png")
    title = f"Loss by noise level: {os.path.basename(os.path.abspath(args.model_dir))}, {len(lines):,} valid lines"
    result["plot"] = plot if plot_curve(result["ce_by_sigma"], plot, title) else None
    return result


def shown_settings(objective, chosen):
    """The sample settings an objective's sampler reads, from settings_of's `chosen`, with a "sampler" name for the
    masked and autoregressive ones (setting_label reads it)."""
    if objective.name == "diffusion":
        return chosen
    kept = ("steps",) * (objective.name == "mdlm") + ("temperature", "top_p", "precision", "length")
    return {"sampler": {"ar": "autoregressive", "mdlm": "masked"}[objective.name], **{k: chosen[k] for k in kept}}


def sample_figures(model, objective, tokenizer, sampling, judge, lines, args, device):
    """With --samples, the scores of samples drawn with the sample flags and their own NLL (self_nll_figures); with
    --sweep, the scores of every combination of its values instead, and their plot."""
    result = {}
    if args.samples_given and not args.sweep:
        chosen, settings, lengths = settings_of(args, sampling)
        started = time.perf_counter()
        sequences, evaluations = draw_samples(model, tokenizer, sampling, settings, lengths, args, device)
        result["samples"] = {**shown_settings(objective, chosen), "count": args.samples, "evaluations": evaluations,
                             **score_samples(sequences, tokenizer, judge, args, device),
                             "seconds": round(time.perf_counter() - started, 1)}
        result.update({k: result["samples"].get(k) for k in ("gen_ppl", "entropy", "distinct_2")})
        result.update(self_nll_figures(model, objective, tokenizer, sequences, lines, args, device))
    if args.sweep:
        keys = [key for key, _ in args.sweep]
        result["sweep"] = []
        for values in itertools.product(*(values for _, values in args.sweep)):
            chosen, settings, lengths = settings_of(args, sampling, **dict(zip(keys, values)))
            sequences, evaluations = draw_samples(model, tokenizer, sampling, settings, lengths, args, device)
            result["sweep"].append({**shown_settings(objective, chosen), "evaluations": evaluations,
                                    **score_samples(sequences, tokenizer, judge, args, device)})
        sweep_plot = os.path.join(args.plot_dir or args.model_dir, "sweep.png")
        result["sweep_plot"] = sweep_plot if plot_sweep(result["sweep"], sweep_plot) else None
    return result


def self_nll_figures(model, objective, tokenizer, sequences, lines, args, device):
    """The run's own NLL (line_nll) of its samples with text (`samples_self_nll`) beside that of the first as many
    valid lines (`samples_valid_nll`), nats per token, with their Monte Carlo errors, the counts and the seconds it
    took. An exact sampler at temperature 1 scores about the model's entropy on its own samples, which may exceed its
    NLL of real lines (the baseline's does); sharper sampling scores lower. docs/evaluation.md reads it."""
    started = time.perf_counter()
    own = [(ids, len(tokenizer.decode(ids)) + 1) for ids in sequences if tokenizer.decode(ids)]
    if not own:
        return {}
    (samples, samples_error), (valid, valid_error) = (line_nll(model, objective, part, args, device)
                                                      for part in (own, lines[:len(own)]))
    return {"samples_self_nll": samples, "samples_self_nll_stderr": samples_error, "samples_valid_nll": valid,
            "samples_valid_nll_stderr": valid_error, "self_nll_samples": len(own),
            "self_nll_valid_lines": len(lines[:len(own)]),
            "self_nll_seconds": round(time.perf_counter() - started, 1)}


def load_other(model_dir, flag, args, tokenizer, device, why="runs scored on the same lines share one tokenizer"):
    """Another run named by `flag` (--against, --compare), loaded with --ema: (model, its tokenizer, sampling);
    UsageError naming the folder for one that cannot be loaded or has another tokenizer than the evaluated run (`why`
    says why that matters)."""
    try:
        model, run_tokenizer, sampling = load_model(model_dir, args.ema, device)
    except UsageError as e:
        raise UsageError(f"{flag} {model_dir}: {e}") from None
    if run_tokenizer.model_proto != tokenizer.model_proto:
        raise UsageError(f"{flag} {model_dir}: another tokenizer than {args.model_dir}'s; {why}")
    return model, run_tokenizer, sampling


def load_against(model_dir, args, tokenizer, sampling, device):
    """An --against run (load_other); UsageError for the evaluated run itself, a warning for one trained on rows
    shorter than the evaluated run's (`sampling`), as for a judge: it would score positions it never saw."""
    if os.path.realpath(model_dir) == os.path.realpath(args.model_dir):
        raise UsageError(f"--against {model_dir}: the evaluated run itself (its difference is 0)")
    other = load_other(model_dir, "--against", args, tokenizer, device)
    if other[2]["sequence_length"] < sampling["sequence_length"]:
        print(f"warning: --against {model_dir} was trained on rows of {other[2]['sequence_length']} tokens, shorter "
              f"than the {sampling['sequence_length']} of the evaluated run: its scores of later positions mean "
              "little", file=sys.stderr)
    return other


def against_figures(estimates, other, lines, args, device):
    """--against: the other run's NLL of the same lines with the same draws (line_estimates_of), and this run's
    (its `estimates`) minus it with the error of the paired differences (scoring.paired_difference)."""
    model_dir, (model, _, sampling) = other
    objective, started = run_objective(model, sampling), time.perf_counter()
    theirs = line_estimates_of(model, objective, lines, args, device, f"against {os.path.basename(model_dir)}")
    difference, error = paired_difference(estimates, theirs)
    return {"model_dir": model_dir, "objective": objective.name,
            "nll_nats_per_token": likelihood(model, objective, lines, args, device, theirs)["nll_nats_per_token"],
            "difference": difference, "difference_stderr": error, "seconds": round(time.perf_counter() - started, 1)}


def load_compared(args, tokenizer, device):
    """The --compare runs, loaded and checked before any work: (model_dir, model, tokenizer, sampling) each. Raises
    UsageError naming the folder for one that cannot be loaded (or lacks --ema), has another tokenizer than the
    evaluated run (the frontier's entropies count tokens), takes no --frontier key (top_p of a continuous run), or
    cannot draw samples of --length or on --grid warped, or is the evaluated run or named twice."""
    compared, seen = [], {os.path.realpath(args.model_dir)}
    for model_dir in args.compare:
        if os.path.realpath(model_dir) in seen:
            raise UsageError(f"--compare {model_dir}: already on the frontier (the evaluated run or named twice)")
        seen.add(os.path.realpath(model_dir))
        model, run_tokenizer, sampling = load_other(model_dir, "--compare", args, tokenizer, device,
                                                    "a frontier's entropies count tokens, so its runs share one tokenizer")
        objective = run_objective(model, sampling)
        check_objective_flags(objective.name, [f"--{args.frontier[0]} (in --frontier)"], model_dir)
        if isinstance(args.length, tuple) and args.length[1] > sampling["sequence_length"]:
            raise beyond_training(length_flag(args.length), args.length[1], sampling["sequence_length"], model_dir)
        if objective.name == "diffusion" and args.grid == "warped" and sampling["warp"] is None:
            raise UsageError(f"--grid warped: --compare {model_dir} was trained without --time_warp")
        compared.append((model_dir, model, run_tokenizer, sampling))
    return compared


def frontier_figures(judge, lines, tokenizer, args, device, runs):
    """--frontier: for each of `runs` ((model_dir, model, tokenizer, sampling): the evaluated run, then the --compare
    runs, load_compared), args.samples samples at each value of the frontier's key (the other sample flags as given),
    their gen-PPL under `judge` and the unigram entropy of their tokens (pooled_entropy at one token count for every
    point and the real lines: the fewest any point has); each run's gen-PPL at the real lines' entropy (at_entropy),
    and the plot frontier.png."""
    key, values = args.frontier
    started = time.perf_counter()
    real_tokens = [ids[1:-1] for ids, _ in lines]
    results, pooled = [], []
    for model_dir, model, run_tokenizer, sampling in runs:
        objective = run_objective(model, sampling)
        run_args = argparse.Namespace(**{**vars(args), "model_dir": model_dir, "objective": objective.name})
        special = {run_tokenizer.bos_id, run_tokenizer.eos_id, run_tokenizer.pad_id}
        points = []
        for value in values:
            point_started = time.perf_counter()
            _, settings, lengths = settings_of(run_args, sampling, **{key: value})
            sequences, evaluations = draw_samples(model, run_tokenizer, sampling, settings, lengths, run_args, device)
            texts = [run_tokenizer.decode(ids) for ids in sequences]
            tokens = [[t for t in ids if t not in special] for ids in sequences]
            pooled.append(tokens)
            points.append({"value": value, **judge_figures(judge, sequences, texts, args, device),
                           "evaluations": evaluations, "tokens": sum(map(len, tokens)),
                           "seconds": round(time.perf_counter() - point_started, 1)})
        results.append({"model_dir": model_dir, "objective": objective.name, "points": points})
    count = min([sum(map(len, tokens)) for tokens in pooled] + [sum(map(len, real_tokens))])
    if count < FRONTIER_FEWEST:
        print(f"warning: --frontier: a point holds only {count} text tokens, so every entropy is measured on {count}: "
              "the frontier means little; give more --samples or settings that make longer samples", file=sys.stderr)
    for run in results:
        for point in run["points"]:
            point["entropy"] = pooled_entropy(pooled.pop(0), count)
    texts = [tokenizer.decode(ids) for ids, _ in lines]
    real = {"gen_ppl": perplexities(*judge.nll([ids for ids, _ in lines], texts, args.batch_size, device),
                                    texts)["gen_ppl"], "entropy": pooled_entropy(real_tokens, count)}
    for run in results:  # none on a count of 0: every entropy is 0 then, and the curve says nothing
        run["gen_ppl_at_real_entropy"] = at_entropy(run["points"], real["entropy"]) if count else None
    plot = os.path.join(args.plot_dir or args.model_dir, "frontier.png")
    frontier = {"key": key, "values": values, "samples": args.samples, "tokens": count, "judge": args.judge,
                "real": real, "runs": results}
    frontier["plot"] = plot if plot_frontier(frontier, plot) else None
    frontier["seconds"] = round(time.perf_counter() - started, 1)
    return frontier


def plot_frontier(frontier, path):
    """gen-PPL (log scale) against unigram entropy, one labelled curve a run through its points (each marked with its
    value), the real lines as a star; returns False without matplotlib or where the file cannot be written."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for run in frontier["runs"]:
        points = sorted(run["points"], key=lambda point: point["entropy"])
        label = f"{os.path.basename(os.path.abspath(run['model_dir']))} ({run['objective']})"
        ax.plot([p["entropy"] for p in points], [p["gen_ppl"] for p in points], marker="o", label=label)
        for p in points:
            ax.annotate(f"{p['value']:g}", (p["entropy"], p["gen_ppl"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    real = frontier["real"]
    ax.scatter([real["entropy"]], [real["gen_ppl"]], marker="*", s=160, color="black", zorder=3, label="real lines")
    ax.set_yscale("log")
    ax.set_xlabel(f"unigram entropy of the samples' tokens (nats, first {frontier['tokens']:,} tokens)")
    ax.set_ylabel("generative perplexity under the judge")
    ax.set_title(f"Frontier over {frontier['key']} (judge: {os.path.basename(os.path.abspath(frontier['judge']))})",
                 fontsize="medium")
    fig.legend(loc="lower center", ncol=min(3, len(frontier["runs"]) + 1), frameon=False, fontsize="small")
    fig.tight_layout(rect=(0, 0.1, 1, 1))  # room below the axes for the legend
    return save_figure(plt, fig, path)


def percent(share):
    """A share as a percentage for the table, with at least one significant digit ("0.05%", "33.3%")."""
    return f"{share:.1%}" if share >= 0.001 else f"{100 * share:.2g}%"


def print_table(result):
    """The figures of `result` as a few readable lines."""
    skipped = f"; {result['skipped_lines']:,} longer than the rows ({percent(result['skipped_share'])}) not scored" \
        if result["skipped_lines"] else ""
    print(f"{result['lines']:,} valid lines scored{skipped}")
    if result["objective"] == "ar":
        print(f"autoregressive: NLL {result['nll_nats_per_token']:.4f} nats/token, perplexity "
              f"{result['perplexity']:.2f}, {result['bits_per_char']:.4f} bits/char")
    elif result["objective"] == "mdlm":
        print(f"masked diffusion NLL bound (ELBO): {result['nll_nats_per_token']:.4f} +- {result['nll_stderr']:.4f} "
              f"nats/token, perplexity <= {math.exp(result['nll_nats_per_token']):.2f}, "
              f"{result['bits_per_char']:.4f} bits/char")
    else:
        terms = result["bound_terms"]
        print(f"diffusion NLL bound: {result['nll_bound_nats_per_token']:.4f} +- {result['bound_stderr']:.4f} "
              f"nats/token (reconstruction {terms['reconstruction']:.4f}, diffusion {terms['diffusion']:.4f}, prior "
              f"{terms['prior']:.4f}), perplexity <= {math.exp(result['nll_bound_nats_per_token']):.2f}, "
              f"{result['bits_per_char']:.4f} bits/char")
        for point in result.get("ce_by_sigma", []):
            print(f"  sigma {point['sigma']:>8.3f}  CE {point['ce']:.3f} nats  accuracy {point['accuracy']:.3f}")
    for other in result.get("against", []):
        print(f"against {other['model_dir']} ({other['objective']}): its NLL {other['nll_nats_per_token']:.4f} "
              f"nats/token; this run's minus its {other['difference']:+.4f} +- {other['difference_stderr']:.4f} (the "
              f"same lines and draws)")
    if "judge" in result:
        judge = result["judge"]
        print(f"judge {judge['model_dir']}: NLL {judge['nll_nats_per_token']:.4f} nats/token, perplexity "
              f"{judge['perplexity']:.2f}, {judge['bits_per_char']:.4f} bits/char")
    if "shuffle_gap" in result:
        print(f"word order: NLL {result['ordered_nll']:.4f} nats/token on {result['shuffle_lines']:,} lines, "
              f"{result['shuffled_nll']:.4f} with their words shuffled: shuffle gap {result['shuffle_gap']:.4f} +- "
              f"{result['shuffle_gap_stderr']:.4f}")
    print(f"valid lines: {text_figures(result['valid'])}")
    if "samples_self_nll" in result:
        print(f"samples' own NLL: {result['samples_self_nll']:.4f} +- {result['samples_self_nll_stderr']:.4f} "
              f"nats/token, valid lines {result['samples_valid_nll']:.4f} +- {result['samples_valid_nll_stderr']:.4f} "
              f"({result['self_nll_samples']} samples with text, {result['self_nll_valid_lines']} lines)")
    for row in ([result["samples"]] if "samples" in result else []) + result.get("sweep", []):
        print(f"samples ({setting_label(row)}, {row['evaluations']:.1f} evaluations): {text_figures(row)}")
    if "frontier" in result:
        print_frontier(result["frontier"])


def print_frontier(frontier):
    """The frontier's points, a line each, and each run's gen-PPL at the real lines' entropy."""
    real = frontier["real"]
    print(f"frontier of {frontier['key']} ({frontier['tokens']:,} tokens a point): real lines gen-PPL "
          f"{real['gen_ppl']:.2f} at entropy {real['entropy']:.3f}")
    for run in frontier["runs"]:
        at = run["gen_ppl_at_real_entropy"]
        print(f"  {run['model_dir']} ({run['objective']}): gen-PPL at the real entropy "
              + (f"{at:.2f}" if at is not None else "out of its range" if frontier["tokens"] else "none"))
        for point in run["points"]:
            print(f"    {frontier['key']} {point['value']:g}: gen-PPL {point['gen_ppl']:.2f}, entropy "
                  f"{point['entropy']:.3f} ({point['seconds']:.0f} s)")


def setting_label(row):
    """A sample setting in a few words: sampler, schedule, grid, steps, and temperature, clamp and top-p where set
    (an autoregressive run's: its temperature and top-p)."""
    extra = (f", T {row['temperature']:g}" if row.get("temperature", 1.0) != 1.0 else "") + \
        (f", clamp below {row['clamp']:g}" if row.get("clamp") else "") + \
        (f", top-p {row['top_p']:g}" if row.get("top_p", 1.0) != 1.0 else "")
    if row["sampler"] == "autoregressive":
        return f"autoregressive, length {row['length']}{extra}"
    if row["sampler"] == "masked":
        return f"masked, {row['steps']} steps, length {row['length']}{extra}"
    return (f"{row['sampler']}, {row['schedule']}, {row['grid']} grid, {row['steps']} steps, length {row['length']}"
            f"{extra}")


def text_figures(row):
    """The sample figures of one set of texts (samples or valid lines) on one line."""
    ppl = f"gen-PPL {row['gen_ppl']:.2f} ({row['gen_ppl_word']:.1f} per word), " if "gen_ppl" in row else ""
    return (f"{ppl}entropy {row['entropy']:.3f} (words {row['word_entropy']:.3f}), distinct-2 {row['distinct_2']:.3f}, "
            f"rep-4 {row['rep_4']:.3f}, mean length {row['mean_length']:.1f} tokens, {row['mean_words']:.1f} words"
            + (f", {percent(row['empty'])} empty" if row.get("empty") else ""))


def main(argv=None):
    """Print the evaluation of the run in `argv`; raises UsageError on bad input."""
    args = parse_args(argv)
    keep_freed_memory()
    seed_all(args.seed)
    result = evaluate(args, resolve_device(args.device))
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)


if __name__ == "__main__":
    run_command(main)
