"""Train a score-interpolation diffusion language model on a line-per-example corpus.

    python train.py -d corpus.txt -spm bpe.model -mdir out [--preset tiny|small|base] [--max_steps N]
    python train.py --demo

A run started again with the same -mdir resumes from its checkpoint.
"""
import argparse
import contextlib
import dataclasses
import filecmp
import json
import os
import random
import re
import shutil
import signal
import sys
import time

import torch
from tqdm import tqdm

from data import ENCODING_ERRORS, PackedBatches, PackedRows, Tokenizer, load_corpus, sample_layout, sample_rows
from diffusion import (SAMPLING_RHO, TimeWarp, autoregressive_loss, autoregressive_targets, draw_training_sigma,
                       generate, iterative_step, score_interpolation_loss, uniform_schedule)
from model import ModelConfig, ScoreLM
from utils import (CHECKPOINT_KEYS, PRECISIONS, MetricsWriter, UsageError, all_reduce_sum, autocast,
                   check_state_dict, die, distributed_setup, ema_update, load_checkpoint, load_state_dict_strict,
                   keep_freed_memory, lr_at, save_checkpoint, seed_all)

# Architecture and batch presets; flags given on the command line win. "base" is the original project's size.
PRESETS = {
    "tiny": dict(model_dim=128, num_layers=4, num_heads=4, embedding_dim=64, batch_size=32, learning_rate=3e-3,
                 warmup_steps=100),
    "small": dict(model_dim=256, num_layers=4, num_heads=4, embedding_dim=64, batch_size=64, learning_rate=5e-4,
                  warmup_steps=500),
    "base": dict(model_dim=512, num_layers=8, num_heads=8, embedding_dim=128, batch_size=256, learning_rate=1e-4,
                 warmup_steps=10000),
    "large": dict(model_dim=768, num_layers=14, num_heads=12, embedding_dim=128, batch_size=128, learning_rate=1e-4,
                  warmup_steps=10000),  # about 106M parameters with 8,000 tokens: a GPU preset
}
# Defaults of the diffusion objective's quality flags (measured: README, Self-conditioning and time warping)
DIFFUSION_DEFAULTS = {"self_cond": 0.0, "time_warp": True}
SAMPLE_PROMPTS = ["", "", "the", "a person who"]
CHECKPOINT = "ckpt.pt"


