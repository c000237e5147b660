"""Sample text from a trained checkpoint; one sample a line on stdout, logs on stderr.

    python sample.py -mdir out [-n 8] [--steps 200] [--sampler euler|heun] [--length 64]
                     [--prompt "text" ...] [--seed 0] [--ema RATE]

Unconditional by default; with prompts, each prompt is continued -n times and its tokens are kept exactly.
"""
import argparse
import os
import sys


from data import Tokenizer, prompt_rows
from diffusion import SAMPLERS, generate, sigma_grid, uniform_schedule
from model import ModelConfig, ScoreLM
from utils import UsageError, die, load_checkpoint, load_state_dict_strict, resolve_device

CHECKPOINT = "ckpt.pt"


def load_model(model_dir, ema=None, device="cpu"):
    """Rebuild the model of `model_dir` from its checkpoint alone, with the raw weights or those of EMA rate
    `ema`. Returns (model in eval mode, tokenizer, checkpoint's sampling settings dict).
    Raises UsageError if the folder, checkpoint, tokenizer or EMA rate is missing or does not match."""
    path = os.path.join(model_dir, CHECKPOINT)
    checkpoint = load_checkpoint(path, map_location="cpu")
    model = ScoreLM(ModelConfig(**checkpoint["config"]))
    if ema is None:
        state, what = checkpoint["model"], f"{path} [model]"
    else:
        rates = {float(r): r for r in checkpoint["ema"]}
        try:
            ema = float(ema)
        except ValueError:
            raise UsageError(f"--ema {ema!r}: expected a rate such as 0.999") from None
        if ema not in rates:
            raise UsageError(f"--ema {ema}: {path} has EMA rates {sorted(rates) or 'none'}")
        state, what = checkpoint["ema"][rates[ema]], f"{path} [ema {ema}]"
    load_state_dict_strict(model, state, what)
    tokenizer = Tokenizer(os.path.join(model_dir, "tokenizer.model"))
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise UsageError(f"{model_dir}/tokenizer.model: vocabulary {tokenizer.vocab_size} != model's {model.cfg.vocab_size}")
    return model.to(device).eval(), tokenizer, checkpoint["sampling"]


def main(argv=None):
    """Print samples of the run folder given in `argv`, one a line; raises UsageError on bad input."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-mdir", "--model_dir", required=True, help="folder written by train.py")
    p.add_argument("-n", "--num_samples", type=int, default=8, help="samples (per prompt, when prompts are given)")
    p.add_argument("--steps", type=int, default=200, help="sampler steps (network evaluations for euler)")
    p.add_argument("--sampler", choices=SAMPLERS, default="euler", help="ODE solver (heun: two evaluations a step)")
    p.add_argument("--length", type=int, help="tokens per sample, bos and prompt included (default: training length)")
    p.add_argument("--prompt", nargs="+", default=[""], help="texts to continue; their tokens are kept exactly")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise; sample i depends on (seed, i) only")
    p.add_argument("--ema", help="use the EMA weights of this rate (e.g. 0.999) instead of the raw weights")
    p.add_argument("--rho", type=float, help="spacing of the sampling grid (default: the training rho)")
    p.add_argument("--batch_size", type=int, default=64, help="samples drawn at once")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, else cpu), cpu, cuda, ...")
    args = p.parse_args(argv)
    if args.steps < 1 or args.num_samples < 1 or args.batch_size < 1:
        p.error("--steps, -n and --batch_size must be at least 1")
    if args.length is not None and args.length < 2:
        p.error(f"--length {args.length}: must be at least 2")
    if args.rho is not None and not args.rho > 0:
        p.error(f"--rho {args.rho}: must be positive")
    device = resolve_device(args.device)
    model, tokenizer, sampling = load_model(args.model_dir, args.ema, device)
    length = sampling["sequence_length"] if args.length is None else args.length
    if length > sampling["sequence_length"]:
        print(f"warning: --length {length} is longer than the training rows ({sampling['sequence_length']}); "
              "positions past them were never trained", file=sys.stderr)
    ids, cond_mask = prompt_rows(tokenizer, args.prompt, args.num_samples, length)
    grid = sigma_grid(args.steps, sampling["sigma_min"], sampling["sigma_max"], sampling["rho"] if args.rho is None else args.rho)
    print(f"{len(ids)} samples of {length} tokens, {args.sampler}, {args.steps} steps, "
          f"sigma {sampling['sigma_max']} -> {sampling['sigma_min']}", file=sys.stderr)
    for start in range(0, len(ids), args.batch_size):
        rows = slice(start, start + args.batch_size)
        seeds = [args.seed * 1_000_003 + i for i in range(start, min(start + args.batch_size, len(ids)))]
        out = generate(model, SAMPLERS[args.sampler], ids[rows].to(device), cond_mask[rows].to(device),
                       uniform_schedule(grid, cond_mask[rows]).to(device), seeds)
        for row in out.tolist():
            print(tokenizer.decode(row), flush=True)


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        die(str(e))
