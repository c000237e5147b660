"""Train a score-interpolation diffusion language model on a line-per-example corpus.

    python train.py -d corpus.txt -spm bpe.model -mdir out [--preset tiny|small|base|large] [--max_steps N]
    python train.py --demo

A run started again with the same -mdir resumes from its checkpoint; Ctrl-C stops at the next step and saves.
Exit status: 0 done or stopped by a signal (after saving), 2 bad input, 3 too many bad steps in a row, 130 a second
Ctrl-C (stops at once, without saving).
"""
import copy
import os
import signal
import sys
import time

import torch
from tqdm import tqdm

import checkpoint
from corpus import Tokenizer, build_demo, decode_line, read_lines
from data import sample_layout
from diagnostics import Probe
from diffusion import Grid
from flags import DEMO_DIR, parse_args, warmup_steps
from sampling import draw, sample_length, sampler_settings
from sharding import gathered, is_sharded, local_parameter_count
from training import Diverged, IntervalMetrics, batch_to, build_model, build_state, optimizer_step, training_runner
from utils import (CommandError, MetricsWriter, UsageError, all_reduce_sum, distributed_setup, distributed_teardown,
                   keep_freed_memory, load_checkpoint, resolve_precision, run_command, save_checkpoint, seed_all,
                   warn_if_emulated)


def main(argv=None):
    """Train (or resume) the run described by `argv`, in this process or as one rank of torchrun; raises
    UsageError on bad input."""
    args = parse_args(argv, description=__doc__)
    keep_freed_memory()
    rank, world_size, device = distributed_setup(args.device)
    if args.demo:
        if rank == 0:
            build_demo_corpus()
        barrier(world_size)  # the other ranks read it once it is there
    try:
        run(args, rank, world_size, device)
    except RuntimeError as e:
        if out_of_memory(e):
            raise CommandError(out_of_memory_message(args, device, rank)) from None
        if rank == 0:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"rank {rank}: stopped, another rank failed first ({first})", file=sys.stderr)
        raise SystemExit(1)
    finally:
        distributed_teardown(world_size)


