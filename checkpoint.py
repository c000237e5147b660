"""The run folder: what a checkpoint holds and how a run is restored from it, the random generators' states, the
files written beside it (config.json, args.json, the tokenizer's copy, kept checkpoints), and load_model(), which
rebuilds a trained model from the folder alone for sampling and evaluation."""
import dataclasses
import filecmp
import json
import os
import random
import re
import shutil
import sys
import tempfile

import torch

from corpus import HFTokenizer, Tokenizer
from model import ModelConfig, ScoreLM
from sharding import gathered, gathered_optimizer, is_sharded, sharded_checkpoint
from timewarp import TimeWarp
from utils import UsageError, check_state_dict, load_checkpoint, load_state_dict_strict, seed_all

CHECKPOINT = "ckpt.pt"
EXPORTED = "model.safetensors"  # an exported folder's weights (export_weights)
KEPT = re.compile(r"ckpt-\d{8}\.pt")  # the checkpoints --keep leaves beside ckpt.pt
RESUME_KEYS = ("model", "config", "sampling", "step", "optimizer", "ema", "args", "data_state", "rng")
# The flag that sets each ModelConfig field, and how its value reads on the command line, for resume errors
MODEL_FLAGS = {"vocab_size": ("the vocabulary of -spm", str), "embedding_dim": ("-emb", str),
               "model_dim": ("-dim", str), "num_layers": ("-nl", str), "num_heads": ("-nh", str),
               "dropout": ("-dop", str),
               "causal": ("--objective", lambda v: "ar" if v else "diffusion"),
               "self_cond": ("--self_cond", lambda v: "> 0" if v else "0"),
               "output_prior": ("--output_prior", lambda v: "on" if v else "off"),
               "output_prior_scale": ("--output_prior_scale", lambda v: f"{v:g}"),
               "masked": ("--objective", lambda v: "mdlm" if v else "not mdlm"),
               "conditioning": ("--conditioning", str)}
# Flags that may change between a run and its resumption without changing what it is
RUN_FLAGS = {"log_interval", "save_interval", "sample_interval", "sample_steps", "progress", "device",
             "tensorboard", "demo", "data_path", "spm_model", "model_dir", "cache_dir", "num_workers", "keep",
             "max_bad_steps", "probe_interval", "probe_lines", "probe_draws", "config", "wandb", "wandb_name",
             "fsdp"}


def load_model(model_dir, ema=None, device="cpu"):
    """Rebuild the model of `model_dir` from its checkpoint alone (or from the weights of a folder export_weights
    wrote, read_exported), with the raw weights or those of EMA rate `ema`. Returns (model in eval mode, tokenizer,
    the checkpoint's sampling settings: a dict of sigma_min, sigma_max, rho, sequence_length, length_counts (None for
    a run saved before it was kept) and warp, its TimeWarp or None). Raises UsageError if the folder, checkpoint,
    tokenizer or EMA rate is missing or does not match."""
    path = os.path.join(model_dir, CHECKPOINT)
    if not os.path.isfile(path) and os.path.isfile(os.path.join(model_dir, EXPORTED)):
        config, state, what, sampling = read_exported(model_dir, ema)
    else:
        checkpoint = load_checkpoint(path, map_location="cpu")
        config, sampling = checkpoint["config"], {**checkpoint["sampling"], "warp": checkpoint.get("time_warp")}
        state, what = chosen_weights(checkpoint, ema, path)
    model = ScoreLM(ModelConfig(**config))
    load_state_dict_strict(model, state, what)
    tokenizer = Tokenizer.open(folder_tokenizer(model_dir))
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise UsageError(f"{tokenizer.path}: vocabulary {tokenizer.vocab_size} != the model's {model.cfg.vocab_size}")
    warp = sampling.pop("warp")
    model = model.to(device).eval().settle_attention(training=False)  # its attention kernel, chosen once here
    return model, tokenizer, {"length_counts": None, **sampling, "warp": warp and TimeWarp.from_state_dict(warp)}