def parse_args(argv=None):
    """The run's arguments with presets and demo defaults resolved; exits with a usage error on bad values."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("data and output")
    io.add_argument("-d", "--data_path", help="training corpus: UTF-8 text, one example a line (blank lines skipped)")
    io.add_argument("-spm", "--spm_model", help="SentencePiece model with bos/eos/pad/unk ids (prepare.py makes one)")
    io.add_argument("-mdir", "--model_dir", help="folder for checkpoint, config and metrics; an existing run resumes")
    io.add_argument("--cache_dir", help="folder for the tokenised corpus cache (default ~/.cache/score-diffusion-lm)")
    io.add_argument("--encoding_errors", choices=ENCODING_ERRORS, default="strict",
                    help="invalid UTF-8 in the corpus: strict stops with its line number, replace uses U+FFFD")
    io.add_argument("--num_workers", type=int, default=2, help="DataLoader worker processes packing rows (0: none)")
    io.add_argument("--demo", action="store_true",
                    help="build a demo corpus and tokenizer under demo/ if missing, then train the tiny preset for 1000 steps")

    arch = p.add_argument_group("model (defaults from --preset)")
    arch.add_argument("--preset", choices=PRESETS, help="architecture and batch defaults (default: base; tiny with --demo)")
    arch.add_argument("-dim", "--model_dim", type=int, help="transformer width D")
    arch.add_argument("-emb", "--embedding_dim", type=int, help="token embedding size E, the space diffused in")
    arch.add_argument("-nl", "--num_layers", type=int, help="transformer blocks")
    arch.add_argument("-nh", "--num_heads", type=int, help="attention heads")
    arch.add_argument("--objective", choices=("diffusion", "ar"), default="diffusion",
                      help="diffusion (this project's model) or ar: the autoregressive baseline, same backbone with "
                           "causal attention and no noise, for eval.py's comparison and judge (no length expansion)")
    arch.add_argument("-dop", "--dropout_prob", type=float, default=0.0, help="dropout in every block (default 0)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("-bsz", "--batch_size", type=int, help="rows per micro-batch (each row packs several lines)")
    opt.add_argument("-acc", "--accumulation_steps", type=int, default=1, help="micro-batches per optimiser step")
    opt.add_argument("-lr", "--learning_rate", type=float, help="peak AdamW learning rate")
    opt.add_argument("-wus", "--warmup_steps", type=int, help="linear warm-up steps before the cosine decay")
    opt.add_argument("-wd", "--weight_decay", type=float, default=0.01, help="AdamW weight decay on matrices only")
    opt.add_argument("-gc", "--gradient_clipping", type=float, default=1.0, help="max global gradient norm (0: off)")
    opt.add_argument("-ema", "--ema_rate", default="0.999,0.9999", help="comma-separated EMA decay rates ('' for none)")
    opt.add_argument("--max_steps", type=int, help="optimiser steps; the cosine decay ends here (default 100000)")
    opt.add_argument("--precision", choices=PRECISIONS, default="fp32",
                     help="autocast precision of the network (fp16 adds a gradient scaler); process maths stay fp32")
    opt.add_argument("--compile", action="store_true", help="torch.compile the network for training")
    opt.add_argument("--max_bad_steps", type=int, default=10,
                     help="stop after this many steps in a row with a non-finite loss or gradient (each is skipped)")

    diff = p.add_argument_group("diffusion")
    diff.add_argument("-slen", "--sequence_length", type=int, default=64, help="row length L in tokens")
    diff.add_argument("-smin", "--sigma_min", type=float, default=1.0, help="lowest training noise level (DDLM)")
    diff.add_argument("-smax", "--sigma_max", type=float, default=50.0,
                      help="highest training noise level (50: measured, README; DDLM used 10, CDCD about 300)")
    diff.add_argument("-rho", "--rho", type=float, default=1.0, help="spacing of sigma between the ends (1: linear)")
    diff.add_argument("--multilevel_prob", type=float, default=0.5,
                      help="share of batches with an independent sigma per token instead of per sequence")
    diff.add_argument("--self_cond", type=float, metavar="PROB",
                      help=f"self-conditioning: the model also reads its previous estimate of the clean embeddings; "
                           f"this share of batches gets one from a first pass without gradient (0: off; default "
                           f"{DIFFUSION_DEFAULTS['self_cond']:g})")
    diff.add_argument("--time_warp", action=argparse.BooleanOptionalAction,
                      help=f"draw training noise levels from a warp fitted online to the loss by sigma (CDCD; default "
                           f"{'on' if DIFFUSION_DEFAULTS['time_warp'] else 'off'})")
    diff.add_argument("--expand_prob", type=float, default=0.1,
                      help="share of lines padded after eos to a random length (teaches where text ends)")

    run = p.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0, help="seed for weights, data order and noise")
    run.add_argument("--device", default="auto", help="auto (cuda, mps, else cpu), cpu, cuda, cuda:1, ...")
    run.add_argument("--log_interval", type=int, default=50, help="steps between metrics.jsonl lines")
    run.add_argument("--save_interval", type=int, default=1000, help="steps between checkpoints (and one at the end)")
    run.add_argument("--keep", type=int, default=0,
                     help="also keep the last K checkpoints as ckpt-<step>.pt (ckpt.pt is always the latest)")
    run.add_argument("--sample_interval", type=int, help="steps between printed samples (default 1000; 0: never)")
    run.add_argument("--sample_steps", type=int, default=100, help="steps of the iterative sampler for the printed samples")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show the progress bar")
    run.add_argument("--tensorboard", action="store_true",
                     help="also write the metrics to MODEL_DIR/tensorboard (needs the tensorboard package)")
    args = p.parse_args(argv)
    if args.demo:
        apply_demo_defaults(args)
    for name in ("data_path", "spm_model", "model_dir"):
        if getattr(args, name) is None:
            p.error(f"--{name} is required (or use --demo)")
    args.preset = args.preset or "base"
    args.max_steps = 100_000 if args.max_steps is None else args.max_steps
    args.sample_interval = 1000 if args.sample_interval is None else args.sample_interval
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.objective == "ar":  # length expansion's pads after eos would be trivial next-token targets; no noise
        given = [flag for flag, value in (("--self_cond", args.self_cond), ("--time_warp", args.time_warp)) if value]
        if given:
            p.error(f"{' and '.join(given)}: only for the diffusion objective, not --objective ar")
        args.expand_prob, args.self_cond, args.time_warp = 0.0, 0.0, False
    for name, value in DIFFUSION_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    problem = check_args(args)
    if problem:
        p.error(problem)
    return args


def check_args(args):
    """The first flag whose value cannot work, as a message, or None."""
    at_least = {"batch_size": 1, "accumulation_steps": 1, "sequence_length": 2, "max_steps": 0, "warmup_steps": 0,
                "log_interval": 1, "save_interval": 1, "num_workers": 0, "sample_interval": 0, "sample_steps": 1,
                "model_dim": 2, "embedding_dim": 1, "max_bad_steps": 1, "keep": 0, "num_layers": 1, "num_heads": 1}
    for name, low in at_least.items():
        if getattr(args, name) < low:
            return f"--{name} {getattr(args, name)}: must be at least {low}"
    for name in ("multilevel_prob", "expand_prob", "dropout_prob", "self_cond"):
        if not 0 <= getattr(args, name) <= 1:
            return f"--{name} {getattr(args, name)}: must be in [0, 1]"
    if not 1e-4 <= args.sigma_min < args.sigma_max <= 1e4:
        return f"-smin {args.sigma_min} -smax {args.sigma_max}: need 1e-4 <= sigma_min < sigma_max <= 1e4"
    if not 0.1 <= args.rho <= 100:
        return f"-rho {args.rho}: must be in [0.1, 100] (1 is uniform in sigma, 7 is EDM's)"
    if not (args.rho > 0 and args.learning_rate > 0 and args.weight_decay >= 0 and args.gradient_clipping >= 0):
        return "-rho and -lr must be positive, -wd and -gc not negative (and none NaN)"
    if args.model_dim % args.num_heads or (args.model_dim // args.num_heads) % 2:
        return f"-dim {args.model_dim} -nh {args.num_heads}: the width must split into heads of even size"
    try:
        rates = ema_rates(args)
    except ValueError:
        return f"-ema {args.ema_rate!r}: expected comma-separated numbers such as 0.999,0.9999"
    if any(not 0 < r < 1 for r in rates):
        return f"-ema {args.ema_rate!r}: every rate must be in (0, 1)"
    return None


def apply_demo_defaults(args):
    """Fill the flags not given explicitly with the demo's, building the demo corpus first if missing."""
    import prepare  # only the demo needs it
    data_dir = os.path.join("demo", "data")
    if not os.path.isfile(os.path.join(data_dir, "bpe.model")):
        print(f"building the demo corpus and tokenizer in {data_dir}/", file=sys.stderr)
        prepare.build_demo(data_dir)
    demo = dict(data_path=os.path.join(data_dir, "train.txt"), spm_model=os.path.join(data_dir, "bpe.model"),
                model_dir=os.path.join("demo", "model"), preset="tiny", max_steps=1000, sample_interval=0)
    for name, value in demo.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def build_loader(args, tokenizer, rank=0, world_size=1):
    """Batches of packed rows from the corpus's token cache (built here on the first run over it); with
    several processes, this rank's rows of each global batch."""
    cache = load_corpus(args.data_path, tokenizer, args.cache_dir, args.encoding_errors, progress=args.progress)
    rows = PackedRows(cache, args.sequence_length, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id,
                      seed=args.seed, expand_prob=args.expand_prob)
    return PackedBatches(rows, args.batch_size, args.num_workers, rank, world_size)


