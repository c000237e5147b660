"""Measure the project's speed on this machine; RESULTS.md's speed figures come from here.

    python bench.py data -d corpus.txt -spm bpe.model [-slen 64] [-bsz 128] [--json]
    python bench.py train -d corpus.txt -spm bpe.model [--preset small] [--precision bf16] [--compile] [--json]
        [--reference path/to/score-based-diffusion-lm]
    torchrun --nproc-per-node N bench.py train ... [--fsdp]     (several processes, DDP or sharded)
    python bench.py sample [-mdir out | --preset small] [--steps 200] [-bsz 64] [-slen 64] [--json]
"""
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

import flags
import training
from checkpoint import load_model
from corpus import ENCODING_ERRORS, Tokenizer, load_corpus
from data import PackedBatches, PackedRows, sample_rows
from diffusion import SAMPLERS, SCHEDULES, Grid, generate
from model import ModelConfig, ScoreLM
from sampling import sampler_settings
from sharding import local_parameter_count
from utils import (PRECISION_CHOICES, ArgumentParser, UsageError, distributed_setup, distributed_teardown,
                   keep_freed_memory, resolve_device, resolve_precision, run_command, seed_all, warn_if_emulated)


def bench_data(args):
    """Cache build time (s, from a cold cache unless --cache_dir is given) and the largest resident memory of
    this process or a tokenising one by then (MB), loader throughput (examples/s and real tokens/s after the first
    batch) and packing efficiency (real tokens / row slots) over --batches."""
    tokenizer = Tokenizer.open(args.spm_model)
    with tempfile.TemporaryDirectory() as cold:
        started = time.perf_counter()
        cache = load_corpus(args.data_path, tokenizer, args.cache_dir or cold, args.encoding_errors, progress=False)
        build_s = time.perf_counter() - started
        peak_mb = max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024
        rows = PackedRows(cache, args.sequence_length, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id,
                          seed=args.seed, expand_prob=args.expand_prob)
        batches = PackedBatches(rows, args.batch_size, args.num_workers)
        try:
            started = time.perf_counter()
            next(batches)  # worker start-up and the first chunk
            first_s = time.perf_counter() - started
            examples = real = used = slots = 0
            started = time.perf_counter()
            for _ in range(args.batches):
                batch = next(batches)
                segment_ids, ids = batch["segment_ids"], batch["ids"]
                examples += int(segment_ids.max(dim=1).values.sum())
                real += int(((segment_ids > 0) & (ids != tokenizer.pad_id)).sum())
                used += int((segment_ids > 0).sum())
                slots += ids.numel()
            elapsed = time.perf_counter() - started
        finally:
            batches.close()
    return {"corpus": args.data_path, "examples_in_corpus": len(cache), "tokens_in_corpus": cache.meta["tokens"],
            "sequence_length": args.sequence_length, "batch_size": args.batch_size, "expand_prob": args.expand_prob,
            "num_workers": args.num_workers, "batches": args.batches, "cache_build_s": round(build_s, 3),
            "cache_build_peak_rss_mb": round(peak_mb),
            "first_batch_s": round(first_s, 3), "loader_examples_per_s": round(examples / elapsed),
            "loader_tokens_per_s": round(real / elapsed), "packing_efficiency": round(real / slots, 4),
            "slot_use": round(used / slots, 4)}


# Dense bf16 tensor peak (FLOP/s, without sparsity) of GPUs by the exact name torch.cuda.get_device_name gives, for
# MFU; from the vendors' data sheets. A name not here (another form factor is another peak: H100 PCIe is 756, not
# the SXM's 989) gives no MFU rather than a wrong one; --peak_tflops supplies it.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA GH200 480GB": 989e12,
    "NVIDIA H800": 989e12, "NVIDIA H800 PCIe": 756e12, "NVIDIA B200": 2250e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA L40S": 362e12, "NVIDIA L40": 181e12, "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12, "NVIDIA GeForce RTX 4090": 165e12,
}


