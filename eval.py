"""Evaluate a trained run on held-out lines: an upper bound on the negative log-likelihood (nats per token and
bits per character) and the cross-entropy and accuracy at a grid of noise levels.

    python eval.py -mdir out --valid valid.txt [--ema RATE] [--draws 16] [--max_lines 2000] [--json]

Each line is scored as its own sequence, bos held, its tokens and eos free; lines longer than the training rows
are skipped (and counted). The cross-entropy curve is also drawn to a PNG when matplotlib is installed.
"""
import argparse
import json
import math
import os
import sys

import torch

from data import decode_line, sample_rows
from diffusion import network_logits, nll_bound, rho_schedule
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
        raise UsageError(f"--valid {path}: no line fits the training rows of {length} tokens")
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
            logits = network_logits(model, model.embed(ids) + level[..., None] * noise, level, segment_ids)
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none")
            ce += float((nll.view(ids.shape) * free).sum())
            correct += float(((logits.argmax(-1) == ids) & free).sum())
            count += float(free.sum())
        curve.append({"sigma": round(float(sigma), 4), "ce": ce / count, "accuracy": correct / count})
    return curve


def plot_curve(curve, path):
    """Draw cross-entropy and accuracy against sigma to `path`; returns False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv=None):
    """eval.py's flags, checked."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-mdir", "--model_dir", required=True, help="folder written by train.py")
    p.add_argument("--valid", required=True, help="held-out lines, one example a line")
    p.add_argument("--ema", help="use the EMA weights of this rate (e.g. 0.999) instead of the raw weights")
    p.add_argument("--draws", type=int, default=16, help="Monte Carlo draws of sigma per line for the bound")
    p.add_argument("--max_lines", type=int, default=2000, help="lines read from --valid (0: all)")
    p.add_argument("--sigmas", type=int, default=10, help="points of the cross-entropy curve, log-spaced")
    p.add_argument("--plot", help="PNG of the cross-entropy curve (default: MODEL_DIR/ce_by_sigma.png)")
    p.add_argument("--batch_size", type=int, default=64, help="lines scored at once")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, else cpu), cpu, cuda, ...")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if args.draws < 2 or args.sigmas < 2 or args.batch_size < 1 or args.max_lines < 0:
        p.error("--draws and --sigmas must be at least 2, --batch_size at least 1, --max_lines 0 or more")
    return args


def main(argv=None):
    """Print the evaluation of the run in `argv`; raises UsageError on bad input."""
    args = parse_args(argv)
    keep_freed_memory()
    seed_all(args.seed)
    device = resolve_device(args.device)
    model, tokenizer, sampling = load_model(args.model_dir, args.ema, device)
    args.pad_id = tokenizer.pad_id
    lines, skipped = read_lines(args.valid, tokenizer, sampling["sequence_length"], args.max_lines or -1)
    generator = torch.Generator().manual_seed(args.seed)
    result = {"model_dir": args.model_dir, "valid": args.valid, "ema": args.ema, "lines": len(lines),
              "skipped_lines": skipped, "draws": args.draws}
    result.update(likelihood_bound(model, lines, sampling, args, device, generator))
    grid = torch.linspace(0, 1, args.sigmas, dtype=torch.float64)
    sigmas = rho_schedule(grid, sampling["sigma_min"], sampling["sigma_max"], 7.0).flip(0).tolist()
    result["ce_by_sigma"] = ce_by_sigma(model, lines, sigmas, args, device, generator)
    plot = args.plot or os.path.join(args.model_dir, "ce_by_sigma.png")
    result["plot"] = plot if plot_curve(result["ce_by_sigma"], plot) else None
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['lines']} lines ({skipped} longer than the rows skipped), {result['tokens']} tokens, "
          f"{args.draws} draws a line")
    print(f"NLL bound: {result['nll_bound_nats_per_token']:.4f} +- {result['bound_stderr']:.4f} nats/token "
          f"(reconstruction {result['bound_terms']['reconstruction']:.4f}, diffusion "
          f"{result['bound_terms']['diffusion']:.4f}, prior {result['bound_terms']['prior']:.4f}); "
          f"{result['bits_per_char']:.4f} bits/char")
    for point in result["ce_by_sigma"]:
        print(f"sigma {point['sigma']:>8.3f}  CE {point['ce']:.3f} nats  accuracy {point['accuracy']:.3f}")
    if result["plot"]:
        print(f"curve: {result['plot']}")


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        die(str(e))
    except KeyboardInterrupt:
        sys.exit(130)