def build_model(args, vocab_size, device):
    """ScoreLM of the run's architecture flags, on `device`."""
    cfg = ModelConfig(vocab_size=vocab_size, embedding_dim=args.embedding_dim, model_dim=args.model_dim,
                      num_layers=args.num_layers, num_heads=args.num_heads, dropout=args.dropout_prob,
                      causal=args.objective == "ar", self_cond=args.self_cond > 0)
    return ScoreLM(cfg).to(device)


def build_warp(args, device):
    """The run's TimeWarp with --time_warp, else None."""
    return TimeWarp(args.sigma_min, args.sigma_max, args.rho, device=device) if args.time_warp else None


class TrainingForward(torch.nn.Module):
    """The training forward, noisy embeddings to per-token loss, as one module, so that DistributedDataParallel
    and torch.compile wrap all of it: (ids, sigma, noise, segment_ids, cond_mask, self_cond) -> (ce (B, L), logits),
    self_cond a bool (this batch takes a self-conditioning pass first). A causal model (--objective ar) takes the
    autoregressive loss instead and ignores sigma, noise, cond_mask and self_cond."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, sigma, noise, segment_ids, cond_mask, self_cond=False):
        if self.model.cfg.causal:
            return autoregressive_loss(self.model, ids, segment_ids, return_logits=True)
        return score_interpolation_loss(self.model, ids, sigma, noise, segment_ids, cond_mask, return_logits=True,
                                        self_cond=self_cond)


def training_runner(model, args, world_size=1):
    """What the training steps call: TrainingForward(model), in DistributedDataParallel with several processes,
    compiled with --compile (rows have one fixed shape, so it compiles once). Weights, EMA and checkpoints
    always come from `model` itself."""
    runner = TrainingForward(model)
    if world_size > 1:
        runner = torch.nn.parallel.DistributedDataParallel(runner)
    return torch.compile(runner, dynamic=False) if args.compile else runner


def build_optimizer(model, args):
    """AdamW with weight decay on matrices only (biases, norms and frozen buffers excluded)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.99))


def ema_rates(args):
    """The -ema rates as floats; raises ValueError for a non-number (check_args turns it into a usage error)."""
    return [float(r) for r in args.ema_rate.split(",") if r.strip()]


def sampling_config(args):
    """What sample.py needs besides the model: the noise range, rho and the row length."""
    return {"sigma_min": args.sigma_min, "sigma_max": args.sigma_max, "rho": args.rho,
            "sequence_length": args.sequence_length}


class Diverged(Exception):
    """Too many optimiser steps in a row had a non-finite loss or gradient; the last checkpoint is intact."""