def training_flops(n_mm, num_layers, model_dim, keys, self_cond=0.0, head=0):
    """Model FLOPs per real token of a training step: a forward pass is 2 N_mm + 4 layers D keys (the matrix
    products, and attention's scores and weighted values over `keys` attended keys), the backward pass twice that
    (Kaplan et al. 2020's 6N, with attention), and a self-conditioning pass, on a share `self_cond` of the steps (the
    expected share: which steps take one is drawn), one forward more and its softmax's expectation over the `head`
    (V x E) embeddings, 2 V E."""
    forward = 2 * n_mm + 4 * num_layers * model_dim * keys
    return 3 * forward + self_cond * (forward + 2 * head)


def matmul_params(model):
    """Parameters that multiply every token's activations: every linear layer (attention, SwiGLU, the per-token
    FiLM and noise-level MLPs, input projection, head) and the tied output projection (V x E); the noise-level MLP and
    FiLM layers not for a model that reads no noise level (they run once per batch)."""
    once = set() if model.reads_noise_level() else \
        {id(m) for name, m in model.named_modules() if name.startswith("time_mlp") or name.split(".")[-1] == "film"}
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m) not in once)
    return linear + model.embedding.weight.numel()


def attended_keys(segment_ids):
    """Mean number of keys a real query may attend to: each segment's length, weighted by its tokens."""
    counts = torch.stack([torch.bincount(row, minlength=int(segment_ids.max()) + 1)[1:] for row in segment_ids])
    return float((counts.float() ** 2).sum() / counts.sum())


def bench_train(args):
    """Training throughput in real (non-fill) tokens/s and text tokens/s (neither fill nor padding) over --steps after
    --warmup steps (their seconds, compilation included, as warmup_s; with --compile, the graphs compiled), each
    step's loss (warm-up included; two kernels on one --seed must give the same), model FLOP/s per real token
    (training_flops: Kaplan et al. 2020's 6N plus attention and the self-conditioning pass), MFU against the device's
    peak (PEAK_FLOPS by its exact name, or --peak_tflops), and peak memory (MB; CUDA: allocated, else the process's
    resident set). Under torchrun (DDP, or sharded with --fsdp) every process trains its rows of each global batch:
    tokens/s are the processes' together, memory and the parameters held are rank 0's, and only rank 0 returns the
    figures (the others None)."""
    targs = flags.parse_args(args.train_flags + ["--no-progress", "--sample_interval", "0", "-ema", ""],
                                required=("data_path", "spm_model"))
    seed_all(targs.seed)
    rank, world_size, device = distributed_setup(targs.device)
    try:
        return train_figures(args, targs, rank, world_size, device)
    finally:
        distributed_teardown(world_size)