def out_of_memory(error):
    """Whether a RuntimeError is the device's (torch.OutOfMemoryError) or the CPU allocator's running out."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def out_of_memory_message(args, device, rank):
    """The one line that ends a run out of memory: where, the flags to change, and whether a checkpoint is there to
    resume from."""
    where = f"{f'rank {rank}: ' if rank else ''}out of memory on {device} at -bsz {args.batch_size}, rows of " \
            f"{args.sequence_length} tokens"
    advice = (f"halve -bsz and double --accumulation_steps (-bsz {args.batch_size // 2} --accumulation_steps "
              f"{2 * args.accumulation_steps}) for about as many rows a step") if args.batch_size > 1 else \
        "take a smaller --preset or a shorter -slen"
    path = os.path.join(args.model_dir, checkpoint.CHECKPOINT)
    saved = f"{path} is intact and resumes" if os.path.exists(path) else "no checkpoint had been written yet"
    return f"{where}: {advice}; {saved}"


def build_demo_corpus():
    """The demo corpus and tokenizer in demo/data/, built (about 5 s) unless already there."""
    folder = os.path.join(DEMO_DIR, "data")
    if not os.path.isfile(os.path.join(folder, "bpe.model")):
        print(f"building the demo corpus and tokenizer in {folder}/", file=sys.stderr)
        n_train, n_valid = build_demo(folder)
        print(f"{folder}: {n_train:,} train and {n_valid:,} valid sentences", file=sys.stderr)


def run(args, rank, world_size, device):
    """main() once the process (group) is set up: rank 0 builds the token cache and writes every file."""
    state, tokenizer, step = start(args, rank, world_size, device)
    if state.budget is not None and state.budget.exhausted():
        if rank == 0:
            print(f"--time_budget {args.time_budget:g}: spent, at step {step}; nothing to train", file=sys.stderr)
        return
    if step >= state.schedule_end(args):
        if rank == 0:
            fitted = state.schedule_end(args) < args.max_steps  # --time_budget's fitted end came first
            print(f"--time_budget {args.time_budget:g}: the run is at step {step}, where the schedule fitted to the "
                  f"budget ends: nothing to train" if fitted else
                  f"{os.path.join(args.model_dir, checkpoint.CHECKPOINT)}: the run is at step {step}, --max_steps is "
                  f"{args.max_steps}: nothing to train" if step else
                  f"--max_steps {args.max_steps}: nothing to train, no checkpoint written", file=sys.stderr)
        return
    state.runner = training_runner(state.model, state.objective, args, world_size, state.runner)
    path = os.path.join(args.model_dir, checkpoint.CHECKPOINT)

    def save(at_step):
        states = checkpoint.gathered_rng_states(world_size, device)
        entry = checkpoint.checkpoint_dict(state, at_step, args, states)  # of a sharded model, gathered by every rank
        if rank == 0:
            save_checkpoint(entry, path)
            if args.keep:
                checkpoint.keep_recent(path, at_step, args.keep)

    prompts = sample_prompts(args, tokenizer) if rank == 0 else []
    probe = build_probe(state, tokenizer, args) if rank == 0 and args.probe_interval else None
    metrics = metrics_writer(args) if rank == 0 else None
    try:
        with StopOnSignal() as stop:
            step = train(state, tokenizer, args, device, step, save, stop, prompts, probe, metrics)
            save(step)
            signalled = stop_agreed(stop, world_size, device)  # the same answer on every rank, for the gather below
            final = None
            if not signalled and (args.demo or args.sample_interval) and (rank == 0 or is_sharded(state.model)):
                final = sampling_model(state, args, tokenizer.vocab_size, device)
        if rank > 0:
            return
        if signalled:
            print(f"stopped by {stop.requested} at step {step}; run the same command to resume", file=sys.stderr)
        elif stop.out_of_time:
            print(f"--time_budget {args.time_budget:g}: spent at step {step}", file=sys.stderr)
        if final is not None:
            metrics.write_samples(step, print_samples(final, state, tokenizer, args, device, step, prompts))
        print(f"checkpoint: {path}", file=sys.stderr)
    finally:
        state.loader.close()  # before the interpreter's exit, whatever happened: it cannot stop the workers itself
        if metrics is not None:
            metrics.close()


def metrics_writer(args):
    """The run's MetricsWriter: metrics.jsonl in the run folder, with --tensorboard and --wandb (the W&B run named
    --wandb_name, else after the run folder, its config the run's flags)."""
    wandb = None if args.wandb is None else {"project": args.wandb, "config": vars(args),
                                             "name": args.wandb_name or os.path.basename(os.path.abspath(args.model_dir))}
    return MetricsWriter(os.path.join(args.model_dir, "metrics.jsonl"), args.tensorboard, wandb)


def steps(n):
    """`n` steps as a phrase: "1 step", "0 steps", "12 steps"."""
    return f"{n} step{'s' * (n != 1)}"


def start(args, rank, world_size, device):
    """The run's TrainingState, fresh or restored from its checkpoint, its tokenizer and the step it is at; rank 0
    prepares the folder (and the token cache) before the others read them."""
    seed_all(args.seed)  # the same initial weights on every rank
    tokenizer = Tokenizer.open(args.spm_model)
    if rank > 0:
        barrier(world_size)  # rank 0 builds the cache (and the model folder) first
    state = build_state(args, tokenizer, device, rank, world_size)
    if rank == 0:
        checkpoint.prepare_model_dir(args, tokenizer)
        barrier(world_size)
    if world_size > 1:
        torch.manual_seed(args.seed + 1_000_003 * rank)  # each rank draws its own noise levels and noise
    path = os.path.join(args.model_dir, checkpoint.CHECKPOINT)
    step = checkpoint.restore(load_checkpoint(path, needs=checkpoint.RESUME_KEYS), path, state, args) \
        if os.path.exists(path) else 0
    if world_size > 1:
        check_same_step(step, path, device)
    if rank == 0 and step < args.max_steps:
        if warmup_steps(args) < args.warmup_steps:
            short = (f"warming up over {steps(warmup_steps(args))}, a tenth of --max_steps {args.max_steps}," if
                     warmup_steps(args) else f"no warm-up (a tenth of --max_steps {args.max_steps} is under a step)")
            print(f"note: {short} instead of --warmup_steps {args.warmup_steps}, so that the run trains at its "
                  f"learning rate", file=sys.stderr)
        warn_if_emulated(args.precision, device)
        checkpoint.write_run_files(args, state.model)
        corpus = state.loader.rows.cache.meta
        print(f"{sum(p.numel() for p in state.model.parameters() if p.requires_grad):,} parameters on {device} "
              f"({resolve_precision(args.precision, device)})"
              f"{f' x {world_size} processes' if world_size > 1 else ''}"
              f"{f', each holding {local_parameter_count(state.model):,} (--fsdp)' if args.fsdp else ''}; "
              f"{corpus['examples']:,} examples, "
              f"{corpus['tokens']:,} tokens; {'resuming at step ' + str(step) if step else 'starting'}",
              file=sys.stderr)
    return state, tokenizer, step


