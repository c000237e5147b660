"""Evaluate a trained run on held-out lines: an upper bound on the negative log-likelihood (nats per token and
bits per character), the cross-entropy and accuracy at a grid of noise levels, and, with --samples, the quality
of its samples, scored by an autoregressive judge (--judge, a run of train.py --objective ar). An autoregressive
run itself gets its exact perplexity.

    python eval.py -mdir out --valid valid.txt [--ema RATE] [--judge ar_out] [--samples 64] [--json]
    python eval.py -mdir out --valid valid.txt --judge ar_out --sweep steps=16,32,64 --sweep schedule=uniform,ar

Each line is scored as its own sequence, bos held, its tokens and eos free; lines longer than the training rows
are skipped (and counted). Curves are drawn to PNGs when matplotlib is installed.
"""
import itertools
import argparse
import json
import math
import os
import sys

import torch

import sample
from data import decode_line, sample_layout, sample_rows
from diffusion import (SAMPLERS, SCHEDULES, autoregressive_loss, autoregressive_targets, denoiser_logits, generate,
                       nll_bound, rho_schedule)
from sample import load_model
from utils import UsageError, die, keep_freed_memory, resolve_device, seed_all


def read_lines(path, tokenizer, length, max_lines):
    """Held-out lines as (token ids with bos and eos, characters + 1 for the line end), at most `max_lines`,
    and the number skipped for not fitting `length` tokens. Raises UsageError naming path:line."""
    if not os.path.isfile(path):
        raise UsageError(f"--valid {path}: no such file")
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
    if not lines:
        raise UsageError(f"--valid {path}: no non-blank line that fits the training rows of {length} tokens")
    return lines, skipped


def batches(lines, batch_size, pad_id, device):
    """(ids, cond_mask, segment_ids) batches of whole lines, bos held, padding in segment 0."""
    for start in range(0, len(lines), batch_size):
        layouts = [(ids, [True] + [False] * (len(ids) - 1)) for ids, _ in lines[start:start + batch_size]]
        ids, cond_mask, segment_ids = sample_rows(layouts, pad_id)
        yield ids.to(device), cond_mask.to(device), None if segment_ids is None else segment_ids.to(device)


def likelihood_bound(model, lines, sampling, args, device, generator):
    """Totals of nll_bound over the lines: nats per token (and its terms), bits per character, and the
    standard error of the Monte Carlo estimate in nats per token."""
    totals = {"reconstruction": 0.0, "diffusion": 0.0, "prior": 0.0, "variance": 0.0, "tokens": 0.0}
    for ids, cond_mask, segment_ids in batches(lines, args.batch_size, args.pad_id, device):
        terms = nll_bound(model, ids, cond_mask, sampling["sigma_min"], sampling["sigma_max"], args.draws,
                          segment_ids, generator)
        for key in totals:
            totals[key] += float(terms[key].sum())
    nats = totals["reconstruction"] + totals["diffusion"] + totals["prior"]
    tokens, chars = totals["tokens"], sum(c for _, c in lines)
    return {"nll_bound_nats_per_token": nats / tokens, "bits_per_char": nats / chars / math.log(2),
            "bound_stderr": math.sqrt(totals["variance"]) / tokens,
            "bound_terms": {k: totals[k] / tokens for k in ("reconstruction", "diffusion", "prior")},
            "tokens": int(tokens), "characters": chars}


@torch.no_grad()
def ce_by_sigma(model, lines, sigmas, args, device, generator):
    """Cross-entropy (nats) and accuracy of the free tokens with every one at the same sigma, for each sigma."""
    curve = []
    for sigma in sigmas:
        ce = correct = count = 0.0
        for ids, cond_mask, segment_ids in batches(lines, args.batch_size, args.pad_id, device):
            free = ~cond_mask
            level = torch.where(free, sigma, 0.0)  # (B, L)
            noise = torch.randn(*ids.shape, model.cfg.embedding_dim, generator=generator).to(device)
            logits = denoiser_logits(model, model.embed(ids) + level[..., None] * noise, level, segment_ids)
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none")
            ce += float((nll.view(ids.shape) * free).sum())
            correct += float(((logits.argmax(-1) == ids) & free).sum())
            count += float(free.sum())
        curve.append({"sigma": round(float(sigma), 4), "ce": ce / count, "accuracy": correct / count})
    return curve


