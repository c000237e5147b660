"""Sample text from a trained run: one sample a line (or a JSON line) on stdout; progress and logs on stderr.

    python sample.py -mdir out [-n 8] [--steps 200] [--sampler iterative|ancestral|euler|heun|stochastic]
                     [--schedule uniform|ar|confidence] [--length data | 64 | 16:48]
                     [--prompt "text" ... | --prompt_file FILE | --infill "the [5] of the [3]" ...]
                     [--suffix TEXT] [--early_exit K] [--jsonl] [--seed 0] [--ema RATE]

Unconditional by default. Prompts, templates and suffixes are held at sigma = 0, so their tokens come out exactly
as given; each prompt or template gives -n samples. Sample i depends on (--seed, i) alone, not on its batch. A run of
the autoregressive baseline (train.py --objective ar) samples left to right, with --temperature and --top_p; a masked
diffusion run (--objective mdlm) unmasks in --steps ancestral steps, with --temperature and --top_p.
"""
import argparse
import json
import os
import sys

from tqdm import tqdm

import api
from corpus import decode_line
from diffusion import SAMPLERS, SCHEDULES
from sampling import (GRIDS, SAMPLER_PARAMETERS, SCHEDULE_PARAMETERS, check_objective_flags, checked_text,
                      given_flags, parse_length, prompt_pieces, sampler_settings, setting_defaults)
from utils import PRECISION_CHOICES, ArgumentParser, UsageError, keep_freed_memory, run_command, warn_if_emulated