def train(state, tokenizer, args, device, step, save, stop, prompts=(), probe=None, metrics_file=None):
    """The training loop from `step` to the schedule's end (--max_steps, or where --time_budget fitted it); logs,
    saves, samples and probes (diagnostics.Probe, rank 0's) at their intervals (logs to `metrics_file`, rank 0's
    MetricsWriter; logs, samples and probes on rank 0 only, a sharded model's weights gathered by every rank first;
    the time of a probe is left out of the time budget on every rank). Returns the step reached (earlier if
    `stop` was requested on any rank, or the time budget ran out). Raises Diverged after args.max_bad_steps steps in
    a row with a non-finite loss or gradient (nothing is saved)."""
    loader, main_rank = state.loader, state.loader.rank == 0
    unfitted = state.budget is not None and state.budget.end_step is None  # no total to show until the fit
    bar = tqdm(total=None if unfitted else state.schedule_end(args), initial=step,
               disable=not (args.progress and main_rank), dynamic_ncols=True)
    edges = None if state.level_edges is None else state.level_edges.tolist()
    interval = IntervalMetrics(device, edges, state.objective.level_range and state.objective.level_range[0])
    bad_in_a_row, lr = 0, None

    def log(step):
        """Write the interval's metrics up to `step` (rank 0) and show its loss on the bar."""
        line = interval.line(step, lr, loader.epoch)
        line["tokens_per_s"] *= loader.world_size  # every rank trains on as many rows
        bar.set_postfix(loss=f"{line['loss']:.3f}", tok_s=f"{line['tokens_per_s']:,.0f}")
        if main_rank:
            metrics_file.write(**line)

    state.model.train()
    if state.budget is not None:
        state.budget.start()
    while step < state.schedule_end(args) and not stop_agreed(stop, loader.world_size, device, state.budget):
        status, stats = optimizer_step(state, args, device, step)
        if state.budget is not None and state.budget.tick(step + (status == "applied")) and main_rank:
            bar.total = state.schedule_end(args)
            capped = " (--max_steps; the budget fits more)" if state.budget.end_step > args.max_steps else ""
            tqdm.write(f"--time_budget {args.time_budget:g}: the schedule ends at step {bar.total}{capped} (warm-up "
                       f"{steps(warmup_steps(args, bar.total))})", file=sys.stderr)
        if status != "applied":
            interval.skipped += 1
            bad_in_a_row = bad_in_a_row + 1 if status == "bad" else 0
            check_bad_steps(status, bad_in_a_row, step, args, main_rank)
            continue
        bad_in_a_row, step, lr = 0, step + 1, stats["lr"]
        interval.add(stats)
        bar.update(1)
        if step % args.log_interval == 0 or step == state.schedule_end(args):
            log(step)
        if args.probe_interval and step % args.probe_interval == 0:
            run_probe(probe, state, args, stats["batch"], step, device, interval, metrics_file)
        if step % args.save_interval == 0:
            save(step)
        if args.sample_interval and step % args.sample_interval == 0 and step < state.schedule_end(args) and \
                (main_rank or is_sharded(state.model)):  # every rank gathers a sharded model's weights
            model = sampling_model(state, args, tokenizer.vocab_size, device)
            if main_rank:
                metrics_file.write_samples(step, print_samples(model, state, tokenizer, args, device, step, prompts))
    if interval.steps:  # the steps since the last line, when the time budget or a stop ended the run between lines
        log(step)
    bar.close()
    return step


