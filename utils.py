"""Leaf helpers: command lines, seeding, devices, shapes, EMA, learning rate, checkpoints, metrics. No project
imports."""
import argparse
import ctypes
import json
import math
import os
import pickle
import random
import secrets
import sys
import time
import warnings

import torch


class CommandError(Exception):
    """An error that ends a command with its message on one line of stderr and exit status `status`."""
    status = 1


class UsageError(CommandError):
    """Bad input from the user (a flag, a file, a checkpoint): one line naming it, exit status 2."""
    status = 2


def run_command(main, interrupted=None):
    """Run an entry point's main() as a command: a CommandError ends it with "error: <message>" on one line and its
    status; a reader that closed the pipe (head, a pager) ends it quietly; Ctrl-C ends it with status 130 and the
    message `interrupted`, if any, instead of a traceback."""
    try:
        main()
    except CommandError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.status) from None
    except BrokenPipeError:
        sys.stderr.close()
        os._exit(0)
    except KeyboardInterrupt:
        if interrupted:
            print(interrupted, file=sys.stderr)
        raise SystemExit(130) from None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help that keeps the description's line breaks and adds each flag's default where it has one (not None, not
    a switch that is off) and its help does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        off = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or off or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse for this project's commands: --help as HelpFormatter writes it, and an error is one line on stderr
    naming the flag ("error: ...; see --help"), exit status 2, without the usage of every flag before it."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def seed_all(seed):
    """Seed Python's and torch's global generators."""
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name):
    """'auto' picks cuda, then mps, then cpu; any other name is passed to torch.device.

    Raises UsageError for a name torch does not know or a device that is not available here.
    """
    mps = getattr(torch.backends, "mps", None)
    mps_ok = mps is not None and mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:1, mps)") from None
    cuda_ok = torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    if (device.type == "cuda" and not cuda_ok) or (device.type == "mps" and not mps_ok) \
            or device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: not available on this machine")
    return device


def keep_freed_memory(pad_bytes=1 << 30):
    """Ask glibc's malloc to keep up to `pad_bytes` of freed heap memory for reuse rather than hand it back to the
    system (mallopt M_TOP_PAD). Every sampling or training step frees and allocates the same large tensors, such as
    the (B, L, V) logits, and returning those pages only to fault them back in is slow on the CPU (RESULTS.md
    measures it). No-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-2, pad_bytes)  # -2: M_TOP_PAD
    except (OSError, AttributeError):
        pass


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_CHOICES = ("auto", *PRECISIONS)  # what --precision accepts; "auto" is resolved per device


# the values of ONEDNN_MAX_CPU_ISA below oneDNN's first instruction set with bf16 products (AVX512_CORE_BF16)
ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def onednn_pinned_below_bf16():
    """Whether oneDNN, which computes the CPU's bf16 and fp16 matrix products, is pinned below the instructions that
    compute them (ONEDNN_MAX_CPU_ISA, or its older name DNNL_MAX_CPU_ISA, set to AVX2, say): it then converts every
    operand, as on a CPU without them. oneDNN ignores a value it does not know, and so does this check; ATen's own pin
    (ATEN_CPU_CAPABILITY) leaves the products fast (RESULTS.md, "Emulated bf16 and fp16")."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    return isa.upper() in ONEDNN_ISAS_WITHOUT_BF16


def native_bf16(device):
    """Whether `device` computes bf16 in hardware: a CUDA GPU with bf16 (not emulating it), or a CPU with AVX-512
    bf16 or AMX instructions whose matrix products are not pinned below them (onednn_pinned_below_bf16); elsewhere
    bf16 is emulated, many times slower than fp32."""
    if device.type == "cuda":  # Ampere (compute capability 8) and later; ROCm GPUs all have it. torch's own
        # is_bf16_supported() asks the current device, not this one, and counts emulation by default
        return torch.cuda.is_available() and (bool(torch.version.hip) or
                                              torch.cuda.get_device_properties(device).major >= 8)
    if device.type == "cpu":
        checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return any(check is not None and check() for check in checks) and not onednn_pinned_below_bf16()
    return False


def native_fp16(device):
    """Whether `device` computes fp16 in hardware: any CUDA GPU, or a CPU with AMX fp16 instructions whose matrix
    products are not pinned below them (torch has no check of AVX-512 fp16 alone, so such a CPU counts as emulating
    it); other CPUs emulate fp16, many times slower than fp32."""
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        check = getattr(torch.cpu, "_is_amx_fp16_supported", None)
        return check is not None and check() and not onednn_pinned_below_bf16()
    return False