@torch.no_grad()
def sequence_nll(model, sequences, batch_size, pad_id, device):
    """Exact negative log-likelihood under a causal model of each id list after its first token (bos): total
    nats and the number of tokens scored (eos included where the list has it)."""
    nats = tokens = 0.0
    for start in range(0, len(sequences), batch_size):
        layouts = [(ids, [True] * len(ids)) for ids in sequences[start:start + batch_size]]
        ids, _, segment_ids = sample_rows(layouts, pad_id)
        segment_ids = torch.ones_like(ids) if segment_ids is None else segment_ids
        ids, segment_ids = ids.to(device), segment_ids.to(device)
        targets = autoregressive_targets(segment_ids)
        nats += float((autoregressive_loss(model, ids, segment_ids) * targets).sum())
        tokens += float(targets.sum())
    return nats, tokens


def sample_metrics(samples):
    """Scores of token lists (bos, eos and pads removed): unigram entropy of all their tokens pooled (nats),
    distinct-n for n = 1, 2, 3 (distinct n-grams over all n-grams, pooled), rep-4 (Welleck et al. 2020: a
    sample's share of 4-grams that repeat an earlier one in it, averaged over samples with any) and mean length
    in tokens."""
    counts = {}
    for tokens in samples:
        for t in tokens:
            counts[t] = counts.get(t, 0) + 1
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0
    result = {"entropy": entropy, "mean_length": total / max(len(samples), 1)}
    for n in (1, 2, 3):
        grams = [tuple(tokens[i:i + n]) for tokens in samples for i in range(len(tokens) - n + 1)]
        result[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    reps = [1 - len(set(g)) / len(g) for g in ([tuple(t[i:i + 4]) for i in range(len(t) - 3)] for t in samples) if g]
    result["rep_4"] = sum(reps) / len(reps) if reps else 0.0
    return result


def draw_samples(model, tokenizer, sampling, flags, n, seed, device):
    """n unconditional samples of the training length with sample.py's `flags` (sampler, steps, schedule, ...):
    (each as bos + its tokens up to and including its first eos, mean network evaluations per sample)."""
    args = sample.parse_args(["-mdir", "unused", *flags])
    layout = sample_layout(tokenizer, [None], sampling["sequence_length"])
    step, schedule = sample.build_step(args), sample.build_schedule(args)
    warp = sample.grid_warp(args, sampling, "the evaluated run")
    sequences, evaluations = [], 0
    for start in range(0, n, args.batch_size):
        count = min(args.batch_size, n - start)
        ids, cond_mask, _ = sample_rows([layout] * count, tokenizer.pad_id)
        seeds = [sample.sample_seed(seed, i) for i in range(start, start + count)]
        out, evals, _ = generate(model, step, schedule, ids.to(device), cond_mask.to(device), seeds, args.steps,
                                 sampling["sigma_min"], sampling["sigma_max"], args.rho, early_exit=args.early_exit,
                                 exit_confidence=args.exit_confidence, precision=args.precision, warp=warp)
        evaluations += int(evals.sum())
        for row in out.tolist():
            end = row.index(tokenizer.eos_id) + 1 if tokenizer.eos_id in row else len(row)
            sequences.append(row[:end])
    return sequences, evaluations / n


def score_samples(sequences, tokenizer, judge, args, device):
    """sample_metrics of the sequences' text tokens, and their generative perplexity under the judge (exp of its
    total NLL over its total tokens, eos included) when there is one."""
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    result = sample_metrics([[t for t in ids if t not in special] for ids in sequences])
    if judge is not None:
        nats, tokens = sequence_nll(judge, sequences, args.batch_size, tokenizer.pad_id, device)
        result["gen_ppl"] = math.exp(nats / tokens)
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
        fig.savefig(path, dpi=120)
        return True
    except OSError as e:
        print(f"warning: {path}: cannot write the plot ({e.strerror or e}); use --plot_dir", file=sys.stderr)
        return False
    finally:
        plt.close(fig)


def plot_curve(curve, path):
    """Draw cross-entropy and accuracy against sigma to `path`; returns False without matplotlib or where the
    file cannot be written."""
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
    fig.legend(loc="upper center")
    fig.tight_layout()
    return save_figure(plt, fig, path)


SWEEP_KEYS = ("steps", "schedule", "sampler", "grid")


def parse_sweep(text):
    """--sweep KEY=V1,V2,...: (key, [values]) for a key of SWEEP_KEYS, each value checked."""
    key, _, values = text.partition("=")
    if key not in SWEEP_KEYS or not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=V1,V2 with KEY one of {', '.join(SWEEP_KEYS)}")
    allowed = {"schedule": SCHEDULES, "sampler": SAMPLERS, "grid": sample.GRIDS}.get(key)
    values = values.split(",")
    for value in values:
        if allowed is None and not (value.isdigit() and int(value) >= 1):
            raise argparse.ArgumentTypeError(f"{text!r}: steps are whole numbers of at least 1, not {value!r}")
        if allowed is not None and value not in allowed:
            raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not one of {', '.join(allowed)}")
    return key, [int(v) for v in values] if allowed is None else values


def parse_args(argv=None):
    """eval.py's flags, checked."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-mdir", "--model_dir", required=True, help="folder written by train.py")
    p.add_argument("--valid", required=True, help="held-out lines, one example a line")
    p.add_argument("--ema", help="use the EMA weights of this rate (e.g. 0.999) instead of the raw weights")
    p.add_argument("--draws", type=int, default=16, help="Monte Carlo draws of sigma per line for the bound")
    p.add_argument("--max_lines", type=int, default=2000, help="lines read from --valid (0: all)")
    p.add_argument("--sigmas", type=int, default=10, help="points of the cross-entropy curve (spaced by rho 7)")
    p.add_argument("--judge", help="run folder of an autoregressive model (train.py --objective ar, same tokenizer) "
                                   "that scores samples and valid lines")
    p.add_argument("--samples", type=int, default=0,
                   help="unconditional samples to score (with --sweep: per setting, default 64)")
    p.add_argument("--sampler", choices=SAMPLERS, default="iterative", help="sampler of the samples, as in sample.py")
    p.add_argument("--steps", type=int, default=200, help="sampler steps of the samples")
    p.add_argument("--schedule", choices=SCHEDULES, default="uniform",
                   help="per-token schedule of the samples, as in sample.py")
    p.add_argument("--grid", choices=sample.GRIDS, default="rho",
                   help="sigma grid of the samples, as in sample.py (warped: the run's time warp)")
    p.add_argument("--sweep", type=parse_sweep, action="append", metavar="KEY=V1,V2",
                   help="score samples at every combination of these values (keys: steps, schedule, sampler, grid)")
    p.add_argument("--plot_dir", help="folder for ce_by_sigma.png and sweep.png (default: MODEL_DIR)")
    p.add_argument("--batch_size", type=int, default=64, help="lines scored, or samples drawn, at once")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, else cpu), cpu, cuda, ...")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if args.draws < 2 or args.sigmas < 2 or args.batch_size < 1 or args.max_lines < 0 or args.samples < 0 \
            or args.steps < 1:
        p.error("--draws and --sigmas must be at least 2, --batch_size and --steps at least 1, --max_lines and "
                "--samples 0 or more")
    keys = [key for key, _ in args.sweep or []]
    if len(set(keys)) < len(keys):
        p.error("--sweep: give each key once, with all its values (steps=16,32)")
    if args.sweep and not args.samples:
        args.samples = 64
    return args


def sample_flags(args, **override):
    """sample.py flags for the samples: --sampler, --steps, --schedule and --grid, with `override` (a sweep's
    values)."""
    settings = {"sampler": args.sampler, "steps": args.steps, "schedule": args.schedule, "grid": args.grid,
                **override}
    flags = [f for key, value in settings.items() for f in (f"--{key}", str(value))]
    return settings, flags + ["--batch_size", str(args.batch_size)]


def load_judge(path, tokenizer, length, device):
    """The judge: a causal run sharing the evaluated run's tokenizer; UsageError otherwise. Warns when it was
    trained on rows shorter than `length`, the evaluated run's (it would score positions it never saw)."""
    try:
        judge, judge_tokenizer, judge_sampling = load_model(path, device=device)
    except UsageError as e:
        raise UsageError(f"--judge {path}: {e}") from None
    if not judge.cfg.causal:
        raise UsageError(f"--judge {path}: not an autoregressive run (train it with --objective ar)")
    if judge_tokenizer.model_proto != tokenizer.model_proto:
        raise UsageError(f"--judge {path}: another tokenizer than the evaluated run's")
    if judge_sampling["sequence_length"] < length:
        print(f"warning: --judge {path} was trained on rows of {judge_sampling['sequence_length']} tokens, shorter "
              f"than the {length} of the evaluated run: its scores of later positions mean little", file=sys.stderr)
    return judge


def evaluate(args, device):
    """Every figure eval.py reports, as one dict."""
    model, tokenizer, sampling = load_model(args.model_dir, args.ema, device)
    args.pad_id = tokenizer.pad_id
    lines, skipped = read_lines(args.valid, tokenizer, sampling["sequence_length"], args.max_lines or -1)
    if model.cfg.causal and (args.samples or args.sweep):
        raise UsageError(f"{args.model_dir}: an autoregressive run; --samples and --sweep score a diffusion run's "
                         "samples")
    grids = {args.grid, *dict(args.sweep or []).get("grid", [])}
    if "warped" in grids and sampling["warp"] is None:
        raise UsageError(f"--grid warped: {args.model_dir} was trained without --time_warp")
    if args.plot_dir and not os.path.isdir(args.plot_dir):
        problem = "not a folder" if os.path.exists(args.plot_dir) else "no such folder"
        raise UsageError(f"--plot_dir {args.plot_dir}: {problem}")
    judge = None if args.judge is None else load_judge(args.judge, tokenizer, sampling["sequence_length"], device)
    generator = torch.Generator().manual_seed(args.seed)
    chars = sum(c for _, c in lines)
    result = {"model_dir": args.model_dir, "objective": "ar" if model.cfg.causal else "diffusion",
              "valid": args.valid, "ema": args.ema, "lines": len(lines), "skipped_lines": skipped}
    if model.cfg.causal:
        nats, tokens = sequence_nll(model, [ids for ids, _ in lines], args.batch_size, tokenizer.pad_id, device)
        result.update({"nll_nats_per_token": nats / tokens, "perplexity": math.exp(nats / tokens),
                       "bits_per_char": nats / chars / math.log(2), "tokens": int(tokens), "characters": chars})
    else:
        result["draws"] = args.draws
        result.update(likelihood_bound(model, lines, sampling, args, device, generator))
        grid = torch.linspace(0, 1, args.sigmas, dtype=torch.float64)
        sigmas = rho_schedule(grid, sampling["sigma_min"], sampling["sigma_max"], 7.0).flip(0).tolist()
        result["ce_by_sigma"] = ce_by_sigma(model, lines, sigmas, args, device, generator)
        plot = os.path.join(args.plot_dir or args.model_dir, "ce_by_sigma.png")
        result["plot"] = plot if plot_curve(result["ce_by_sigma"], plot) else None
    if judge is not None:
        nats, tokens = sequence_nll(judge, [ids for ids, _ in lines], args.batch_size, tokenizer.pad_id, device)
        result["judge"] = {"model_dir": args.judge, "nll_nats_per_token": nats / tokens,
                           "perplexity": math.exp(nats / tokens), "bits_per_char": nats / chars / math.log(2)}
        result["valid_gen_ppl"] = math.exp(nats / tokens)
        result["valid_entropy"] = sample_metrics([ids[1:-1] for ids, _ in lines])["entropy"]
    if args.samples and not args.sweep and not model.cfg.causal:
        settings, flags = sample_flags(args)
        sequences, evaluations = draw_samples(model, tokenizer, sampling, flags, args.samples, args.seed, device)
        result["samples"] = {**settings, "count": args.samples, "evaluations": evaluations,
                             **score_samples(sequences, tokenizer, judge, args, device)}
        result.update({k: result["samples"].get(k) for k in ("gen_ppl", "entropy", "distinct_2")})
    if args.sweep and not model.cfg.causal:
        keys = [key for key, _ in args.sweep]
        result["sweep"] = []
        for values in itertools.product(*(values for _, values in args.sweep)):
            settings, flags = sample_flags(args, **dict(zip(keys, values)))
            sequences, evaluations = draw_samples(model, tokenizer, sampling, flags, args.samples, args.seed, device)
            result["sweep"].append({**settings, "evaluations": evaluations,
                                    **score_samples(sequences, tokenizer, judge, args, device)})
        sweep_plot = os.path.join(args.plot_dir or args.model_dir, "sweep.png")
        result["sweep_plot"] = sweep_plot if plot_sweep(result["sweep"], sweep_plot) else None
    return result


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
        label = f"{row['sampler']} {row['schedule']} {row['steps']}" + (" warped" if row["grid"] == "warped" else "")
        ax.annotate(label, (row["evaluations"], row[key]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per sample")
    ax.set_ylabel("generative perplexity (judge)" if key == "gen_ppl" else "unigram entropy (nats)")
    fig.tight_layout()
    return save_figure(plt, fig, path)


def print_table(result):
    """The figures of `result` as a few readable lines."""
    print(f"{result['lines']} valid lines ({result['skipped_lines']} longer than the rows skipped)")
    if result["objective"] == "ar":
        print(f"autoregressive: NLL {result['nll_nats_per_token']:.4f} nats/token, perplexity "
              f"{result['perplexity']:.2f}, {result['bits_per_char']:.4f} bits/char")
    else:
        terms = result["bound_terms"]
        print(f"diffusion NLL bound: {result['nll_bound_nats_per_token']:.4f} +- {result['bound_stderr']:.4f} "
              f"nats/token (reconstruction {terms['reconstruction']:.4f}, diffusion {terms['diffusion']:.4f}, prior "
              f"{terms['prior']:.4f}), perplexity <= {math.exp(result['nll_bound_nats_per_token']):.2f}, "
              f"{result['bits_per_char']:.4f} bits/char")
        for point in result["ce_by_sigma"]:
            print(f"  sigma {point['sigma']:>8.3f}  CE {point['ce']:.3f} nats  accuracy {point['accuracy']:.3f}")
    if "judge" in result:
        judge = result["judge"]
        print(f"judge {judge['model_dir']}: NLL {judge['nll_nats_per_token']:.4f} nats/token, perplexity "
              f"{judge['perplexity']:.2f}, {judge['bits_per_char']:.4f} bits/char")
        print(f"valid lines: gen-PPL {result['valid_gen_ppl']:.2f}, entropy {result['valid_entropy']:.3f}")
    rows = ([result["samples"]] if "samples" in result else []) + result.get("sweep", [])
    for row in rows:
        ppl = f"gen-PPL {row['gen_ppl']:.2f}, " if "gen_ppl" in row else ""
        print(f"samples ({row['sampler']}, {row['schedule']}, {row['grid']} grid, {row['steps']} steps, "
              f"{row['evaluations']:.1f} "
              f"evaluations): {ppl}entropy {row['entropy']:.3f}, distinct-2 {row['distinct_2']:.3f}, rep-4 "
              f"{row['rep_4']:.3f}, mean length {row['mean_length']:.1f}")


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
    try:
        main()
    except UsageError as e:
        die(str(e))
    except KeyboardInterrupt:
        sys.exit(130)