def build_parser():
    """sample.py's command line; the defaults of a sampler's or schedule's own flags are in sampling.py."""
    p = ArgumentParser(prog="sample.py", description=__doc__)
    p.add_argument("-mdir", "--model_dir", required=True, help="folder written by train.py: a continuous "
                   "diffusion run, or a masked (--steps, --temperature, --top_p) or autoregressive one (--temperature, "
                   "--top_p)")
    p.add_argument("-n", "--num_samples", type=int, default=8, help="samples, per prompt or template when some are "
                                                                    "given")
    p.add_argument("--steps", type=int, help="sampler steps (default 200); network evaluations are steps for "
                                              "iterative, ancestral and euler, about twice that for heun and "
                                              "stochastic")
    p.add_argument("--sampler", choices=SAMPLERS, default="iterative",
                   help="iterative (the original project's: denoise, then re-noise at the next level), ancestral "
                        "(DDPM's: a draw from the posterior given the estimate), euler or heun "
                        "(EDM Algorithm 1 on the probability-flow ODE), stochastic (EDM Algorithm 2, with churn)")
    p.add_argument("--schedule", choices=SCHEDULES, default="uniform",
                   help="per-token schedule: uniform (one grid for all), ar (earlier positions ahead, after "
                        "AR-Diffusion), confidence (confident, stable positions first)")
    owned = {**{k: ("--sampler", s) for s, d in SAMPLER_PARAMETERS.items() for k in d},
             **{k: ("--schedule", s) for s, d in SCHEDULE_PARAMETERS.items() for k in d}}
    defaults = {k: v for table in (SAMPLER_PARAMETERS, SCHEDULE_PARAMETERS) for d in table.values()
                for k, v in d.items()}
    meaning = {"skew": "how far earlier positions run ahead (0: uniform)",
               "threshold": "top probability at which a position may advance",
               "patience": "share of the steps an unconfident position may wait before a deadline moves it (0: "
                           "uniform)",
               "S_churn": "noise added a step, gamma = min(S_churn / steps, sqrt(2) - 1)",
               "S_tmin": "churn only at sigma >= S_tmin", "S_tmax": "churn only at sigma <= S_tmax",
               "S_noise": "scale of the churn noise"}
    for name, (kind, owner) in owned.items():
        p.add_argument(f"--{name}", type=float, help=f"{kind} {owner}: {meaning[name]} (default {defaults[name]:g})")
    p.add_argument("--length", type=parse_length,
                   help="tokens per sample, bos, prompt and suffix included: data (drawn per sample from the "
                        "training lines' lengths, the longer ones among them for a prompt; the default where the run "
                        "keeps them), N, or a range A:B drawn uniformly per sample (default for earlier runs: the "
                        "training rows)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", nargs="+", action="extend", help="texts to continue; their tokens are kept "
                                                                     "exactly (repeat the flag or give several; '' "
                                                                     "is an unprompted sample)")
    source.add_argument("--prompt_file", help="a file of prompts, one a line (blank lines skipped; - reads stdin)")
    source.add_argument("--infill", nargs="+", action="extend",
                        help="templates with blanks, e.g. 'the [5] of the [3]': [n] is n tokens to generate; the "
                             "text's tokens are kept exactly (a blank may continue the word before it: "
                             "docs/sampling.md)")
    p.add_argument("--suffix", help="text held at the end of every sample, followed by eos ('' holds eos alone, so "
                                    "that samples end at their length)")
    p.add_argument("--early_exit", type=int, metavar="K", help="stop a sample once its tokens have not changed for K "
                                                              "steps")
    p.add_argument("--exit_confidence", type=float,
                   help="--early_exit counts only steps whose prediction has at least this mean top probability "
                        "(0: every step; default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise, 0 or more; sample i depends on (seed, i) "
                                                       "only")
    p.add_argument("--ema", help="use the EMA weights of this rate (e.g. 0.999) instead of the raw weights")
    p.add_argument("--grid", choices=GRIDS, default="rho",
                   help="the sigma grid: rho (EDM eq. 5, see --rho) or warped (the time warp fitted in training, "
                        "CDCD: more steps where the loss changes fastest; needs a run trained with --time_warp)")
    p.add_argument("--rho", type=float, help="--grid rho: spacing of the sigma grid, 0.1 to 100: 1 is linear in sigma, "
                                             "7 (default, EDM's) spends more steps at low noise")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="score temperature T: the denoiser's step from x is scaled by 1/T, D_T = x + (D - x) / T "
                        "(below 1: sharper, as Plaid samples at 0.9); for an autoregressive or masked run, the softmax's")
    p.add_argument("--top_p", type=float, default=1.0,
                   help="an autoregressive or masked run draws each token from the smallest set of likeliest tokens "
                        "holding this much probability (nucleus sampling; 1: all)")
    p.add_argument("--clamp", type=float, default=0.0, metavar="SIGMA",
                   help="below this noise level, replace the denoised estimate by the embedding of its most likely "
                        "token (Diffusion-LM's clamping; 0: never)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                   help="the network's autocast precision (auto: bf16 where the device computes it in hardware, else "
                        "fp32; fp32 is faster for a single row); the sampling maths stay fp32")
    p.add_argument("--fp64", action="store_true", help="sampling maths (x, sigma, softmax, denoiser) in float64")
    p.add_argument("--jsonl", action="store_true", help="write JSON lines (sample, seed, prompt, text, ids, steps, "
                                                        "evaluations) instead of plain text")
    p.add_argument("--batch_size", type=int, default=64, help="samples drawn at once; memory grows with batch x "
                                                              "length x vocabulary")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, else cpu), cpu, cuda, ...")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show a progress bar of the sampler steps on stderr")
    return p


def parse_args(argv=None):
    """sample.py's flags, checked; args.settings holds the SamplerSettings they describe."""
    p = build_parser()
    args = p.parse_args(argv)
    args.steps_given, args.steps = args.steps is not None, 200 if args.steps is None else args.steps
    try:
        args.settings = sampler_settings(**{name: getattr(args, name) for name in setting_defaults()})
    except UsageError as e:
        p.error(str(e))
    for flag, value in (("-n", args.num_samples), ("--batch_size", args.batch_size)):
        if value < 1:
            p.error(f"{flag} {value}: must be at least 1")
    if args.seed < 0:
        p.error(f"--seed {args.seed}: must be 0 or more")
    if args.infill and args.length is not None:
        p.error("--length does not apply to --infill: the template's text and blanks fix the length")
    return args