def run_probe(probe, state, args, batch, step, device, interval, metrics_file):
    """Rank 0 probes the model after `step` on the step's first micro-batch and writes the figures to metrics.jsonl
    (a sharded model's weights gathered by every rank first); every rank then waits for it and restarts the time
    budget's clock, so that the probe's time counts nowhere."""
    model = state.model
    if is_sharded(model):
        model = sampling_model(state, args, state.model.cfg.vocab_size, device, ema=False)
    if probe is not None:
        line = probe(model, batch_to(batch, device), step, state.warp)
        interval.pause(line["probe_seconds"])
        metrics_file.write(**line)
    barrier(state.loader.world_size)
    if state.budget is not None:
        state.budget.start()


def held_out_path(args):
    """valid.txt beside the corpus (where prepare.py writes it) if there is one, else the corpus itself."""
    valid = os.path.join(os.path.dirname(os.path.abspath(args.data_path)), "valid.txt")
    return valid if os.path.isfile(valid) else args.data_path


def build_probe(state, tokenizer, args):
    """The run's diagnostics.Probe: its objective's levels, and the first --probe_lines lines of held_out_path that fit
    a row (none with --probe_lines 0)."""
    lines = read_lines(held_out_path(args), tokenizer, args.sequence_length, args.probe_lines,
                       "--probe_lines")[0] if args.probe_lines else []
    return Probe(state.objective, state.level_edges, lines, tokenizer, args.sequence_length, args.probe_draws,
                 args.seed, args.batch_size, args.precision)


def check_bad_steps(status, bad_in_a_row, step, args, main_rank):
    """Warn about a skipped non-finite step; raise Diverged once args.max_bad_steps of them came in a row."""
    if status == "bad" and main_rank:
        tqdm.write(f"warning: step {step + 1}: non-finite loss or gradient, step skipped ({bad_in_a_row} in a row of "
                   f"at most {args.max_bad_steps})", file=sys.stderr)
    if bad_in_a_row >= args.max_bad_steps:
        saved = os.path.exists(os.path.join(args.model_dir, checkpoint.CHECKPOINT))
        raise Diverged(f"{bad_in_a_row} attempts in a row at step {step + 1} had a non-finite loss or gradient; "
                       f"{'the last checkpoint is intact' if saved else 'no checkpoint was written'} (try a lower "
                       "-lr, or --precision fp32)")


def sample_prompts(args, tokenizer, count=2, length=3):
    """The first `length` tokens of `count` lines, for the samples printed during training to continue: lines of
    held_out_path (valid.txt beside the corpus, else the corpus), else of the corpus itself."""
    for path in dict.fromkeys([held_out_path(args), args.data_path]):
        prompts = []
        with open(path, "rb") as f:
            for raw in f:
                ids = tokenizer.encode(decode_line(raw, "replace"), bos=False, eos=False)[:length]
                if len(ids) == length and length + 2 < args.sequence_length:
                    prompts.append(ids)
                if len(prompts) == count:
                    return prompts
    return prompts


def sampling_model(state, args, vocab_size, device, ema=True):
    """The run's model with the weights of its first EMA rate (with `ema`, where the run keeps one; else the raw
    ones) as a module of its own, for samples and probes: the model itself for the raw weights, else a copy; of a
    sharded model (--fsdp) an unsharded one built from the gathered weights, a collective every rank calls, whose model
    only rank 0 gets (None on the others)."""
    weights = next(iter(state.emas.values())) if ema and state.emas else None
    if is_sharded(state.model):
        weights = gathered(state.model.state_dict() if weights is None else weights, keep=state.loader.rank == 0)
        if state.loader.rank > 0:
            return None
        with torch.random.fork_rng(devices=[]):  # its initialisation must not move the run's generator
            model = build_model(args, vocab_size, device)
    elif weights is None:
        return state.model
    else:
        model = copy.deepcopy(state.model)
    model.load_state_dict(weights)
    return model