def train_figures(args, targs, rank, world_size, device):
    """bench_train's figures, in a process group set up (or a single process)."""
    if args.attention == "flex" and device.type != "cuda":
        raise UsageError("--attention flex: FlexAttention trains on CUDA only (on the CPU it has no backward pass)")
    if args.reference and device.type != "cpu":
        raise UsageError(f"--reference: the original's step runs on the CPU in fp32; time this one there too "
                         f"(--device cpu), not on {device}")
    tokenizer = Tokenizer.open(targs.spm_model)
    state = training.build_state(targs, tokenizer, device, rank, world_size)
    state.model.attention = args.attention
    state.runner = training.training_runner(state.model, state.objective, targs, world_size, state.runner)
    warn_if_emulated(targs.precision, device)  # once the inputs are known to be good
    keys, losses, began = [], [], time.perf_counter()
    try:
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                sync(device)
                started, tokens, text = time.perf_counter(), 0, 0
                warmup_s = started - began
            status, stats = training.optimizer_step(state, targs, device, step)
            losses.append(stats["loss"])  # read after the timing: no host sync per step
            if step >= args.warmup:
                tokens, text = tokens + stats["tokens"], text + stats["text"]
        sync(device)
        elapsed = time.perf_counter() - started
        for _ in range(8):
            keys.append(attended_keys(next(state.loader)["segment_ids"]))
    finally:
        state.loader.close()
    model = state.model
    n_mm = matmul_params(model)
    self_cond = targs.self_cond if model.cfg.self_cond else 0.0  # the share of steps with a first pass
    flops_per_token = training_flops(n_mm, targs.num_layers, targs.model_dim, sum(keys) / len(keys), self_cond,
                                     model.embedding.weight.numel())
    tokens_per_s, text = tokens * world_size / elapsed, text * world_size  # every rank trains as many rows
    if rank > 0:
        return None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = PEAK_FLOPS.get(name) if args.peak_tflops is None else args.peak_tflops * 1e12
    memory = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    # after this project's step, so that its peak memory is its own
    reference = {} if args.reference is None else bench_reference(args.reference, targs, args.steps, args.warmup)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] if targs.compile else None
    return {"device": name, "preset": targs.preset, "precision": resolve_precision(targs.precision, device),
            "compile": targs.compile, "compiled_graphs": graphs,
            "attention": model.attention,  # the kernel used: "auto" settled to "flex" or "sdpa"
            "parameters": sum(p.numel() for p in model.parameters()), "matmul_parameters": n_mm,
            "processes": world_size, "fsdp": targs.fsdp,
            "parameters_per_process": local_parameter_count(model, trainable=False),
            "batch_size": targs.batch_size, "sequence_length": targs.sequence_length,
            "mean_attended_keys": round(sum(keys) / len(keys), 1), "warmup_s": round(warmup_s, 1),
            "steps": args.steps,
            "tokens_per_s": round(tokens_per_s), "text_tokens_per_s": round(text / elapsed),
            "flops_per_token": round(flops_per_token),
            "flops_per_s": round(flops_per_token * tokens_per_s),
            "mfu": peak and round(flops_per_token * tokens_per_s / peak, 4),
            "peak_memory_mb": round(memory), "losses": [round(x, 6) for x in torch.stack(losses).tolist()],
            **reference,
            **({"vs_reference": round(tokens_per_s / reference["reference_tokens_per_s"], 2),
                "text_vs_reference": round(text / elapsed / reference["reference_text_tokens_per_s"], 2)}
               if reference else {})}


# The original project's training step, run in a child process from its pytorch/ folder (its modules are named
# data, model, diffusion and utils, as ours are): Trainer.run_step as its train.py builds it, timed after a warm-up.
REFERENCE_STEP = """
import json, sys, tempfile, time, types
import torch
sys.modules.setdefault("unidecode", types.SimpleNamespace(unidecode=str))  # used for sample logging only
import logger
from data import Collate, PackedDataLoader, SentencePieceTokenizer, TextDataset, infinite_loader
from diffusion import MultiStepScoreDiffusion
from model import ScoreLM
from trainer import Trainer
a = json.loads(sys.argv[1])
torch.manual_seed(a["seed"])
tokenizer = SentencePieceTokenizer(a["spm_model"])
collate = Collate(max_sequence_length=a["sequence_length"], pad_sequence_value=tokenizer.pad_id,
                  random_length_expansion=True, insert_value=tokenizer.pad_id, insert_rate=0.0)
loader = PackedDataLoader(TextDataset(a["data_path"], tokenizer), batch_size=a["batch_size"], shuffle=True,
                          num_workers=1, collate_fn=collate.prepack_fn, sizing_fn=collate.sizing_fn,
                          packed_collate_fn=collate.packed_collate_fn)
counted = []
def counting(batches):
    for batch in batches:
        ids, length_mask = batch[0], batch[1]  # real: inside a sequence (its length mask); text: and not padding
        counted.append((int(length_mask.sum()), int((length_mask & (ids != tokenizer.pad_id)).sum())))
        yield batch
model = ScoreLM(num_classes=len(tokenizer), model_dim=a["model_dim"], embedding_dim=a["embedding_dim"],
                num_layers=a["num_layers"], num_heads=a["num_heads"], dropout_prob=0.0)
diffusion = MultiStepScoreDiffusion(sigma_min=a["sigma_min"], sigma_max=a["sigma_max"], sigma_data=1.0, rho=a["rho"])
with tempfile.TemporaryDirectory() as folder:
    logger.configure(folder)
    trainer = Trainer(model, diffusion, tokenizer, counting(infinite_loader(loader)), a["batch_size"], 1,
                      a["learning_rate"], "0.95, 0.9999", folder, 10**9, 10**9, 10**9, (8, a["sequence_length"]),
                      [], 200, True, gradient_clipping=1.0)
    # rotary-embedding-torch >= 0.6 caches its phases in buffers outside the state dict, which its EMA looks up there
    kept = model.state_dict()
    trainer.ema_named_tensors = [[(k, v) for k, v in named if k in kept] for named in trainer.ema_named_tensors]
    for step in range(a["warmup"] + a["steps"]):
        if step == a["warmup"]:
            started, first = time.perf_counter(), len(counted)
        trainer.run_step()
    elapsed = time.perf_counter() - started
print(json.dumps({"parameters": sum(p.numel() for p in model.parameters()),
                  "tokens_per_s": sum(c[0] for c in counted[first:]) / elapsed,
                  "text_tokens_per_s": sum(c[1] for c in counted[first:]) / elapsed}))
"""