def loss_targets(segment_ids, cond_mask, causal=False):
    """Positions whose cross-entropy is trained: in a packed sequence and not conditioned; for the causal
    baseline, every token that follows one of its own sequence. (B, L) bool."""
    return autoregressive_targets(segment_ids) if causal else (segment_ids > 0) & ~cond_mask


def train_step(model, runner, batch, args, device, scaler, weight, warp=None):
    """Forward (under the run's autocast) and backward of one micro-batch, the summed masked cross-entropy
    multiplied by `weight` (so that micro-batches and ranks add up to the mean over every loss position of the
    step); noise levels from `warp` when given. Returns device tensors: summed cross-entropy (nats), right argmax
    predictions, loss positions, and (sigma, ce, targets), each (B, L), for the time warp's fit."""
    ids, segment_ids, cond_mask = (batch[k].to(device) for k in ("ids", "segment_ids", "cond_mask"))
    per_token = bool(torch.rand(()) < args.multilevel_prob)
    self_cond = model.cfg.self_cond and bool(torch.rand(()) < args.self_cond)  # no draw without: same stream
    sigma = draw_training_sigma(segment_ids, args.sigma_min, args.sigma_max, args.rho, per_token, warp=warp)
    noise = torch.randn(*ids.shape, model.cfg.embedding_dim, device=device)
    with autocast(device, args.precision):
        ce, logits = runner(ids, sigma, noise, segment_ids, cond_mask, self_cond)  # (B, L), (B, L, V) float32
    targets = loss_targets(segment_ids, cond_mask, model.cfg.causal)
    ce_sum = (ce * targets).sum()
    scaler.scale(ce_sum * weight).backward()
    correct = ((logits.detach().argmax(dim=-1) == ids) & targets).sum()
    return ce_sum.detach(), correct, targets.sum(), (sigma, ce.detach(), targets)


def print_samples(model, tokenizer, args, device, step):
    """Write a few samples from fixed prompts under the progress bar (none for the autoregressive baseline)."""
    if model.cfg.causal:
        return
    model.eval()
    prompts = [p for p in SAMPLE_PROMPTS if len(tokenizer.encode(p, eos=False)) < args.sequence_length]
    layouts = [sample_layout(tokenizer, [p, None], args.sequence_length) for p in prompts]
    ids, cond_mask, _ = sample_rows(layouts, tokenizer.pad_id)
    out, _, _ = generate(model, iterative_step, uniform_schedule, ids.to(device), cond_mask.to(device),
                         range(len(prompts)), args.sample_steps, args.sigma_min, args.sigma_max, SAMPLING_RHO,
                         precision=args.precision)
    for row, (_, held) in zip(out.tolist(), layouts):
        tqdm.write(f"[step {step}] {tokenizer.decode_sample(row, held)}")
    model.train()


# The flag that sets each ModelConfig field, for resume errors
MODEL_FLAGS = {"vocab_size": "the vocabulary of -spm", "embedding_dim": "-emb", "model_dim": "-dim",
               "num_layers": "-nl", "num_heads": "-nh", "dropout": "-dop", "causal": "--objective ar",
               "self_cond": "--self_cond > 0"}

# Flags that may change between a run and its resumption without changing what it is
RUN_FLAGS = {"log_interval", "save_interval", "sample_interval", "sample_steps", "progress", "device",
             "tensorboard", "demo", "data_path", "spm_model", "model_dir", "cache_dir", "num_workers", "keep", "max_bad_steps"}


def rng_state():
    """Torch (CPU and, where present, CUDA) and Python generator states, as tensors and lists."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what rng_state saved."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gathered_rng_states(world_size):
    """Every rank's rng_state(), in rank order (a list of one in a single process)."""
    if world_size == 1:
        return [rng_state()]
    states = [None] * world_size
    torch.distributed.all_gather_object(states, rng_state())
    return states


def checkpoint_dict(model, emas, optimizer, scaler, step, loader, args, rng_states, warp=None):
    """Everything to resume or sample, as a plain dict of tensors, numbers, strings and lists."""
    return {"model": model.state_dict(), "ema": {str(r): sd for r, sd in emas.items()},
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
            "config": dataclasses.asdict(model.cfg), "sampling": sampling_config(args), "args": vars(args),
            "data_state": loader.state_dict(), "rng": rng_states[0], "rng_ranks": rng_states,
            "time_warp": None if warp is None else warp.state_dict()}