def chosen_weights(checkpoint, ema, path):
    """(state dict, its name for errors) of a checkpoint's raw weights (`ema` None) or those of EMA rate `ema`;
    UsageError for a rate the checkpoint does not keep."""
    if ema is None:
        return checkpoint["model"], f"{path} [model]"
    rates = {float(r): r for r in checkpoint["ema"]}
    ema = ema_rate(ema)
    if ema not in rates:
        raise UsageError(f"--ema {ema}: {path} has EMA rates {sorted(rates) or 'none'}")
    return checkpoint["ema"][rates[ema]], f"{path} [ema {ema}]"


def ema_rate(ema):
    """--ema's value as a float; UsageError for a non-number."""
    try:
        return float(ema)
    except ValueError:
        raise UsageError(f"--ema {ema!r}: expected a rate such as 0.999") from None


def export_weights(model_dir, out, ema=None):
    """Write the folder `out` that load_model reads like a run folder, for sharing: EXPORTED (safetensors, no pickle:
    the chosen weights, raw or of EMA rate `ema`, and the time warp's tensors under "time_warp."), config.json (the
    model's config, the sampling settings, the warp's numbers, which weights, the step) and the tokenizer; no
    optimizer state. Written in a temporary folder beside `out` and renamed to it, so an interruption leaves no
    partial folder. Returns config.json's dict. Raises UsageError if the run cannot be read, `out` exists, or
    safetensors is not installed."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UsageError("export needs safetensors: pip install -r requirements-extra.txt") from None
    if os.path.exists(out):
        raise UsageError(f"-o {out}: exists already; give a new folder (an export is never written over)")
    path = os.path.join(model_dir, CHECKPOINT)
    if not os.path.isfile(path) and os.path.isfile(os.path.join(model_dir, EXPORTED)):
        raise UsageError(f"-mdir {model_dir}: an exported folder already; copy it as it is")
    checkpoint = load_checkpoint(path, map_location="cpu")
    state, _ = chosen_weights(checkpoint, ema, path)
    tensors = {name: tensor.contiguous() for name, tensor in state.items()}
    warp = checkpoint.get("time_warp")
    numbers = None
    if warp is not None:
        numbers = {k: v for k, v in warp.items() if not torch.is_tensor(v)}
        tensors.update({f"time_warp.{k}": v.contiguous() for k, v in warp.items() if torch.is_tensor(v)})
    config = {"model": checkpoint["config"], "sampling": checkpoint["sampling"], "time_warp": numbers,
              "weights": "raw" if ema is None else f"ema {ema_rate(ema)}", "step": checkpoint["step"]}
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, EXPORTED))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        copy = folder_tokenizer(model_dir)
        shutil.copyfile(copy, os.path.join(tmp, os.path.basename(copy)))
        umask = os.umask(0)
        os.umask(umask)  # the folder readable as any new folder (mkdtemp makes it private), to share
        os.chmod(tmp, 0o777 & ~umask)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return config


def read_exported(model_dir, ema=None):
    """(model config, state dict, its name for errors, sampling settings with the warp's state or None) of a folder
    export_weights wrote; `ema` must name the weights it holds, if given. Raises UsageError naming the file for one
    that is not safetensors, a config.json that is missing or not the export's, or a missing safetensors package."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise UsageError(f"{model_dir}: an exported folder; reading it needs safetensors: pip install -r "
                         "requirements-extra.txt") from None
    path, config_path = os.path.join(model_dir, EXPORTED), os.path.join(model_dir, "config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
        model, sampling, weights, numbers = config["model"], config["sampling"], config["weights"], config["time_warp"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{config_path}: not the config.json of an exported folder ({e})") from None
    if ema is not None and weights != f"ema {ema_rate(ema)}":
        raise UsageError(f"--ema {ema}: {model_dir} holds one set of weights, the {weights} ones; drop --ema")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{path}: not readable as safetensors ({e})") from None
    warp = None if numbers is None else {**numbers, **{k[len("time_warp."):]: v for k, v in tensors.items()
                                                      if k.startswith("time_warp.")}}
    state = {k: v for k, v in tensors.items() if not k.startswith("time_warp.")}
    return model, state, f"{path} [{weights}]", {**sampling, "warp": warp}


def sampling_config(args, length_counts=None):
    """What sampling needs besides the model: the noise range, rho, the row length and, when given, the training
    examples' length_counts (corpus.TokenCache.length_counts), what unconditional lengths are drawn from."""
    config = {"sigma_min": args.sigma_min, "sigma_max": args.sigma_max, "rho": args.rho,
              "sequence_length": args.sequence_length}
    return config if length_counts is None else {**config, "length_counts": length_counts}


def checkpoint_dict(state, step, args, rng_states):
    """Everything to resume or sample a training.TrainingState at `step`, as a plain dict of tensors, numbers,
    strings and lists; rng_states: every rank's rng_state(), in rank order. Of a sharded model (--fsdp) the full
    tensors, gathered to the CPU, and with several processes every rank's time-warp window: a collective that every
    rank calls, whose tensors only rank 0 keeps."""
    model, keep = state.model, state.loader.rank == 0
    weights, emas, optimizer = model.state_dict(), state.emas, state.optimizer.state_dict()
    if is_sharded(model):
        weights, optimizer = gathered(weights, keep), gathered_optimizer(state.optimizer, keep)
        emas = {rate: gathered(ema, keep) for rate, ema in emas.items()}
    return {"model": weights, "ema": {str(r): sd for r, sd in emas.items()},
            "optimizer": optimizer, "scaler": state.scaler.state_dict(), "step": step,
            "config": dataclasses.asdict(model.cfg), "args": vars(args),
            "sampling": sampling_config(args, state.loader.rows.cache.length_counts(args.sequence_length)),
            "data_state": state.loader.state_dict(), "rng": rng_states[0], "rng_ranks": rng_states,
            "time_warp": None if state.warp is None else state.warp.state_dict(),
            "time_warp_windows": None if state.warp is None else gathered_windows(state.warp, state.loader.world_size),
            "time_budget": None if state.budget is None else state.budget.state_dict()}


def rng_state(device):
    """The CPU's torch and Python generator states, and on a CUDA `device` that GPU's (the one this process draws
    on: not every visible GPU's, which a resume with fewer visible GPUs could not restore), as tensors and lists."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    """Restore what rng_state saved; its GPU generator goes to a CUDA `device`, and is dropped on another device. A
    checkpoint written before kept every visible GPU's state in a list: the one at the device's index is used,
    if there is one."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    saved = state.get("cuda")
    if isinstance(saved, list):
        index = device.index or 0
        saved = saved[index] if index < len(saved) else None
    if saved is not None and device.type == "cuda":
        torch.cuda.set_rng_state(saved, device)


def gathered_windows(warp, world_size):
    """Every rank's time-warp window (the losses it observed since the last fit, which the ranks sum only at the next
    fit), CPU tensors in rank order (a list of one in a single process)."""
    if world_size == 1:
        return [warp.window.cpu()]
    windows = [None] * world_size
    torch.distributed.all_gather_object(windows, warp.window.cpu())
    return windows


def gathered_rng_states(world_size, device):
    """Every rank's rng_state(device), in rank order (a list of one in a single process)."""
    if world_size == 1:
        return [rng_state(device)]
    states = [None] * world_size
    torch.distributed.all_gather_object(states, rng_state(device))
    return states


# Restoring a run: restore() and the pieces it calls, in order

def restore(checkpoint, path, state, args):
    """Load a checkpoint (from `path`) into a training.TrainingState built for the run `args`; returns the step to
    continue from. A sharded model (--fsdp) takes its shards of the checkpoint's full tensors. Raises UsageError if
    the model flags, corpus, row length, rows a step or seed differ, or a tensor does not fit; warns (on rank 0) about
    other changed flags, EMA rates and the time warp."""
    rank = state.loader.rank
    if is_sharded(state.model):
        checkpoint = sharded_checkpoint(checkpoint, state.model, state.optimizer)

    def warn(message):
        if rank == 0:
            print(f"warning: {message}", file=sys.stderr)

    check_model_config(checkpoint, state.model, path)
    load_state_dict_strict(state.model, checkpoint["model"], f"{path} [model]")
    state.loader.load_state_dict(checkpoint["data_state"], path)  # refuses another corpus or row length before warnings
    if checkpoint["step"] >= args.max_steps:
        return checkpoint["step"]  # nothing to train: the caller says so, without warnings about the flags
    check_rows_a_step(checkpoint, args, state.loader.world_size)
    warn_changed_flags(checkpoint, args, warn)
    restore_emas(checkpoint, state.emas, path, warn)
    restore_optimizer(checkpoint, state.optimizer, path)
    restore_warp(checkpoint, state.warp, warn, rank, state.loader.world_size)
    restore_budget(checkpoint, state.budget, warn)
    if state.scaler.is_enabled() and checkpoint.get("scaler"):  # fp16 before and now: keep the calibrated scale
        state.scaler.load_state_dict(checkpoint["scaler"])
    restore_rng(checkpoint, args, rank, state.loader.world_size, warn, state.model.logit_bias.device)
    return checkpoint["step"]


def check_model_config(checkpoint, model, path):
    """Raise UsageError naming the model flags whose values differ from the checkpoint's (fields added to
    ModelConfig since it was written read as their defaults); another --objective is told to use its own -mdir."""
    config = dataclasses.asdict(model.cfg)
    saved = {**dataclasses.asdict(ModelConfig()), **checkpoint["config"]}
    if saved != config:
        flags = {k: MODEL_FLAGS.get(k, (k, str)) for k in saved}
        changed = ", ".join(f"{flags[k][0]} {flags[k][1](v)} (now {flags[k][1](config.get(k))})"
                            for k, v in saved.items() if config.get(k) != v)
        hint = "; each objective (diffusion, ar, mdlm) needs a -mdir of its own" \
            if (saved.get("causal"), saved.get("masked")) != (config.get("causal"), config.get("masked")) else ""
        raise UsageError(f"{path}: the model flags differ from the checkpoint's: {changed}{hint}")


def warn_changed_flags(checkpoint, args, warn):
    """Refuse another --seed (it fixes the data order); warn about every other flag that changed, saying what
    follows from a new --max_steps or --expand_prob and which flags keep the checkpoint's noise levels."""
    saved = checkpoint["args"]
    # rows a step are checked apart (check_rows_a_step): -bsz may change with the number of processes
    changed = {k: (v, vars(args).get(k)) for k, v in saved.items()
               if k not in RUN_FLAGS | {"batch_size", "accumulation_steps"} and vars(args).get(k) != v}
    if "seed" in changed:
        raise UsageError(f"--seed {args.seed}: the run was started with --seed {saved['seed']}, which fixes its data "
                         "order; resume with the same seed")
    if "max_steps" in changed:
        warn(f"the cosine decay now ends at step {args.max_steps}, not {saved['max_steps']}; the learning rate "
             "follows the new schedule from here")
    for flag in ("expand_prob", "cond_prob"):
        if flag in changed and checkpoint["data_state"]["row"]:
            warn(f"--{flag} changed: the data stream continues at the start of the next chunk of examples (the rest "
                 "of the current one was packed with the old value)")
    if changed:
        warn(f"resuming with changed flags (checkpoint, now): {changed}")
        keep = [f"--{k} {v}" if not isinstance(v, bool) else f"--{k}" if v else f"--no-{k}"
                for k, (v, _) in changed.items() if k in ("sigma_min", "sigma_max", "rho", "time_warp")]
        if keep:
            warn(f"to continue with the checkpoint's noise levels, add: {' '.join(keep)}")


def check_rows_a_step(checkpoint, args, world_size):
    """Raise UsageError unless the run takes as many rows a step (-bsz x processes x --accumulation_steps) as the
    checkpoint's did, saying which -bsz keeps them; another number of processes at the same rows a step resumes."""
    saved = checkpoint["args"]
    processes = len(checkpoint.get("rng_ranks", [checkpoint["rng"]]))
    before = saved["batch_size"] * processes * saved.get("accumulation_steps", 1)
    now = args.batch_size * world_size * args.accumulation_steps
    if before == now:
        return
    split = world_size * args.accumulation_steps
    fix = f"-bsz {before // split}" if before % split == 0 else \
        f"-bsz and --accumulation_steps whose product is {before // world_size}" if before % world_size == 0 else \
        f"a number of processes that divides {before}"
    raise UsageError(f"-bsz {args.batch_size} x {world_size} process{'es' * (world_size != 1)} x --accumulation_steps "
                     f"{args.accumulation_steps} = {now} rows a step; the run was trained with {before} (-bsz "
                     f"{saved['batch_size']} x {processes} x {saved.get('accumulation_steps', 1)}): resume with "
                     f"{fix}, or start a new -mdir for another batch")


def restore_emas(checkpoint, emas, path, warn):
    """Copy each EMA rate's weights from the checkpoint (a rate new in this run starts from the model's weights);
    raises UsageError for an EMA whose tensors do not fit the model."""
    for rate, source in checkpoint["ema"].items():
        check_state_dict(checkpoint["model"], source, f"{path} [ema {rate}]")
    for rate, ema in emas.items():
        source = checkpoint["ema"].get(str(rate))
        if source is None:
            warn(f"EMA {rate} is new in this run and starts from the step-{checkpoint['step']} weights")
        for name, tensor in (source or checkpoint["model"]).items():
            ema[name].copy_(tensor)
    dropped = sorted(set(checkpoint["ema"]) - {str(r) for r in emas})
    if dropped:
        warn(f"EMA rates {dropped} are not continued and will not be in the next checkpoint")


def restore_optimizer(checkpoint, optimizer, path):
    """Load the optimizer's state; raises UsageError for another grouping of the parameters (--embedding_lr_scale 1
    or not) or moment tensors of other shapes than their parameters."""
    saved, now = len(checkpoint["optimizer"]["param_groups"]), len(optimizer.param_groups)
    if saved != now:
        raise UsageError(f"{path} [optimizer]: {saved} parameter groups, this run has {now}; resume with the "
                         "--embedding_lr_scale the run was started with (1 or not)")
    optimizer.load_state_dict(checkpoint["optimizer"])
    for param, state in optimizer.state.items():
        if any(torch.is_tensor(v) and v.ndim and v.shape != param.shape for v in state.values()):
            raise UsageError(f"{path} [optimizer]: moment tensors of other shapes than their parameters")


def restore_warp(checkpoint, warp, warn, rank=0, world_size=1):
    """Take the checkpoint's time-warp fit into `warp`, unless the run drops the warp, adds it, or changed the
    noise range or -rho (then the fit starts afresh); each of those is warned about. Each rank takes its own window
    (the losses observed since the last fit); under another number of processes rank 0 takes their sum and the others
    start empty, so that the next fit counts each observation once (a checkpoint older than the windows kept rank 0's
    alone)."""
    saved = checkpoint.get("time_warp")
    if warp is None:
        if saved:
            warn("the run was trained with --time_warp and now without: its fitted warp is dropped from the next "
                 "checkpoint (sample.py --grid warped will refuse it); add --time_warp to keep it")
    elif not saved:
        warn("--time_warp is new in this run: its warp is fitted from here")
    elif any(saved[k] != getattr(warp, k) for k in ("sigma_min", "sigma_max", "rho", "bins")):
        warn("the noise range or -rho changed: the checkpoint's time warp is dropped and fitted afresh")
    else:
        warp.load_state_dict(saved)
        windows = checkpoint.get("time_warp_windows") or [saved["window"]]
        own = windows[rank] if len(windows) == world_size else \
            sum(windows) if rank == 0 else torch.zeros_like(windows[0])
        warp.window.copy_(own)


def restore_budget(checkpoint, budget, warn):
    """Continue the checkpoint's --time_budget (its time spent and fitted end) in `budget`; a changed budget keeps
    the time spent and fits its end afresh, with a warning, as does one added or dropped on resume."""
    saved = checkpoint.get("time_budget")
    if budget is None:
        if saved:
            warn("the run had a --time_budget and now has none: it trains to --max_steps")
        return
    if not saved:
        warn("--time_budget is new in this run: it counts from here and fits the schedule's end afresh")
        return
    budget.spent = saved["spent"]
    if saved["seconds"] == budget.seconds:
        budget.end_step = saved["end_step"]
    else:
        warn(f"--time_budget changed from {saved['seconds'] / 60:g} minutes: the time spent counts, the schedule's "
             "end is fitted afresh")


def restore_rng(checkpoint, args, rank, world_size, warn, device):
    """Restore this rank's generators (its GPU's on a CUDA `device`); under another number of processes, seed new
    ones per rank and step (each rank still draws its own noise) and say what that changes."""
    ranks = checkpoint.get("rng_ranks", [checkpoint["rng"]])
    if len(ranks) == world_size:
        set_rng_state(ranks[rank], device)
        return
    warn(f"the run had {len(ranks)} process(es), now {world_size}: the data position and the rows a step continue, "
         "the noise is drawn afresh, so the run no longer matches an uninterrupted one")
    seed_all(args.seed + 1_000_003 * rank + 7919 * checkpoint["step"])


# The folder itself

def folder_tokenizer(model_dir):
    """The path of a run folder's tokenizer copy: tokenizer.json (a Hugging Face tokenizer) where there is one, else
    tokenizer.model (SentencePiece)."""
    path = os.path.join(model_dir, HFTokenizer.file_name)
    return path if os.path.isfile(path) else os.path.join(model_dir, Tokenizer.file_name)


def prepare_model_dir(args, tokenizer):
    """Create the model folder with a copy of the tokenizer; refuse a different tokenizer on resume, a folder that
    cannot take a checkpoint (read-only, or a directory where a file goes) before step 1, an exported folder (its
    config.json would be overwritten), and kept checkpoints without ckpt.pt; move aside the metrics of an earlier run
    that never saved."""
    folder = args.model_dir
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"-mdir {folder}: exists and is not a folder")
    if os.path.isfile(os.path.join(folder, EXPORTED)) and not os.path.exists(os.path.join(folder, CHECKPOINT)):
        raise UsageError(f"-mdir {folder}: an exported folder (export.py), not a run folder; train into another "
                         f"folder")
    for name in (CHECKPOINT, tokenizer.file_name, "args.json", "config.json", "metrics.jsonl"):
        path = os.path.join(folder, name)
        if os.path.exists(path) and not os.path.isfile(path):
            raise UsageError(f"-mdir {folder}: {name} there is not a file")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CHECKPOINT + ".tmp"), "wb"):  # found now, not at the first save
            pass
        os.remove(os.path.join(folder, CHECKPOINT + ".tmp"))
        resumable = os.path.exists(os.path.join(folder, CHECKPOINT))
        other = {Tokenizer.file_name, HFTokenizer.file_name} - {tokenizer.file_name}
        for name in other:
            if os.path.exists(os.path.join(folder, name)):
                if resumable:
                    raise UsageError(f"-spm {tokenizer.path}: differs from the tokenizer this run in {folder} was "
                                     f"started with (its {name})")
                os.remove(os.path.join(folder, name))  # a start that never saved (--max_steps 0, a crash): no run
        copy_tokenizer(tokenizer.path, os.path.join(folder, tokenizer.file_name), folder, replace=not resumable)
        kept = sorted(f for f in os.listdir(folder) if KEPT.fullmatch(f))
        if kept and not resumable:
            raise UsageError(f"-mdir {folder}: holds {kept[-1]} and others but no {CHECKPOINT}; copy the one to "
                             f"resume from to {CHECKPOINT}, or train in another folder")
        metrics = os.path.join(folder, "metrics.jsonl")
        if os.path.exists(metrics) and not resumable:
            old = next(name for name in (f"{metrics}.old{n or ''}" for n in range(10**6)) if not os.path.exists(name))
            os.replace(metrics, old)  # a run that never saved: its lines would mix with this one's
            print(f"warning: {metrics} of an earlier run without a checkpoint moved to {os.path.basename(old)}",
                  file=sys.stderr)
    except OSError as e:
        raise UsageError(f"-mdir {folder}: {e.strerror}") from None


def copy_tokenizer(tokenizer_path, copy, folder, replace=False):
    """Copy the tokenizer into the run folder; UsageError if a different one is there already, unless `replace` (a
    folder without a checkpoint: a start that never saved is no run to protect)."""
    if os.path.exists(copy) and filecmp.cmp(copy, tokenizer_path, shallow=False):
        return
    if os.path.exists(copy) and not replace:
        raise UsageError(f"-spm {tokenizer_path}: differs from the tokenizer this run in {folder} was started with")
    shutil.copyfile(tokenizer_path, copy)


def write_run_files(args, model):
    """args.json (the exact arguments) and config.json (the model and sampling settings) beside the checkpoint."""
    with open(os.path.join(args.model_dir, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2)
    with open(os.path.join(args.model_dir, "config.json"), "w") as f:
        json.dump({"model": dataclasses.asdict(model.cfg), "sampling": sampling_config(args)}, f, indent=2)


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
    for old in sorted(f for f in os.listdir(folder) if KEPT.fullmatch(f))[:-keep]:
        os.remove(os.path.join(folder, old))