def resolve_precision(precision, device):
    """--precision as run on `device`: "auto" is bf16 where the device computes it in hardware (native_bf16), else
    fp32; "fp32", "bf16" and "fp16" stay as given."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


EMULATION_SLOWDOWN = {"bf16": "15x", "fp16": "18x"}  # RESULTS.md, "Emulated bf16 and fp16" (kernels pinned to AVX2)


def warn_if_emulated(precision, device):
    """Print one warning line on stderr if the CPU or CUDA `device` does not compute --precision `precision` in
    hardware (bf16 without native_bf16, fp16 without native_fp16) and return it (else None): the run goes on,
    emulated, many times slower than in fp32 (RESULTS.md, "Emulated bf16 and fp16"). Other devices are not judged."""
    native = {"bf16": native_bf16, "fp16": native_fp16}.get(precision)
    if native is None or device.type not in ("cpu", "cuda") or native(device):
        return None
    where = "CPU" if device.type == "cpu" else "GPU"
    warning = (f"warning: --precision {precision} is emulated on this {where} (no {precision} instructions in the "
               f"kernels it runs): expect it to run many times slower than fp32 (a training step "
               f"{EMULATION_SLOWDOWN[precision]} in RESULTS.md); --precision auto picks "
               f"{resolve_precision('auto', device)} here")
    print(warning, file=sys.stderr)
    return warning


def autocast(device, precision):
    """The one autocast context for every forward pass: `precision` "fp32" (off), "bf16", "fp16" or "auto"
    (resolve_precision) on device.type. Code that must stay in fp32 inside it (noise levels, rotary phases) disables
    it locally."""
    precision = resolve_precision(precision, device)
    return torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")


def distributed_setup(device_name):
    """Under torchrun (WORLD_SIZE > 1) join the process group, NCCL with one GPU per rank (rank_gpu) on CUDA, else
    gloo; returns (rank, world_size, device). A single process returns (0, 1, resolve_device(name))."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        shared = "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1  # torchrun's
        device = rank_gpu(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count(), shared)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world_size, device


def distributed_teardown(world_size):
    """Leave the process group set up by distributed_setup (a no-op in a single process), then give the group's
    threads a tenth of a second to finish. A gloo worker thread lets go of a finished collective's tensors after it
    has woken the waiting rank, and letting go of a tensor that Python also holds takes the GIL; a thread that asks for
    it once the interpreter has begun to finalise exits inside a destructor, and the process aborts (SIGABRT,
    "terminate called without an active exception") after a run that finished. The process group outlives
    destroy_process_group (DTensor's caches hold --fsdp's device mesh), so its threads cannot be joined; sleeping
    releases the GIL to them."""
    if world_size > 1:
        torch.distributed.destroy_process_group()
        time.sleep(0.1)


def rank_gpu(local_rank, visible, shared=False):
    """The GPU of the process with LOCAL_RANK `local_rank` among the `visible` GPUs it sees: the one at its local rank,
    or the only one it sees where each process has its own (a scheduler's doing, as SLURM's --gpus-per-task), unless
    its machine's processes are `shared`: started by torchrun, which gives them all the same GPUs. Raises UsageError
    when they outnumber the GPUs they see."""
    if local_rank < visible:
        return torch.device("cuda", local_rank)
    if visible == 1 and not shared:
        return torch.device("cuda", 0)
    raise UsageError(f"LOCAL_RANK {local_rank}: this process sees {visible} GPU{'s' * (visible != 1)}; start one "
                     f"process per GPU (torchrun --nproc-per-node {visible})")