def restore(checkpoint, path, model, emas, optimizer, scaler, loader, args, warp=None):
    """Load a checkpoint's state into the run (and its time warp's fit into `warp`); returns the step to continue
    from. Raises UsageError if the model flags differ; warns (on rank 0) about other changed flags and EMA rates."""
    def warn(message):
        if loader.rank == 0:
            print(f"warning: {message}", file=sys.stderr)

    config = dataclasses.asdict(model.cfg)
    saved = {**dataclasses.asdict(ModelConfig()), **checkpoint["config"]}  # fields added since read as defaults
    if saved != config:
        changed = ", ".join(f"{MODEL_FLAGS.get(k, k)} {v} (now {config.get(k)})" for k, v in saved.items()
                            if config.get(k) != v)
        raise UsageError(f"{path}: the model flags differ from the checkpoint's: {changed}")
    load_state_dict_strict(model, checkpoint["model"], f"{path} [model]")
    loader.load_state_dict(checkpoint["data_state"])  # refuses another corpus or row length before any warning
    if checkpoint["step"] >= args.max_steps:
        return checkpoint["step"]  # nothing to train: the caller says so, without warnings about the flags
    changed = {k: (v, vars(args).get(k)) for k, v in checkpoint["args"].items()
               if k not in RUN_FLAGS and vars(args).get(k) != v}
    if "seed" in changed:
        raise UsageError(f"--seed {args.seed}: the run was started with --seed {checkpoint['args']['seed']}, "
                         "which fixes its data order; resume with the same seed")
    if "max_steps" in changed:
        warn(f"the cosine decay now ends at step {args.max_steps}, not {checkpoint['args']['max_steps']}; "
             "the learning rate follows the new schedule from here")
    if "expand_prob" in changed and checkpoint["data_state"]["row"]:
        warn("--expand_prob changed: the data stream continues at the start of the next chunk of "
             "examples (the rest of the current one was packed with the old value)")
    if changed:
        warn(f"resuming with changed flags (checkpoint, now): {changed}")
        keep = [f"--{k} {v}" if not isinstance(v, bool) else f"--{k}" if v else f"--no-{k}"
                for k, (v, _) in changed.items() if k in ("sigma_min", "sigma_max", "rho", "time_warp")]
        if keep:
            warn(f"to continue with the checkpoint's noise levels, add: {' '.join(keep)}")
    for rate, source in checkpoint["ema"].items():
        check_state_dict(checkpoint["model"], source, f"{path} [ema {rate}]")
    for rate, ema in emas.items():
        source = checkpoint["ema"].get(str(rate))
        if source is None:
            warn(f"EMA {rate} is new in this run and starts from the step-{checkpoint['step']} weights")
        for name, tensor in (source or checkpoint["model"]).items():
            ema[name].copy_(tensor)
    if warp is None and checkpoint.get("time_warp"):
        warn("the run was trained with --time_warp and now without: its fitted warp is dropped from the next "
             "checkpoint (sample.py --grid warped will refuse it); add --time_warp to keep it")
    dropped = sorted(set(checkpoint["ema"]) - {str(r) for r in emas})
    if dropped:
        warn(f"EMA rates {dropped} are not continued and will not be in the next checkpoint")
    optimizer.load_state_dict(checkpoint["optimizer"])
    for param, state in optimizer.state.items():
        if any(torch.is_tensor(v) and v.ndim and v.shape != param.shape for v in state.values()):
            raise UsageError(f"{path} [optimizer]: moment tensors of other shapes than their parameters")
    saved_warp = checkpoint.get("time_warp")
    if warp is not None and not saved_warp:
        warn("--time_warp is new in this run: its warp is fitted from here")
    elif warp is not None and any(saved_warp[k] != getattr(warp, k) for k in ("sigma_min", "sigma_max", "rho", "bins")):
        warn("the noise range or -rho changed: the checkpoint's time warp is dropped and fitted afresh")
    elif warp is not None:
        warp.load_state_dict(saved_warp)
    if scaler.is_enabled() and checkpoint.get("scaler"):  # fp16 before and now: keep the calibrated scale
        scaler.load_state_dict(checkpoint["scaler"])
    ranks = checkpoint.get("rng_ranks", [checkpoint["rng"]])
    if len(ranks) == loader.world_size:
        set_rng_state(ranks[loader.rank])
    else:  # a new generator per rank and step: each rank still draws its own noise
        warn(f"the run had {len(ranks)} process(es), now {loader.world_size}: the data position continues, each "
             f"step now takes {args.batch_size * loader.world_size} rows (-bsz is per process) with the same "
             "learning rate, and the noise is drawn afresh, so the run no longer matches an uninterrupted one")
        seed_all(args.seed + 1_000_003 * loader.rank + 7919 * checkpoint["step"])
    return checkpoint["step"]