def bench_reference(repo, targs, steps, warmup):
    """The original project's own training step (thorinf/score-based-diffusion-lm as its README describes it, the
    pytorch/ folder of commit 21f0090, checked out at `repo`) at the run's model shape, batch, row length, noise
    range, learning rate and corpus, on the CPU: its parameters and real tokens/s (positions inside a sequence) over
    `steps` after `warmup`. Raises UsageError if the step fails (parse_args checks the folder)."""
    folder = os.path.join(repo, "pytorch")
    settings = {k: getattr(targs, k) for k in ("seed", "spm_model", "data_path", "sequence_length", "batch_size",
                                               "model_dim", "embedding_dim", "num_layers", "num_heads", "sigma_min",
                                               "sigma_max", "rho", "learning_rate")}
    settings.update(data_path=os.path.abspath(targs.data_path), spm_model=os.path.abspath(targs.spm_model),
                    steps=steps, warmup=warmup)
    done = subprocess.run([sys.executable, "-c", REFERENCE_STEP, json.dumps(settings)], cwd=folder,
                          capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if done.returncode:
        tail = done.stderr.strip().splitlines()
        raise UsageError(f"--reference {repo}: its training step failed: "
                         f"{tail[-1] if tail else f'exit status {done.returncode}'}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"reference_parameters": result["parameters"], "reference_tokens_per_s": round(result["tokens_per_s"]),
            "reference_text_tokens_per_s": round(result["text_tokens_per_s"])}


def bench_sample(args):
    """Sampling throughput of every sampler (or --sampler's) on -bsz unconditional rows of -slen tokens: sequences/s,
    network evaluations/s (each one a forward pass over the batch) and their cost in ms, and evaluations per
    sequence, over --steps steps after a two-step warm-up. Weights from -mdir, or untrained ones of --preset (speed
    does not depend on them; early exit does)."""
    device = resolve_device(args.device)
    bos, pad, L = 0, 2, args.sequence_length  # as prepare.py numbers them, for an untrained model
    if args.model_dir:
        model, tokenizer, sampling = load_model(args.model_dir, device=device)
        if model.cfg.causal or model.cfg.masked:
            raise UsageError(f"-mdir {args.model_dir}: an autoregressive or masked run; the samplers measured here "
                             "are the continuous diffusion run's")
        sigma_min, sigma_max, what = sampling["sigma_min"], sampling["sigma_max"], args.model_dir
        bos, pad = tokenizer.bos_id, tokenizer.pad_id
    else:
        seed_all(0)
        preset = args.preset or "small"
        shape = {k: v for k, v in flags.PRESETS[preset].items() if k in ModelConfig.__dataclass_fields__}
        model = ScoreLM(ModelConfig(vocab_size=args.vocab_size, **shape)).to(device).eval().settle_attention(False)
        sigma_min, sigma_max, what = 1.0, 10.0, f"untrained {preset} preset"
    warn_if_emulated(args.precision, device)  # once the inputs are known to be good
    layout = ([bos] + [pad] * (L - 1), [True] + [False] * (L - 1))
    ids, cond_mask, _ = sample_rows([layout] * args.batch_size, pad)
    ids, cond_mask = ids.to(device), cond_mask.to(device)
    results = {}
    for name in args.sampler or SAMPLERS:
        def run(steps):
            settings = sampler_settings(name, steps, args.schedule, early_exit=args.early_exit,
                                        precision=args.precision)
            return generate(model, settings.step(), settings.schedule_function(), Grid(sigma_min, sigma_max), ids,
                            cond_mask, range(args.batch_size), steps, early_exit=settings.exit(),
                            precision=args.precision)
        run(2)
        sync(device)
        started = time.perf_counter()
        _, evaluations, _ = run(args.steps)
        sync(device)
        elapsed = time.perf_counter() - started
        batch_evaluations = int(evaluations.max())  # forward passes, each over the rows still sampling
        results[name] = {"sequences_per_s": round(args.batch_size / elapsed, 2),
                         "evaluations_per_s": round(batch_evaluations / elapsed, 2),
                         "ms_per_evaluation": round(1000 * elapsed / batch_evaluations, 1),
                         "evaluations_per_sequence": round(float(evaluations.float().mean()), 1),
                         "seconds": round(elapsed, 2)}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "model": what, "parameters": sum(p.numel() for p in model.parameters()),
            "precision": resolve_precision(args.precision, device), "batch_size": args.batch_size,
            "sequence_length": args.sequence_length,
            "steps": args.steps, "schedule": args.schedule, "early_exit": args.early_exit, **results}


