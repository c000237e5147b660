"""The checks that need a CUDA GPU, as one script of under 10 minutes: training throughput and MFU of the large
preset (bf16, compiled), FlexAttention against SDPA on packed rows, a short bf16 training, and its CUDA checkpoint
sampled on the CPU. Each step is a command of this repository, run in turn; the figures go to OUT/gpu_check.json.

    python gpu_check.py [-d corpus.txt -spm bpe.model] [-o gpu_check_out]

Without -d and -spm it builds the demo corpus (prepare.py --demo, about 5 s). On a machine without a CUDA device it
says so and exits with status 1, measuring nothing.
"""
import json
import os
import shlex
import subprocess
import sys
import time

import torch

from utils import ArgumentParser, CommandError, run_command

# (name, seconds allowed, command) of each step; {data}, {spm} and {out} are filled in by plan()
STEPS = [
    ("large preset, bf16, compiled", 240,
     "bench.py train -d {data} -spm {spm} --preset large -slen 256 --precision bf16 --compile --warmup 5 --steps 20 "
     "--json"),
    ("FlexAttention, small preset, rows of 256", 60,
     "bench.py train -d {data} -spm {spm} --preset small -slen 256 --precision bf16 --attention flex --steps 20 "
     "--json"),
    ("SDPA, small preset, rows of 256", 60,
     "bench.py train -d {data} -spm {spm} --preset small -slen 256 --precision bf16 --attention sdpa --steps 20 "
     "--json"),
    ("short training, small preset, bf16", 120,
     "train.py -d {data} -spm {spm} -mdir {out}/run --preset small --max_steps 300 --precision bf16 "
     "--sample_interval 0 --save_interval 300 --no-progress"),
    ("the CUDA checkpoint sampled on the CPU", 60,
     "sample.py -mdir {out}/run --device cpu -n 4 --steps 50 --no-progress"),
]


HERE = os.path.dirname(os.path.abspath(__file__))  # the scripts run from wherever this one is called


def plan(data, spm, out):
    """The steps as (name, seconds allowed, argv), with the corpus, tokenizer and output folder filled in (paths
    with spaces stay one argument) and each script's path beside this one."""
    steps = []
    for name, seconds, command in STEPS:
        script, *rest = shlex.split(command)
        argv = [word.format(data=data, spm=spm, out=out) for word in rest]
        steps.append((name, seconds, [sys.executable, os.path.join(HERE, script)] + argv))
    return steps


def run_step(name, seconds, argv):
    """Run one step's command with its time allowed: {"step", "seconds", "status"} and its JSON figures or the
    tail of its output."""
    started = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds)
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        status = "timed out"
        output = "".join((part or b"").decode(errors="replace") for part in (e.stdout, e.stderr))
    result = {"step": name, "seconds": round(time.perf_counter() - started, 1), "status": status}
    last = output.strip().splitlines()[-1] if output.strip() else ""
    if status == 0 and last.startswith("{"):
        result["figures"] = json.loads(last)
    else:
        result["output"] = output.strip().splitlines()[-8:]
    return result


def build_parser():
    """gpu_check.py's command line."""
    p = ArgumentParser(prog="gpu_check.py", description=__doc__)
    p.add_argument("-d", "--data_path", help="corpus, one example a line (default: the demo corpus, built here)")
    p.add_argument("-spm", "--spm_model", help="its SentencePiece model (with -d)")
    p.add_argument("-o", "--output_dir", default="gpu_check_out", help="folder of the run and gpu_check.json")
    return p


def main(argv=None):
    """Run every step on the GPU; CommandError (status 1) without one, or when a step failed."""
    p = build_parser()
    args = p.parse_args(argv)
    if (args.data_path is None) != (args.spm_model is None):
        p.error("give -d and -spm together, or neither (the demo corpus)")
    if not torch.cuda.is_available():
        raise CommandError("no GPU found (torch.cuda.is_available() is False): nothing was measured; run this on a "
                           "machine with a CUDA device")
    os.makedirs(args.output_dir, exist_ok=True)
    data, spm = args.data_path, args.spm_model
    if data is None:
        corpus = os.path.join(args.output_dir, "demo")
        if not os.path.exists(os.path.join(corpus, "bpe.model")):
            built = subprocess.run([sys.executable, os.path.join(HERE, "prepare.py"), "--demo", "-o", corpus],
                                   capture_output=True, text=True)
            if built.returncode:
                tail = built.stderr.strip().splitlines() or [f"exit status {built.returncode}"]
                raise CommandError(f"the demo corpus was not built in {corpus}: {tail[-1]}")
        data, spm = os.path.join(corpus, "train.txt"), os.path.join(corpus, "bpe.model")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": []}
    for name, seconds, command in plan(data, spm, args.output_dir):
        results["steps"].append(run_step(name, seconds, command))
        print(json.dumps(results["steps"][-1]), flush=True)
    with open(os.path.join(args.output_dir, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=1)
    failed = [s["step"] for s in results["steps"] if s["status"] != 0]
    if failed:
        raise CommandError(f"{len(failed)} of {len(STEPS)} steps failed: {', '.join(failed)} (gpu_check.json)")


if __name__ == "__main__":
    run_command(main)