def prepare_model_dir(args, tokenizer_path):
    """Create the model folder with a copy of the tokenizer; refuse a different tokenizer on resume, and a
    folder that cannot take a checkpoint (read-only, or a directory where a file goes) before step 1."""
    if os.path.exists(args.model_dir) and not os.path.isdir(args.model_dir):
        raise UsageError(f"-mdir {args.model_dir}: exists and is not a folder")
    copy = os.path.join(args.model_dir, "tokenizer.model")
    for name in (CHECKPOINT, "tokenizer.model", "args.json", "config.json", "metrics.jsonl"):
        path = os.path.join(args.model_dir, name)
        if os.path.exists(path) and not os.path.isfile(path):
            raise UsageError(f"-mdir {args.model_dir}: {name} there is not a file")
    try:
        os.makedirs(args.model_dir, exist_ok=True)
        with open(os.path.join(args.model_dir, CHECKPOINT + ".tmp"), "wb"):  # found now, not at the first save
            pass
        os.remove(os.path.join(args.model_dir, CHECKPOINT + ".tmp"))
        if os.path.exists(copy) and not filecmp.cmp(copy, tokenizer_path, shallow=False):
            raise UsageError(f"-spm {tokenizer_path}: differs from the tokenizer this run in {args.model_dir} "
                             "was started with")
        if not os.path.exists(copy):
            shutil.copyfile(tokenizer_path, copy)
        kept = sorted(f for f in os.listdir(args.model_dir) if re.fullmatch(r"ckpt-\d{8}\.pt", f))
        if kept and not os.path.exists(os.path.join(args.model_dir, CHECKPOINT)):
            raise UsageError(f"-mdir {args.model_dir}: holds {kept[-1]} and others but no {CHECKPOINT}; copy the one "
                             f"to resume from to {CHECKPOINT}, or train in another folder")
        metrics = os.path.join(args.model_dir, "metrics.jsonl")
        if os.path.exists(metrics) and not os.path.exists(os.path.join(args.model_dir, CHECKPOINT)):
            old = next(name for name in (f"{metrics}.old{n or ''}" for n in range(10**6)) if not os.path.exists(name))
            os.replace(metrics, old)  # a run that never saved: its lines would mix with this one's
            print(f"warning: {metrics} of an earlier run without a checkpoint moved to {os.path.basename(old)}",
                  file=sys.stderr)
    except OSError as e:
        raise UsageError(f"-mdir {args.model_dir}: {e.strerror}") from None