def sync(device):
    """Wait for the device's queued work, so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_parser():
    """bench.py's command line: a subcommand and its flags."""
    p = ArgumentParser(prog="bench.py", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, help="what to measure")
    d = sub.add_parser("data", help="token cache build, loader throughput and packing efficiency")
    d.add_argument("-d", "--data_path", required=True, help="corpus, one example a line")
    d.add_argument("-spm", "--spm_model", required=True, help="SentencePiece model")
    d.add_argument("-slen", "--sequence_length", type=int, default=64, help="row length L in tokens")
    d.add_argument("-bsz", "--batch_size", type=int, default=128, help="rows per batch")
    d.add_argument("--expand_prob", type=float, default=0.0,
                   help="share of lines padded after eos (default 0: packing alone; expansion pads are not text)")
    d.add_argument("--num_workers", type=int, default=2, help="DataLoader worker processes (0: none), as train.py")
    d.add_argument("--batches", type=int, default=1000,
                   help="batches timed after the first (enough that chunks prefetched meanwhile hardly count)")
    d.add_argument("--cache_dir", help="an existing cache folder (default: a new temporary one, so the build is timed)")
    d.add_argument("--encoding_errors", choices=ENCODING_ERRORS, default="strict",
                   help="invalid UTF-8 in the corpus: strict stops with its line number, replace uses U+FFFD")
    d.add_argument("--seed", type=int, default=0, help="data order")
    t = sub.add_parser("train", help="training tokens/s, FLOP/s, MFU and peak memory; other flags go to train.py",
                       epilog="-d and -spm, and any train.py flag (--preset, -dim, -bsz, -slen, --precision, "
                              "--compile, --device, ...), are passed on to train.py's parser.")
    t.add_argument("--warmup", type=int, default=5, help="steps before timing (compilation happens here)")
    t.add_argument("--steps", type=int, default=30, help="steps timed")
    t.add_argument("--peak_tflops", type=float, help="the device's dense peak in TFLOP/s at the run's precision, for "
                                                      "MFU (default: PEAK_FLOPS's bf16 figure for GPUs it names)")
    t.add_argument("--attention", choices=("auto", "flex", "sdpa"), default="auto",
                   help="the attention kernel of packed rows (auto: FlexAttention on CUDA, else SDPA)")
    t.add_argument("--reference", metavar="DIR",
                   help="also time the original project's step afterwards, from a checkout of "
                        "thorinf/score-based-diffusion-lm (21f0090) at DIR, at the same shape, batch and corpus, on "
                        "the CPU in fp32 (this step's device must be the CPU)")
    s = sub.add_parser("sample", help="sampling sequences/s and network evaluations/s of every sampler")
    s.add_argument("-mdir", "--model_dir", help="a run folder of train.py (default: untrained weights of --preset)")
    s.add_argument("--preset", choices=flags.PRESETS, help="architecture without -mdir (default: small)")
    s.add_argument("--vocab_size", type=int, help="vocabulary without -mdir (at least 4; default 8000)")
    s.add_argument("--steps", type=int, default=200, help="sampler steps")
    s.add_argument("--sampler", choices=SAMPLERS, action="append", help="time this sampler (repeat the flag; "
                                                                         "default: every one)")
    s.add_argument("-bsz", "--batch_size", type=int, default=64, help="sequences sampled at once")
    s.add_argument("-slen", "--sequence_length", type=int, default=64, help="tokens per sequence, bos included")
    s.add_argument("--schedule", choices=SCHEDULES, default="uniform", help="per-token schedule")
    s.add_argument("--early_exit", type=int, metavar="K", help="as sample.py (only meaningful with -mdir)")
    s.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                   help="the network's autocast precision, as sample.py's")
    s.add_argument("--device", default="auto", help="auto (cuda, mps, else cpu), cpu, cuda, ...")
    for sub_parser in (d, t, s):
        sub_parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def parse_args(argv=None):
    """The subcommand and its flags, checked; for train, the flags left over go to train.py's parser."""
    p = build_parser()
    args, rest = p.parse_known_args(argv)
    if args.command == "train":
        args.train_flags = rest
        check_at_least(p, {"--steps": (args.steps, 1), "--warmup": (args.warmup, 0)})
        if args.peak_tflops is not None and not 0 < args.peak_tflops < math.inf:
            p.error(f"--peak_tflops {args.peak_tflops}: must be a number above 0")
        if args.reference and not os.path.isfile(os.path.join(args.reference, "pytorch", "trainer.py")):
            p.error(f"--reference {args.reference}: no pytorch/trainer.py there (a checkout of "
                    "thorinf/score-based-diffusion-lm at 21f0090)")
        return args
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "sample":
        if args.model_dir and (args.preset or args.vocab_size):
            p.error("--preset and --vocab_size apply without -mdir (the run folder fixes the architecture)")
        args.vocab_size = 8000 if args.vocab_size is None else args.vocab_size
        check_at_least(p, {"--steps": (args.steps, 1), "-bsz": (args.batch_size, 1), "-slen": (args.sequence_length, 2),
                           "--vocab_size": (args.vocab_size, 4), "--early_exit": (args.early_exit, 1)})
        return args
    check_at_least(p, {"-slen": (args.sequence_length, 2), "-bsz": (args.batch_size, 1),
                       "--batches": (args.batches, 1), "--num_workers": (args.num_workers, 0)})
    if not 0 <= args.expand_prob <= 1:
        p.error(f"--expand_prob {args.expand_prob}: must be in [0, 1]")
    return args


def check_at_least(p, values):
    """Refuse, naming the flag, the first of values {flag: (value, lowest allowed)} below its bound (None: not
    given)."""
    for flag, (value, low) in values.items():
        if value is not None and value < low:
            p.error(f"{flag} {value}: must be at least {low}")


def main(argv=None):
    """Run the benchmark `argv` names and print its figures."""
    args = parse_args(argv)
    keep_freed_memory()
    result = {"data": bench_data, "train": bench_train, "sample": bench_sample}[args.command](args)
    if result is None:  # a process of a torchrun run other than rank 0
        return
    if args.json:
        print(json.dumps(result))
        return
    width = max(map(len, result))
    for key, value in result.items():
        if isinstance(value, dict):  # one row of figures per sampler
            print(f"{key:<{width}}  " + "  ".join(f"{k} {v:,}" for k, v in value.items()))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            print(f"{key:<{width}}  {value:,}")
        else:
            print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    run_command(main)
