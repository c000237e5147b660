"""The training run as train.py and bench.py share it: the builders of its parts from the flags (flags.py), the
time budget, and one optimiser step (forward, loss, backward, clipping, the update, the EMAs and the time warp's
fit). The loop, checkpoints and samples stay in train.py."""
import inspect
import time
from dataclasses import dataclass, field

import torch

from corpus import load_corpus
from data import PackedBatches, PackedRows
from diagnostics import level_edges, level_figures, level_sums
from flags import FIT_STEPS, ema_rates, warmup_steps
from model import ModelConfig, ScoreLM
from objectives import training_objective
from sharding import check_sharding, gradient_sync, plain_norm, sharded_training_forward
from timewarp import TimeWarp
from utils import CommandError, all_reduce_sum, autocast, ema_update, lr_at, resolve_precision


@dataclass
class TrainingState:
    """What an optimiser step changes and a checkpoint holds: the model, its optimizer and gradient scaler, the
    EMA weights ({rate: state dict}), the data loader, the objective (objectives.py), the time warp (or None), and
    `runner`, what the forward calls (training_runner: the model's training forward, in DDP and compiled where
    asked)."""
    model: ScoreLM
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    emas: dict
    loader: PackedBatches
    objective: object = None
    warp: TimeWarp = None
    runner: torch.nn.Module = None
    budget: "TimeBudget" = None
    level_edges: torch.Tensor = None  # (K + 1,) the noise-level buckets of the loss by level (diagnostics.py)

    def schedule_end(self, args):
        """The step where the learning-rate schedule ends and the run stops: --max_steps, or earlier the end that
        --time_budget fitted."""
        fitted = None if self.budget is None else self.budget.end_step
        return args.max_steps if fitted is None else min(fitted, args.max_steps)


clock = time.perf_counter  # the wall clock of --time_budget (tests replace it)


