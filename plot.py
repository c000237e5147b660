"""Draw a run's training curves (loss and accuracy against step) from its metrics.jsonl to a PNG; for a run with
noise levels, its learning by level to MODEL_DIR/levels.png (the loss of each level bucket against step and, with
--probe_interval, each bucket's share of the gradient and the shuffle gap); for a run trained with --time_warp, its
fitted warp from the checkpoint to MODEL_DIR/time_warp.png (with -o FILE.EXT: FILE_levels.EXT, FILE_time_warp.EXT).

    python plot.py -mdir out [-o out/metrics.png]

Needs matplotlib (pip install matplotlib), which training does not.
"""
import json
import os

import torch

from checkpoint import CHECKPOINT
from diffusion import rho_schedule
from timewarp import TimeWarp
from utils import ArgumentParser, UsageError, load_checkpoint, run_command


def read_metrics(path):
    """The objects of a metrics.jsonl file, in order. Raises UsageError naming the file and line for a missing
    file, a line that is not JSON, or a file without any line."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no metrics there (train.py writes them every --log_interval steps)")
    lines = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}:{number}: not JSON ({e.msg})") from None
    if not lines:
        raise UsageError(f"{path}: no metrics yet")
    return lines


def pyplot():
    """matplotlib.pyplot drawing to files; UsageError without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plot.py needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt
    return plt


def plot(lines, out_path, title):
    """Loss (nats) and accuracy against step, one panel each, written to out_path."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, label in ((axes[0], "loss", "loss (nats)"), (axes[1], "accuracy", "accuracy")):
        points = [(line["step"], line[key]) for line in lines if key in line and "step" in line]
        if points:
            ax.plot(*zip(*points))
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def bucket_labels(edges, name):
    """Legend labels of the level buckets: "sigma 1-1.6", ... (edges to 2 significant figures)."""
    return [f"{name} {low:.2g}-{high:.2g}" for low, high in zip(edges, edges[1:])]


def plot_levels(lines, out_path, title):
    """The learning by noise level, written to out_path: the training loss of each level bucket against step (the
    log lines' loss_by_level), and, where the run was probed, each bucket's share of the gradient
    (grad_share_by_level) and the shuffle gap with its standard error, against step. Returns False (nothing written)
    when no line has levels."""
    logged = [line for line in lines if "loss_by_level" in line]
    if not logged:
        return False
    probes = [line for line in lines if "grad_share_by_level" in line or "shuffle_gap" in line]
    labels = bucket_labels(logged[-1]["level_edges"], logged[-1]["level_name"])
    plt = pyplot()
    fig, axes = plt.subplots(1, 3 if probes else 1, figsize=(15 if probes else 6, 3.8), squeeze=False)
    axes = axes[0]
    series = (("loss_by_level", logged, axes[0], "cross-entropy (nats)"),) + \
        ((("grad_share_by_level", probes, axes[1], "share of the step's gradient"),) if probes else ())
    for key, rows, ax, ylabel in series:
        for k, label in enumerate(labels):
            points = [(row["step"], row[key][k]) for row in rows if key in row and row[key][k] is not None]
            if points:
                ax.plot(*zip(*points), label=label, color=plt.cm.viridis(k / max(len(labels) - 1, 1)))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if probes:
        gaps = [(row["step"], row["shuffle_gap"], row["shuffle_gap_stderr"]) for row in probes if "shuffle_gap" in row]
        if gaps:
            steps, gap, error = zip(*gaps)
            axes[2].errorbar(steps, gap, yerr=error, marker="o", capsize=3)
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("shuffle gap (nats/token)")
        axes[2].grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return True


def plot_warp(warp, out_path, title):
    """A TimeWarp's fit: the mean training cross-entropy by sigma with its non-decreasing fit, and the warped
    sigma(u) that training draws against the unwarped rho spacing, written to out_path."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    sigmas, means, fitted = warp.fitted_loss()
    axes[0].plot(sigmas, means, ".", label="mean cross-entropy")
    axes[0].plot(sigmas, fitted, label="monotone fit")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("sigma")
    axes[0].set_ylabel("cross-entropy (nats)")
    u = torch.linspace(0, 1, 201, dtype=torch.float64)
    axes[1].plot(u, warp(u), label="warped (drawn in training)")
    axes[1].plot(u, rho_schedule(1 - u, warp.sigma_min, warp.sigma_max, warp.rho), "--", label="unwarped")
    axes[1].set_xlabel("u ~ U(0, 1)")
    axes[1].set_ylabel("sigma")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def build_parser():
    """plot.py's command line."""
    p = ArgumentParser(prog="plot.py", description=__doc__)
    p.add_argument("-mdir", "--model_dir", required=True, help="folder written by train.py")
    p.add_argument("-o", "--output", help="image to write, .png, .pdf or .svg (default: MODEL_DIR/metrics.png)")
    return p


def main(argv=None):
    """Read -mdir's metrics.jsonl and write the PNG; raises UsageError on bad input."""
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.model_dir):
        raise UsageError(f"-mdir {args.model_dir}: no such folder")
    out_path = args.output or os.path.join(args.model_dir, "metrics.png")
    if os.path.splitext(out_path)[1].lower() not in (".png", ".pdf", ".svg"):
        raise UsageError(f"-o {out_path}: give a file name ending in .png, .pdf or .svg")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out_path))):
        raise UsageError(f"-o {out_path}: no folder {os.path.dirname(os.path.abspath(out_path))}")
    lines = read_metrics(os.path.join(args.model_dir, "metrics.jsonl"))
    checkpoint = os.path.join(args.model_dir, CHECKPOINT)
    warp = load_checkpoint(checkpoint).get("time_warp") if os.path.isfile(checkpoint) else None
    stem, extension = os.path.splitext(out_path)
    warp_path = f"{stem}_time_warp{extension}" if args.output else os.path.join(args.model_dir, "time_warp.png")
    levels_path = f"{stem}_levels{extension}" if args.output else os.path.join(args.model_dir, "levels.png")
    try:
        plot(lines, out_path, args.model_dir)
        print(out_path)
        if plot_levels(lines, levels_path, f"{args.model_dir}: learning by noise level"):
            print(levels_path)
        if warp:
            plot_warp(TimeWarp.from_state_dict(warp), warp_path, f"{args.model_dir}: time warp")
            print(warp_path)
    except OSError as e:
        raise UsageError(f"{e.filename or out_path}: cannot write the plot ({e.strerror or e})") from None


if __name__ == "__main__":
    run_command(main)