def print_samples(model, state, tokenizer, args, device, step, prompts):
    """Write four samples of `model` (sampling_model's) under the progress bar, two unprompted and one continuing each
    of `prompts` (token ids), with the default sampler, --sample_steps steps and lengths drawn from the training lines'
    (longer than the prompt); returns their texts."""
    model.eval()
    counts = state.loader.rows.cache.length_counts(args.sequence_length)
    pieces = [[None]] * (4 - len(prompts)) + [[ids, None] for ids in prompts]
    layouts = [sample_layout(tokenizer, p, sample_length(counts, args.seed, i, 2 + len(p[0]) if p[0] else 2))
               for i, p in enumerate(pieces)]
    settings = sampler_settings(steps=args.sample_steps, precision=args.precision)
    grid = Grid(args.sigma_min, args.sigma_max, settings.rho)
    texts = []
    for i, row, _, _ in draw(model, layouts, settings, grid, args.seed, len(layouts), tokenizer.pad_id, device,
                             eos_id=tokenizer.eos_id):
        texts.append(tokenizer.decode_sample(row, layouts[i][1]))
        tqdm.write(f"[step {step}] {texts[-1]}")
    state.model.train()
    return texts


class StopOnSignal:
    """Context in which SIGINT (Ctrl-C) or SIGTERM asks the training loop to stop at the next step boundary,
    where it saves; a second signal at least REPEAT_SECONDS later interrupts at once (one sooner is the same stop
    twice: under SLURM both the scheduler and torchrun signal each worker). The previous handlers come back on exit."""

    REPEAT_SECONDS = 1.0

    def __enter__(self):
        self.requested, self.out_of_time, self.previous, self.first = None, False, {}, None
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested is not None:
            if time.monotonic() - self.first >= self.REPEAT_SECONDS:
                raise KeyboardInterrupt
            return
        self.requested, self.first = signal.Signals(signum).name, time.monotonic()
        tqdm.write(f"{self.requested}: stopping after this step and saving (again to stop at once)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def stop_agreed(stop, world_size, device, budget=None):
    """Whether a stop was requested here or, with several processes, on any rank (they must stop together), or the
    `budget` is spent (on any rank; stop.out_of_time says so, where a budget is given). With several processes the
    answer is the ranks' reduced one, the same on all: a signal that comes in after the reduce counts at the next
    call."""
    signalled, out_of_time = stop.requested is not None, budget is not None and budget.exhausted()
    if world_size > 1:
        flags = all_reduce_sum(torch.tensor([float(signalled), float(out_of_time)], device=device))
        signalled, out_of_time = bool(flags[0] > 0), bool(flags[1] > 0)
        if signalled and stop.requested is None:
            stop.requested = "a signal on another rank"
    if budget is not None:
        stop.out_of_time = out_of_time
    return signalled or out_of_time


def check_same_step(step, path, device):
    """Raise UsageError unless every rank restored the same `step` from `path`: machines that do not share the run
    folder would resume from different steps and train apart. (A fresh start on folders that are not shared trains
    correctly, rank 0 writing; it is refused at its first resume.)"""
    seen = torch.tensor([step, -step], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(seen, op=torch.distributed.ReduceOp.MAX)
    if seen[0] != -seen[1]:
        raise UsageError(f"{path}: the processes found different checkpoints (steps {int(-seen[1])} to "
                         f"{int(seen[0])}): every machine must read the same -mdir, on a file system they all share")


def barrier(world_size):
    """Wait for every rank (a no-op in a single process)."""
    if world_size > 1:
        torch.distributed.barrier()


if __name__ == "__main__":
    run_command(main, interrupted="interrupted; nothing saved since the last checkpoint")