def all_reduce_sum(tensor):
    """Sum `tensor` over the ranks in place (a no-op in a single process); returns it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def append_dims(x, ndim):
    """Append trailing singleton dimensions to `x` until it has `ndim` dimensions (k-diffusion's helper)."""
    missing = ndim - x.ndim
    if missing < 0:
        raise ValueError(f"tensor has {x.ndim} dims, more than the target {ndim}")
    return x[(...,) + (None,) * missing]


def row_lengths(ids, segment_ids):
    """Each row's length without its trailing padding (segment 0): a list of B ints; every row is L long where
    segment_ids is None. ids (B, L); segment_ids (B, L) or None."""
    return [ids.shape[1]] * len(ids) if segment_ids is None else (segment_ids != 0).sum(-1).tolist()


def row_generators(seeds):
    """One CPU torch.Generator per row, seeded by its seed (ints)."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def row_draws(generators, lengths, length, *tail, dtype=torch.float32, uniform=False):
    """Random values of a batch, each row from its own generator and for its own length only (EDM's
    StackedRandomGenerator), so that a row's stream does not depend on the rows beside it or their lengths: (B,
    length, *tail) standard normal (uniform on [0, 1) with `uniform`) in `dtype` on the CPU, zero past each row's
    length. generators: B torch.Generators; lengths: B ints <= length."""
    draw = torch.rand if uniform else torch.randn
    drawn = torch.zeros(len(generators), length, *tail, dtype=dtype)
    for row, g, n in zip(drawn, generators, lengths):
        row[:n] = draw(n, *tail, generator=g, dtype=dtype)
    return drawn


@torch.no_grad()
def ema_update(ema_params, params, rate, step):
    """One EMA step, ema <- d * ema + (1 - d) * param, with d = min(rate, (1 + step) / (10 + step)).

    The warm-up of d keeps early averages from being dominated by the random initialisation.
    `ema_params` and `params` are matching lists of tensors; `step` counts optimiser steps from 0.
    """
    decay = min(rate, (1 + step) / (10 + step))
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def lr_at(step, lr, warmup_steps, decay_steps, min_lr_ratio=0.1):
    """Learning rate at optimiser step `step`: linear warm-up to `lr`, cosine decay to `lr * min_lr_ratio`
    at `decay_steps`, constant after that (it never rises again)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return lr * min_lr_ratio
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(checkpoint, path):
    """Write a plain dict with torch.save to `path` atomically: a temporary file in the same folder, fsynced,
    then renamed over `path`, so an interruption leaves the previous checkpoint whole."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


CHECKPOINT_KEYS = ("model", "config", "sampling", "step")


def load_checkpoint(path, map_location="cpu", needs=CHECKPOINT_KEYS):
    """Load a checkpoint written by save_checkpoint with weights_only=True (no pickled code runs).

    Raises UsageError naming `path` if it is missing, empty or cut short, carries pickled objects other than
    tensors and plain data (refused before anything in it runs), or is not a dict with the keys in `needs`.
    """
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no checkpoint there")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
            raise UsageError(f"{path}: empty, cut short or not a torch checkpoint (no zip header)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on foreign pickles; the error below says enough
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(f"{path}: refused: it holds pickled objects other than tensors and plain data, which "
                         "could run code when loaded") from None
    except Exception as e:  # torch raises several types for files that are empty, cut short or foreign
        raise UsageError(f"{path}: empty, cut short or not a torch checkpoint ({type(e).__name__})") from None
    missing = [key for key in needs if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise UsageError(f"{path}: not a checkpoint of this project (missing {', '.join(missing)})")
    return checkpoint


def load_state_dict_strict(module, state_dict, what):
    """module.load_state_dict(strict=True), but a mismatch raises UsageError listing the missing and
    unexpected keys of `what` (a checkpoint path and entry) instead of a long traceback."""
    check_state_dict(module.state_dict(), state_dict, what)
    module.load_state_dict(state_dict, strict=True)


def check_state_dict(expected, state_dict, what):
    """Raise UsageError naming `what` unless `state_dict` has exactly the keys of `expected`, each a tensor of
    the same shape."""
    if not isinstance(state_dict, dict):
        raise UsageError(f"{what}: not a dict of tensors")
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise UsageError(f"{what}: keys do not match the model (missing {missing}, unexpected {unexpected})")
    shapes = [f"{k} {tuple(state_dict[k].shape)} for {tuple(v.shape)}" for k, v in expected.items()
              if not torch.is_tensor(state_dict[k]) or state_dict[k].shape != v.shape]
    if shapes:
        raise UsageError(f"{what}: tensors of other shapes than the model's: {'; '.join(shapes[:5])}")


class MetricsWriter:
    """Append-only JSON-lines log: one object per call to `write`, flushed at once; with `tensorboard`, the
    numbers also go to a TensorBoard folder beside the file, keyed by "step"; with `wandb` (a dict of project, name
    and config), also to a Weights & Biases run whose id is kept beside the file (wandb_id), so that a resumed run
    continues it. wandb is imported only then.

    Raises UsageError if tensorboard or wandb is asked for and its package is not installed.
    """

    def __init__(self, path, tensorboard=False, wandb=None):
        self.path, self.board, self.wandb = path, None, None
        folder = os.path.dirname(path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.board = SummaryWriter(os.path.join(folder, "tensorboard"))
        if wandb is not None:
            try:
                import wandb as wandb_package
            except ImportError:
                raise UsageError("--wandb needs the wandb package: pip install -r requirements-extra.txt") from None
            self.wandb = wandb_package.init(project=wandb["project"], name=wandb["name"], config=wandb["config"],
                                            id=run_id(os.path.join(folder, "wandb_id")),
                                            resume="allow", dir=folder)

    def write(self, **metrics):
        """Append one JSON object of `metrics` (numbers, strings and lists of them; "step" an int) and flush it."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        numbers = {}  # per-level figures: one scalar each, key/0, key/1, ...
        for key, value in metrics.items():
            if key not in ("step", "time") and isinstance(value, (int, float)):
                numbers[key] = value
            elif isinstance(value, list):
                numbers.update({f"{key}/{i}": item for i, item in enumerate(value) if isinstance(item, (int, float))})
        if self.board is not None:
            for key, value in numbers.items():
                self.board.add_scalar(key, value, metrics["step"])
            self.board.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=metrics["step"])

    def write_samples(self, step, texts):
        """The samples printed at `step` (strings), to the W&B run as a table (the JSON-lines file keeps numbers)."""
        if self.wandb is not None:
            import wandb
            self.wandb.log({"samples": wandb.Table(columns=["step", "text"], data=[[step, t] for t in texts])},
                           step=step)

    def close(self):
        """Close the TensorBoard writer and finish the W&B run, if any (the JSON-lines file is closed after every
        write)."""
        if self.board is not None:
            self.board.close()
        if self.wandb is not None:
            self.wandb.finish()


def run_id(path):
    """The id kept in the file `path`, or a new one (8 random hex digits, as W&B's ids go) written there first."""
    if os.path.isfile(path):
        with open(path) as f:
            return f.read().strip()
    run = secrets.token_hex(4)
    with open(path + ".tmp", "w") as f:
        f.write(run)
    os.replace(path + ".tmp", path)
    return run