@dataclass
class TimeBudget:
    """--time_budget: `seconds` of wall clock for the whole run, resumes included (`spent` so far). Once FIT_STEPS steps
    after the first of this process have been timed, end_step is fitted to the steps their rate leaves room for (the
    least over the ranks, so that they agree); the schedule then ends there. The rate of so few steps is noisy (a few
    seconds of anything else on the machine move it), so the end is fitted again at 2, 4, 8, ... times FIT_STEPS timed
    steps from the rate of the latest half of them, as long as the run is in the first half of its schedule; after that
    the end stays, so the decay is not moved late in the run. state_dict() goes into the checkpoint, so a resumed run
    keeps the same end (it refits only while still in that first half). `device`: the run's, where the ranks agree on
    the end (NCCL reduces CUDA tensors only)."""
    seconds: float
    device: torch.device = torch.device("cpu")
    spent: float = 0.0
    end_step: int = None
    timed: list = field(default_factory=list)  # this process's step times, seconds
    last: float = None  # the clock at the end of the last step

    def start(self):
        """Start timing (the training loop begins)."""
        self.last = clock()

    def tick(self, step):
        """The step that reached `step` has ended: record its time (record); True when it fitted end_step."""
        now = clock()
        fitted = self.record(step, now - self.last)
        self.last = now
        return fitted

    def record(self, step, seconds):
        """Count the `seconds` of the step that reached `step`, and fit end_step when this process has timed
        FIT_STEPS * 2^k steps after its first (each time while `step` is below half of the end fitted before);
        returns True when this step fitted it."""
        self.spent += seconds
        self.timed.append(seconds)
        timed = len(self.timed) - 1  # the first step is left out: it starts the loader's workers
        k = timed // FIT_STEPS
        if timed % FIT_STEPS or k == 0 or k & (k - 1):
            return False  # not FIT_STEPS times a power of two
        if self.end_step is not None and step >= self.end_step / 2:
            return False
        window = self.timed[1:] if k == 1 else self.timed[-(timed // 2):]  # all timed steps, then the latest half
        rate = len(window) / max(sum(window), 1e-9)  # steps per second
        end = torch.full((), float(step + int(rate * max(self.seconds - self.spent, 0.0))), device=self.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(end, op=torch.distributed.ReduceOp.MIN)
        self.end_step = int(end)
        return True

    def exhausted(self):
        """Whether the budget's time is spent."""
        return self.spent >= self.seconds

    def state_dict(self):
        """What the checkpoint keeps (floats and an int): the budget, the time spent and the fitted end; this
        process's step times are not kept, so a resumed run in the first half of its schedule refits from its own."""
        return {"seconds": self.seconds, "spent": self.spent, "end_step": self.end_step}


def build_loader(args, tokenizer, rank=0, world_size=1):
    """Batches of packed rows from the corpus's token cache (built here on the first run over it); with
    several processes, this rank's rows of each global batch."""
    cache = load_corpus(args.data_path, tokenizer, args.cache_dir, args.encoding_errors, progress=args.progress)
    rows = PackedRows(cache, args.sequence_length, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id,
                      seed=args.seed, expand_prob=args.expand_prob, cond_prob=args.cond_prob)
    return PackedBatches(rows, args.batch_size, args.num_workers, rank, world_size)


def build_model(args, vocab_size, device):
    """ScoreLM of the run's architecture flags, on `device`."""
    cfg = ModelConfig(vocab_size=vocab_size, embedding_dim=args.embedding_dim, model_dim=args.model_dim,
                      num_layers=args.num_layers, num_heads=args.num_heads, dropout=args.dropout_prob,
                      causal=args.objective == "ar", masked=args.objective == "mdlm", self_cond=args.self_cond > 0,
                      output_prior=args.output_prior, output_prior_scale=args.output_prior_scale,
                      conditioning=args.conditioning)
    return ScoreLM(cfg).to(device)


def build_optimizer(model, args):
    """AdamW (--beta2, --adam_eps) with weight decay on matrices only (biases, norms and frozen buffers excluded);
    with an --embedding_lr_scale other than 1, the token embeddings in a group of their own at that multiple of the
    learning rate ("lr_scale"), without weight decay (at 0 they stay as they started: AdamW's step is lr times its
    update, and its decay 1 - lr * 0)."""
    params = [p for p in model.parameters() if p.requires_grad]
    own = [model.embedding.weight] if args.embedding_lr_scale != 1 else []
    groups = [{"params": [p for p in params if p.ndim >= 2 and all(p is not q for q in own)],
               "weight_decay": args.weight_decay, "lr_scale": 1.0},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr_scale": 1.0}]
    if own:
        groups.append({"params": own, "weight_decay": 0.0, "lr_scale": args.embedding_lr_scale})
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, args.beta2), eps=args.adam_eps)


def build_state(args, tokenizer, device, rank=0, world_size=1):
    """A fresh TrainingState for the run: loader, model (initialised from the global generator), optimizer, scaler,
    one EMA per -ema rate, the objective and the time warp with --time_warp; its runner is set once the run is
    restored, by training_runner, except with --fsdp: then the model is sharded here, inside its TrainingForward (the
    runner), before the optimizer and the EMAs are built over the shards. Raises UsageError for --fsdp in a single
    process or on a device other than CUDA or the CPU."""
    loader = build_loader(args, tokenizer, rank, world_size)
    model = build_model(args, tokenizer.vocab_size, device)
    objective = training_objective(args)
    runner = None
    if args.fsdp:  # before the optimizer and the EMAs, which then hold shards
        check_sharding(world_size, device)
        runner = sharded_training_forward(TrainingForward(model, objective), model.blocks, device,
                                          resolve_precision(args.precision, device))
    emas = {rate: {k: v.detach().clone() for k, v in model.state_dict().items()} for rate in ema_rates(args)}
    warp = TimeWarp(args.sigma_min, args.sigma_max, args.rho, device=device, shape=args.warp_shape) \
        if args.time_warp else None
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    budget = None if args.time_budget is None else TimeBudget(60 * args.time_budget, device)
    edges = level_edges(objective)
    return TrainingState(model, build_optimizer(model, args), scaler, emas, loader, objective, warp, runner, budget,
                         level_edges=None if edges is None else torch.tensor(edges, device=device))


class TrainingForward(torch.nn.Module):
    """The training forward, a batch and its noise to the loss, as one module, so that DistributedDataParallel and
    torch.compile wrap all of it: (ids, segment_ids, cond_mask, weight, noise) -> (loss, ce (B, L), hit (B, L)) as
    the objective's loss returns them (objectives.py), weight (B, L) each position's share of the loss, noise what the
    objective's draw returned for the batch."""

    def __init__(self, model, objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, ids, segment_ids, cond_mask, weight, noise):
        return self.objective.loss(self.model, ids, segment_ids, cond_mask, weight, noise)


def training_runner(model, objective, args, world_size=1, sharded=None):
    """What the training steps call: TrainingForward(model, objective), in DistributedDataParallel with several processes,
    compiled with --compile (rows have one fixed shape, so it compiles once; the chunked head runs eagerly between
    graphs); `sharded`, an --fsdp run's TrainingForward (build_state's), as it is. The attention kernel is settled
    first (ScoreLM.settle_attention), so that the compiled forward checks nothing. Weights, EMA and checkpoints always
    come from `model` itself."""
    model.settle_attention()
    if sharded is not None:
        return sharded
    runner = TrainingForward(model, objective)
    if world_size > 1:  # the model's buffers (the rotary embedding's cache) need no broadcast at every forward
        ddp = torch.nn.parallel.DistributedDataParallel
        # the flag's name since torch 2.13 (the old one still works, with a warning at every start)
        new_name = "forward_sync_buffers" in inspect.signature(ddp).parameters
        runner = ddp(runner, **{"forward_sync_buffers" if new_name else "broadcast_buffers": False})
    return torch.compile(runner, dynamic=False) if args.compile else runner


# One optimiser step

class Diverged(CommandError):
    """Too many optimiser steps in a row had a non-finite loss or gradient; the last checkpoint is intact (exit
    status 3)."""
    status = 3


WARP_FIT_INTERVAL = 10  # steps between refits of the time warp (each a host sync)


def batch_to(batch, device):
    """A batch's ids, segment_ids and cond_mask (each (B, L)) on `device`: on a GPU as one copy from pinned memory
    that does not wait for the device (three blocking copies would each stall the host); unchanged on the CPU."""
    keys = ("ids", "segment_ids", "cond_mask")
    if device.type != "cuda":
        return tuple(batch[k].to(device) for k in keys)
    stacked = torch.stack([batch[k].long() for k in keys]).pin_memory().to(device, non_blocking=True)
    ids, segment_ids, cond_mask = stacked.unbind()
    return ids, segment_ids, cond_mask.bool()


def coins(seed, step, micro):
    """The generator of the coin flips of micro-batch `micro` of step `step` (objectives.py) when several processes
    train: seeded alike on every rank, from the run's seed and the micro-batch alone (nothing to checkpoint)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + micro)


def train_step(state, batch, args, device, weight, step=0, micro=0):
    """Forward (under the run's autocast) and backward of micro-batch `micro` of optimiser step `step`: the objective
    draws the batch's noise (noise levels from the time warp when the run has one; with several processes its coins
    from coins(), alike on every rank) and its loss is summed over the
    objective's target positions, multiplied by `weight` (so that micro-batches and ranks add up to the mean over
    every loss position of the step). Returns device tensors: summed cross-entropy (nats), right predictions
    and the positions they are counted over (objective.scored: for masked diffusion the masked ones), and what the
    loss by level and the time warp observe (objective.observed: (level, ce, counted), or None)."""
    ids, segment_ids, cond_mask = batch_to(batch, device)
    objective = state.objective
    shared = coins(args.seed, step, micro) if state.loader.world_size > 1 else None
    noise = objective.draw(state.model, ids, segment_ids, cond_mask, step, state.warp, shared)
    targets = objective.targets(segment_ids, cond_mask)
    with autocast(device, args.precision):
        loss, ce, hit = state.runner(ids, segment_ids, cond_mask, targets * weight, noise)  # (), (B, L), (B, L)
    state.scaler.scale(loss).backward()
    scored = objective.scored(noise, targets)
    correct = (hit & scored).sum()
    return (ce * targets).sum(), correct, scored.sum(), objective.observed(noise, ce, targets)


def host_counts(batches, pad_id):
    """Real (non-fill) tokens, text tokens (neither fill nor padding) and row slots of the batches, counted on the
    host (no device sync)."""
    counts = {"tokens": 0, "text": 0, "slots": 0}
    for batch in batches:
        real = batch["segment_ids"] > 0
        counts["tokens"] += int(real.sum())
        counts["text"] += int((real & (batch["ids"] != pad_id)).sum())
        counts["slots"] += batch["ids"].numel()
    return counts


def optimizer_step(state, args, device, step):
    """One optimiser step of `state` over args.accumulation_steps micro-batches: gradients unscaled (fp16), clipped,
    checked, then the AdamW update and the EMAs. A step whose loss or gradient is not finite changes neither
    weights, EMA, optimizer state nor (the caller's) schedule; the time warp draws the noise levels, observes the
    losses of applied steps only, and is refitted every WARP_FIT_INTERVAL steps. Returns (status, stats): status
    "applied", "overflow" (fp16: finite loss, infinite gradient; the scaler backs off) or "bad"; stats a dict of
    device tensors (loss, correct, targets: the positions correct counts over, grad_norm; levels, the (2, K)
    cross-entropy sums and counts by noise level, diagnostics.level_sums, for an objective with levels), host numbers
    (lr; tokens, text and slots of the rows) and `batch`, the step's first micro-batch as the loader gave it (for
    train.py's probe)."""
    model, loader, optimizer, scaler = state.model, state.loader, state.optimizer, state.scaler
    end = state.schedule_end(args)
    lr = lr_at(step, args.learning_rate, warmup_steps(args, end), end)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    batches = [next(loader) for _ in range(args.accumulation_steps)]
    stats = {"lr": lr, **host_counts(batches, loader.rows.pad_id), "batch": batches[0]}
    # every loss position of the step, on every rank, weighs the same; DDP and fully_shard average gradients over the
    # ranks
    local = sum(int(state.objective.targets(b["segment_ids"], b["cond_mask"]).sum()) for b in batches)  # host
    targets = all_reduce_sum(torch.full((), float(local), device=device))  # a fill, not a copy from the host
    weight = loader.world_size / targets.clamp_min(1.0)
    sums, observed = torch.zeros(3, device=device), []  # summed cross-entropy, right predictions, scored positions
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with gradient_sync(state.runner, last or loader.world_size == 1):
            ce_sum, correct, scored, losses = train_step(state, batch, args, device, weight, step, i)
        sums += torch.stack([ce_sum, correct.float(), scored.float()])
        observed.append(losses)
    all_reduce_sum(sums)
    stats.update(loss=sums[0] / targets.clamp_min(1.0), correct=sums[1], targets=sums[2])  # accuracy: over scored
    if state.level_edges is not None:  # this rank's micro-batches only: the rank-0 log line shows its own
        stats["levels"] = sum(level_sums(*seen, state.level_edges) for seen in observed)
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    stats["grad_norm"] = plain_norm(torch.nn.utils.clip_grad_norm_(params, args.gradient_clipping or float("inf")))
    # the one host sync of a step: whether to apply it (the metrics stay on the device until a log line)
    finite_loss, finite_grad = torch.isfinite(torch.stack([stats["loss"], stats["grad_norm"].float()])).tolist()
    status = "applied" if finite_loss and finite_grad else \
        "overflow" if finite_loss and args.precision == "fp16" else "bad"
    if status == "applied":
        apply_step(state, params, step, observed)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return status, stats


def apply_step(state, params, step, observed):
    """The update of a finite step: AdamW (through the scaler), every EMA, and the time warp's observations of the
    step's losses (observed: (sigma, ce, counted) per micro-batch), refitted every WARP_FIT_INTERVAL steps."""
    state.scaler.step(state.optimizer)
    names = [n for n, p in state.model.named_parameters() if p.requires_grad]
    for rate, ema in state.emas.items():
        ema_update([ema[n] for n in names], params, rate, step)
    if state.warp is not None:
        for sigma, ce, targets in [seen for seen in observed if seen is not None]:
            state.warp.observe(sigma, ce, targets)
        if (step + 1) % WARP_FIT_INTERVAL == 0:
            all_reduce_sum(state.warp.window)  # every rank fits the same warp
            state.warp.fit()


class IntervalMetrics:
    """Sums over the steps of one log interval, kept on the device until written (one host sync per line). With
    `edges` (the objective's noise-level buckets, (K + 1,)) and their `level_name`, also the loss by level."""

    def __init__(self, device, edges=None, level_name=None):
        self.device, self.started, self.run_started = device, time.perf_counter(), time.perf_counter()
        self.edges, self.level_name = edges, level_name
        self.reset()

    def reset(self):
        """Start a new interval: zero sums, the clock from now."""
        levels = 0 if self.edges is None else 2 * (len(self.edges) - 1)
        self.sums = torch.zeros(4 + levels, device=self.device)  # loss, correct, targets, grad_norm; levels
        self.steps = self.tokens = self.text = self.slots = self.skipped = 0
        self.started = time.perf_counter()

    def add(self, stats):
        """Add one applied step's stats (optimizer_step's dict: device tensors loss, correct, targets, grad_norm and
        levels; ints tokens, text, slots) without a host sync."""
        step = [stats["loss"], stats["correct"], stats["targets"], stats["grad_norm"].float()]
        self.sums += torch.cat([torch.stack(step)] + ([stats["levels"].flatten()] if self.edges is not None else []))
        self.steps, self.tokens = self.steps + 1, self.tokens + stats["tokens"]
        self.text, self.slots = self.text + stats["text"], self.slots + stats["slots"]

    def pause(self, seconds):
        """Leave `seconds` (a probe's) out of the interval's tokens per second."""
        self.started += seconds

    def line(self, step, lr, epoch):
        """The metrics of the interval as a dict, and a fresh interval."""
        sums = self.sums.tolist()  # the one host sync per log interval
        loss, correct, targets, grad_norm = sums[:4]
        elapsed = time.perf_counter() - self.started
        line = {"step": step, "epoch": epoch, "loss": loss / self.steps, "accuracy": correct / max(targets, 1),
                "lr": lr, "grad_norm": grad_norm / self.steps, "tokens_per_s": self.tokens / elapsed,
                "packing_efficiency": self.text / max(self.slots, 1), "skipped_steps": self.skipped,
                "seconds": time.perf_counter() - self.run_started, "time": time.time()}
        if self.edges is not None:
            line.update(level_figures(torch.tensor(sums[4:]).view(2, -1), self.edges, self.level_name))
        self.reset()
        return line