def write_run_files(args, model):
    """args.json (the exact arguments) and config.json (what sample.py needs) beside the checkpoint."""
    with open(os.path.join(args.model_dir, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2)
    with open(os.path.join(args.model_dir, "config.json"), "w") as f:
        json.dump({"model": dataclasses.asdict(model.cfg), "sampling": sampling_config(args)}, f, indent=2)


class StopOnSignal:
    """Context in which SIGINT (Ctrl-C) or SIGTERM asks the training loop to stop at the next step boundary,
    where it saves; a second signal interrupts at once. The previous handlers come back on exit."""

    def __enter__(self):
        self.requested, self.previous = None, {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        tqdm.write(f"{self.requested}: stopping after this step and saving (again to stop at once)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


WARP_FIT_INTERVAL = 10  # steps between refits of the time warp (each a host sync)


def optimizer_step(model, optimizer, scaler, emas, loader, args, device, step, runner=None, warp=None):
    """One optimiser step over args.accumulation_steps micro-batches: gradients unscaled (fp16), clipped, checked,
    then the AdamW update and the EMAs; `runner` (default: training_runner(model, args)) is what the forward
    calls. A step whose loss or gradient is not finite changes neither weights, EMA, optimizer state nor (the
    caller's) schedule; `warp` (--time_warp) draws the noise levels, observes the losses of applied steps only,
    and is refitted every WARP_FIT_INTERVAL steps. Returns (status, stats): status "applied", "overflow" (fp16:
    finite loss, infinite gradient; the scaler backs off) or "bad"; stats a dict of device tensors (loss,
    correct, targets, grad_norm) and host numbers (lr; tokens, text and slots of the rows)."""
    lr = lr_at(step, args.learning_rate, args.warmup_steps, args.max_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    runner = training_runner(model, args) if runner is None else runner
    batches = [next(loader) for _ in range(args.accumulation_steps)]
    stats = {"lr": lr, "tokens": 0, "text": 0, "slots": 0}
    for batch in batches:  # counted on the host: no device sync
        real = batch["segment_ids"] > 0
        stats["tokens"] += int(real.sum())
        stats["text"] += int((real & (batch["ids"] != loader.rows.pad_id)).sum())
        stats["slots"] += batch["ids"].numel()
    # every loss position of the step, on every rank, weighs the same; DDP averages gradients over the ranks
    local = sum(int(loss_targets(b["segment_ids"], b["cond_mask"], model.cfg.causal).sum()) for b in batches)  # host
    targets = all_reduce_sum(torch.tensor(float(local), device=device))
    weight = loader.world_size / targets.clamp_min(1.0)
    sums = torch.zeros(2, device=device)  # summed cross-entropy, right predictions
    observed = []
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with contextlib.nullcontext() if last or loader.world_size == 1 else runner.no_sync():
            ce_sum, correct, _, losses = train_step(model, runner, batch, args, device, scaler, weight, warp)
        sums += torch.stack([ce_sum, correct.float()])
        observed.append(losses)
    all_reduce_sum(sums)
    stats.update(loss=sums[0] / targets.clamp_min(1.0), correct=sums[1], targets=targets)
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, args.gradient_clipping or float("inf"))
    # the one host sync of a step: whether to apply it (the metrics stay on the device until a log line)
    finite_loss, finite_grad = torch.isfinite(torch.stack([stats["loss"], stats["grad_norm"].float()])).tolist()
    status = "applied" if finite_loss and finite_grad else \
        "overflow" if finite_loss and args.precision == "fp16" else "bad"
    if status == "applied":
        scaler.step(optimizer)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        for rate, ema in emas.items():
            ema_update([ema[n] for n in names], params, rate, step)
        if warp is not None:
            for sigma, ce, targets in observed:
                warp.observe(sigma, ce, targets)
            if (step + 1) % WARP_FIT_INTERVAL == 0:
                all_reduce_sum(warp.window)  # every rank fits the same warp
                warp.fit()
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return status, stats


class IntervalMetrics:
    """Sums over the steps of one log interval, kept on the device until written (one host sync per line)."""

    def __init__(self, device):
        self.device, self.started, self.run_started = device, time.perf_counter(), time.perf_counter()
        self.reset()

    def reset(self):
        self.sums = torch.zeros(4, device=self.device)  # loss, correct, targets, grad_norm
        self.steps = self.tokens = self.text = self.slots = self.skipped = 0
        self.started = time.perf_counter()

    def add(self, stats):
        self.sums += torch.stack([stats["loss"], stats["correct"], stats["targets"], stats["grad_norm"].float()])
        self.steps, self.tokens = self.steps + 1, self.tokens + stats["tokens"]
        self.text, self.slots = self.text + stats["text"], self.slots + stats["slots"]

    def line(self, step, lr, epoch):
        """The metrics of the interval as a dict, and a fresh interval."""
        loss, correct, targets, grad_norm = self.sums.tolist()  # the one host sync per log interval
        elapsed = time.perf_counter() - self.started
        line = {"step": step, "epoch": epoch, "loss": loss / self.steps, "accuracy": correct / max(targets, 1),
                "lr": lr, "grad_norm": grad_norm / self.steps, "tokens_per_s": self.tokens / elapsed,
                "packing_efficiency": self.text / max(self.slots, 1), "skipped_steps": self.skipped,
                "seconds": time.perf_counter() - self.run_started, "time": time.time()}
        self.reset()
        return line


def train(model, runner, optimizer, scaler, emas, loader, tokenizer, args, device, step, save, stop, warp=None):
    """The training loop from `step` to args.max_steps; logs, saves and samples at their intervals (logs and
    samples on rank 0 only). `runner` is what the forward calls (DDP, compiled); `warp` the time warp or None.
    Returns the step reached (earlier than max_steps if `stop` was requested on any rank). Raises Diverged after
    args.max_bad_steps steps in a row with a non-finite loss or gradient (nothing is saved then)."""
    main_rank = loader.rank == 0
    metrics_file = MetricsWriter(os.path.join(args.model_dir, "metrics.jsonl"), tensorboard=args.tensorboard) \
        if main_rank else None
    bar = tqdm(total=args.max_steps, initial=step, disable=not (args.progress and main_rank), dynamic_ncols=True)
    interval, bad_in_a_row = IntervalMetrics(device), 0
    model.train()
    while step < args.max_steps and not stop_agreed(stop, loader.world_size, device):
        status, stats = optimizer_step(model, optimizer, scaler, emas, loader, args, device, step, runner, warp)
        if status != "applied":
            interval.skipped += 1
            bad_in_a_row = bad_in_a_row + 1 if status == "bad" else 0
            if status == "bad" and main_rank:
                tqdm.write(f"warning: step {step + 1}: non-finite loss or gradient, step skipped "
                           f"({bad_in_a_row} in a row of at most {args.max_bad_steps})", file=sys.stderr)
            if bad_in_a_row >= args.max_bad_steps:
                saved = os.path.exists(os.path.join(args.model_dir, CHECKPOINT))
                raise Diverged(f"{bad_in_a_row} attempts in a row at step {step + 1} had a non-finite loss or "
                               f"gradient; {'the last checkpoint is intact' if saved else 'no checkpoint was written'}"
                               " (try a lower -lr, or --precision fp32)")
            continue
        bad_in_a_row, step = 0, step + 1
        interval.add(stats)
        bar.update(1)
        if step % args.log_interval == 0 or step == args.max_steps:
            line = interval.line(step, stats["lr"], loader.epoch)
            line["tokens_per_s"] *= loader.world_size  # every rank trains on as many rows
            bar.set_postfix(loss=f"{line['loss']:.3f}", tok_s=f"{line['tokens_per_s']:,.0f}")
            if main_rank:
                metrics_file.write(**line)
        if step % args.save_interval == 0:
            save(step)
        if args.sample_interval and step % args.sample_interval == 0 and step < args.max_steps and main_rank:
            print_samples(model, tokenizer, args, device, step)
    bar.close()
    if metrics_file:
        metrics_file.close()
    return step


def stop_agreed(stop, world_size, device):
    """Whether a stop was requested here or, with several processes, on any rank (they must stop together)."""
    if world_size == 1:
        return stop.requested is not None
    flag = all_reduce_sum(torch.tensor(float(stop.requested is not None), device=device))
    stop.requested = stop.requested or ("a signal on another rank" if flag > 0 else None)
    return stop.requested is not None


def keep_recent(path, step, keep):
    """Keep the checkpoint just written to `path` also as ckpt-<step>.pt beside it (a hard link where the file
    system allows, else a copy), and delete all but the `keep` most recent of those."""
    folder = os.path.dirname(path)
    kept = os.path.join(folder, f"ckpt-{step:08d}.pt")
    try:
        if os.path.exists(kept + ".tmp"):
            os.remove(kept + ".tmp")
        os.link(path, kept + ".tmp")
    except OSError:
        shutil.copyfile(path, kept + ".tmp")
    os.replace(kept + ".tmp", kept)
    for old in sorted(f for f in os.listdir(folder) if re.fullmatch(r"ckpt-\d{8}\.pt", f))[:-keep]:
        os.remove(os.path.join(folder, old))


def barrier(world_size):
    """Wait for every rank (a no-op in a single process)."""
    if world_size > 1:
        torch.distributed.barrier()


def main(argv=None):
    """Train (or resume) the run described by `argv`, in this process or as one rank of torchrun; raises
    UsageError on bad input."""
    args = parse_args(argv)
    keep_freed_memory()
    rank, world_size, device = distributed_setup(args.device)
    try:
        run(args, rank, world_size, device)
    except RuntimeError as e:
        if rank == 0:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"rank {rank}: stopped, another rank failed first ({first})", file=sys.stderr)
        raise SystemExit(1)
    finally:
        if world_size > 1:
            torch.distributed.destroy_process_group()


def run(args, rank, world_size, device):
    """main() once the process (group) is set up: rank 0 builds the token cache and writes every file."""
    seed_all(args.seed)  # the same initial weights on every rank
    tokenizer = Tokenizer(args.spm_model)
    if rank > 0:
        barrier(world_size)  # rank 0 builds the cache (and the model folder) first
    loader = build_loader(args, tokenizer, rank, world_size)
    if rank == 0:
        prepare_model_dir(args, args.spm_model)
        barrier(world_size)
    model = build_model(args, tokenizer.vocab_size, device)
    optimizer = build_optimizer(model, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    emas = {rate: {k: v.detach().clone() for k, v in model.state_dict().items()} for rate in ema_rates(args)}
    warp = build_warp(args, device)
    if world_size > 1:
        torch.manual_seed(args.seed + 1_000_003 * rank)  # each rank draws its own noise levels and noise
    path = os.path.join(args.model_dir, CHECKPOINT)
    resume_keys = CHECKPOINT_KEYS + ("optimizer", "ema", "args", "data_state", "rng")
    step = restore(load_checkpoint(path, needs=resume_keys), path, model, emas, optimizer, scaler, loader, args,
                   warp) if os.path.exists(path) else 0
    if step >= args.max_steps:
        if rank == 0:
            print(f"{path}: the run is at step {step}, --max_steps is {args.max_steps}: nothing to train" if step
                  else f"--max_steps {args.max_steps}: nothing to train, no checkpoint written",
                  file=sys.stderr)
        return
    runner = training_runner(model, args, world_size)
    if rank == 0:
        write_run_files(args, model)
        corpus = loader.rows.cache.meta
        print(f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} parameters on {device}"
              f"{f' x {world_size} processes' if world_size > 1 else ''}; {corpus['examples']:,} examples, "
              f"{corpus['tokens']:,} tokens; {'resuming at step ' + str(step) if step else 'starting'}",
              file=sys.stderr)

    def save(at_step):
        states = gathered_rng_states(world_size)
        if rank == 0:
            save_checkpoint(checkpoint_dict(model, emas, optimizer, scaler, at_step, loader, args, states, warp), path)
            if args.keep:
                keep_recent(path, at_step, args.keep)

    try:
        with StopOnSignal() as stop:
            step = train(model, runner, optimizer, scaler, emas, loader, tokenizer, args, device, step, save, stop,
                         warp)
            save(step)
    finally:
        loader.close()  # before the interpreter's exit, whatever happened: it cannot stop the workers itself
    if rank > 0:
        return
    if stop.requested:
        print(f"stopped by {stop.requested} at step {step}; run the same command to resume", file=sys.stderr)
    elif args.demo or args.sample_interval:
        print_samples(model, tokenizer, args, device, step)
    print(f"checkpoint: {path}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        die(str(e))
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(3)
    except KeyboardInterrupt:
        print("interrupted; nothing saved since the last checkpoint", file=sys.stderr)
        raise SystemExit(130)