def open_prompt_file(path):
    """The prompt file opened for reading bytes ("-" is standard input); UsageError if it cannot be."""
    if path == "-":
        return open(sys.stdin.fileno(), "rb", closefd=False)
    if os.path.isdir(path):
        raise UsageError(f"--prompt_file {path}: is a folder, not a file")
    try:
        return open(path, "rb")
    except OSError as e:
        raise UsageError(f"--prompt_file {path}: {e.strerror.lower()}") from None


def read_prompts(args):
    """The prompts to sample from, as (text as given, pieces for data.sample_layout, where it came from)."""
    if args.prompt_file is None:
        return prompt_pieces(args.prompt, args.infill)
    prompts, path = [], args.prompt_file
    with open_prompt_file(path) as f:
        for number, raw in enumerate(f, 1):
            try:
                text = decode_line(raw)
            except ValueError as e:
                raise UsageError(f"{path}:{number}: {e}") from None
            if text:
                prompts.append((text, [text, None], f"{path}:{number}"))
    if not prompts:
        raise UsageError(f"--prompt_file {path}: no prompt in it (one a line; blank lines are skipped)")
    return prompts


def check_objective(args, objective):
    """Refuse, naming the flag, what the run's objective (objectives.py) cannot sample: the continuous samplers' own
    flags for the others, held text after the generated tokens (--infill, --suffix) for the autoregressive baseline,
    --top_p for a continuous diffusion run (sampling.check_objective_flags)."""
    given = given_flags({name: getattr(args, name) for name in setting_defaults()},
                        args.steps if args.steps_given else None)
    given += ["--infill"] * bool(args.infill) + ["--suffix"] * (args.suffix is not None)
    check_objective_flags(objective.name, given, args.model_dir)


def main(argv=None):
    """Print samples of the run folder given in `argv`; raises UsageError on bad input."""
    args = parse_args(argv)
    keep_freed_memory()
    if args.suffix is not None:
        checked_text(args.suffix, "--suffix")
    run = api.load(args.model_dir, args.ema, args.device, args.precision)
    check_objective(args, run.objective)
    prompts, settings = read_prompts(args), args.settings
    samples = run.draw_prompts(prompts, args.num_samples, settings, args.suffix, args.length, args.seed,
                               args.batch_size, args.progress)
    warn_if_emulated(args.precision, run.device)  # once the request is known to be good
    print(f"{len(prompts) * args.num_samples} samples, " + {
        "ar": f"autoregressive, temperature {settings.temperature:g}, top-p {settings.top_p:g}",
        "mdlm": f"masked diffusion, {settings.steps} unmasking steps, temperature {settings.temperature:g}, top-p "
                f"{settings.top_p:g}",
        "diffusion": f"{settings.sampler} sampler, {settings.schedule} schedule, {settings.steps} steps, sigma "
                     f"{run.sampling['sigma_max']} -> {run.sampling['sigma_min']}"}[run.objective.name],
          file=sys.stderr)
    evaluations = 0
    for sample in samples:
        text = sample.text
        if args.jsonl:
            text = json.dumps({"sample": sample.index, "seed": args.seed, "prompt": sample.prompt, "text": text,
                               "ids": sample.ids, "steps": sample.steps, "evaluations": sample.evaluations},
                              ensure_ascii=False)
        tqdm.write(text, file=sys.stdout)  # above the progress bar; stdout holds the samples alone
        sys.stdout.flush()
        evaluations += sample.evaluations
    print(f"mean network evaluations per sample: {evaluations / (len(prompts) * args.num_samples):.1f}",
          file=sys.stderr)


if __name__ == "__main__":
    run_command(main)
