"""The checks that need a CUDA GPU, as one script of under 10 minutes on one GPU: training throughput and MFU of the
large preset (bf16, compiled), FlexAttention against SDPA on packed rows (their losses on one seed, eager and
compiled), a resume on the GPU that draws what a straight run does, samples on the GPU and on the CPU from its
checkpoint, masked diffusion trained (with the probe of diagnostics.py) and sampled on the GPU and, with two GPUs
(under 3 minutes more), a run under torchrun and the large preset's step under DDP and sharded (--fsdp): their
throughput, peak memory and parameters a GPU, and losses that agree. Each step is a command of this repository,
run in turn; its figures (the last JSON line it prints on stdout) and its warnings (stderr) go to
OUT/gpu_check.json, then the comparisons between steps.

    python gpu_check.py [-d corpus.txt -spm bpe.model] [-o gpu_check_out]

Without -d and -spm it builds the demo corpus (prepare.py --demo, about 5 s). On a machine without a CUDA device it
says so and exits with status 1, measuring nothing.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import torch

from utils import ArgumentParser, CommandError, run_command

TRAIN_TINY = ("train.py -d {data} -spm {spm} --preset tiny --max_steps 100 --save_interval 50 --keep 2 "
              "--log_interval 1 --precision bf16 --sample_interval 0 --no-progress -mdir {out}/")
KERNELS = "bench.py train -d {data} -spm {spm} -slen 256 --precision bf16 --json"

# (name, seconds allowed, command) of each step; {data}, {spm} and {out} are filled in by plan()
STEPS = [
    ("large preset, bf16, compiled", 150,
     "bench.py train -d {data} -spm {spm} --preset large -slen 256 --precision bf16 --compile --warmup 5 --steps 20 "
     "--json"),
    ("FlexAttention, small preset", 35, KERNELS + " --preset small --attention flex --steps 20"),
    ("SDPA, small preset", 35, KERNELS + " --preset small --attention sdpa --steps 20"),
    ("FlexAttention, tiny preset, compiled", 60, KERNELS + " --preset tiny --attention flex --compile --steps 10"),
    ("SDPA, tiny preset, compiled", 60, KERNELS + " --preset tiny --attention sdpa --compile --steps 10"),
    ("100 steps straight, tiny preset", 50, TRAIN_TINY + "straight"),
    ("the same 100 steps, resumed at step 50", 50, TRAIN_TINY + "resumed"),
    ("samples on the GPU, rows of several lengths", 30,
     "sample.py -mdir {out}/straight -n 8 --steps 50 --early_exit 3 --no-progress"),
    ("the GPU's checkpoint sampled on the CPU", 30, "sample.py -mdir {out}/straight --device cpu -n 4 --steps 50 "
                                                    "--no-progress"),
    ("masked diffusion, 30 steps probed by noise level", 25,
     "train.py -d {data} -spm {spm} --objective mdlm --preset tiny --max_steps 30 --probe_interval 15 "
     "--log_interval 5 --precision bf16 --sample_interval 0 --no-progress -mdir {out}/mdlm"),
    ("masked samples on the GPU", 20, "sample.py -mdir {out}/mdlm -n 8 --no-progress"),
]
# with two GPUs or more, also: two processes under torchrun (NCCL), whose time budget is fitted at step 21 with an
# all-reduce across the ranks, and the large preset's step under DDP and sharded (--fsdp): throughput, peak memory
# and the parameters each GPU holds
TWO_GPU_LARGE = ("torchrun --nproc-per-node 2 bench.py train -d {data} -spm {spm} --preset large -slen 256 "
                 "--precision bf16 --warmup 3 --steps 10 --json")
TWO_GPU_STEPS = [
    ("two GPUs under torchrun, NCCL, a time budget", 50,
     "torchrun --nproc-per-node 2 train.py -d {data} -spm {spm} --preset tiny --time_budget 0.4 --precision bf16 "
     "--sample_interval 0 --no-progress -mdir {out}/two_gpus"),
    ("large preset, two GPUs, DDP", 60, TWO_GPU_LARGE),
    ("large preset, two GPUs, sharded (--fsdp)", 60, TWO_GPU_LARGE + " --fsdp"),
]
SHARDED_LOSS_TOLERANCE = 1e-2  # relative, per step: bf16 all-gathered weights round where DDP's fp32 ones do not
LOSS_TOLERANCE = 1e-2  # relative, per step: bf16 kernels that round differently, not a kernel that is wrong
# relative, per step, the first two after the resume: the same weights, batch and noise give the same loss up to the
# GPU's atomic adds, which are not bit-reproducible; noise drawn afresh moves it by percents
RESUME_STEPS, RESUME_TOLERANCE = (51, 52), 1e-3


HERE = os.path.dirname(os.path.abspath(__file__))  # the scripts run from wherever this one is called


def plan(data, spm, out, steps=None):
    """The steps (default STEPS) as (name, seconds allowed, argv), with the corpus, tokenizer and output folder filled
    in (paths with spaces stay one argument) and each script's path beside this one; a command that starts with
    torchrun runs torch's launcher with this Python."""
    planned = []
    for name, seconds, command in STEPS if steps is None else steps:
        words = [word.format(data=data, spm=spm, out=out) for word in shlex.split(command)]
        launcher = []
        if words[0] == "torchrun":
            script = next(i for i, word in enumerate(words) if word.endswith(".py"))
            launcher, words = ["-m", "torch.distributed.run", *words[1:script]], words[script:]
        planned.append((name, seconds, [sys.executable, *launcher, os.path.join(HERE, words[0]), *words[1:]]))
    return planned


def run_step(name, seconds, argv):
    """Run one step's command with its time allowed: {"step", "seconds", "status"}, its figures (the last line of its
    stdout that is a JSON object; stderr is never parsed, so warnings there cannot hide them), and the tail of its
    stderr ("stderr") or, when it failed, of both."""
    started = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=seconds)
        status, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        status = "timed out"
        stdout, stderr = ((part or b"").decode(errors="replace") for part in (e.stdout, e.stderr))
    result = {"step": name, "seconds": round(time.perf_counter() - started, 1), "status": status}
    figures = last_json_object(stdout)
    if status == 0 and figures is not None:
        result["figures"] = figures
    if stderr.strip():
        result["stderr"] = stderr.strip().splitlines()[-8:]
    if status != 0 and stdout.strip():
        result["stdout"] = stdout.strip().splitlines()[-8:]
    return result


def last_json_object(text):
    """The last line of `text` that is a JSON object, parsed, or None (a sample that starts with "{" is not one)."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                found = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(found, dict):
                return found
    return None


def before_step(name, out):
    """What a step needs done first: the resumed run starts from the straight run's step-50 checkpoint."""
    if name.startswith("the same 100 steps, resumed"):
        resumed = os.path.join(out, "resumed")
        os.makedirs(resumed, exist_ok=True)
        shutil.copyfile(os.path.join(out, "straight", "ckpt-00000050.pt"), os.path.join(resumed, "ckpt.pt"))
        shutil.copyfile(os.path.join(out, "straight", "tokenizer.model"), os.path.join(resumed, "tokenizer.model"))


def loss_difference(a, b):
    """The largest relative difference between two bench steps' losses, step by step, or None without both."""
    la, lb = (step.get("figures", {}).get("losses") for step in (a, b))
    if not la or not lb or len(la) != len(lb):
        return None
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(la, lb))


def logged_losses(folder):
    """{step: loss} of a run folder's metrics.jsonl ({} without one)."""
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


def resume_difference(out):
    """The largest relative difference between the straight and the resumed run's losses at RESUME_STEPS, or None
    unless both logged them and reached step 100."""
    straight, resumed = (logged_losses(os.path.join(out, run)) for run in ("straight", "resumed"))
    if any(max(run, default=0) != 100 or not all(s in run for s in RESUME_STEPS) for run in (straight, resumed)):
        return None
    return max(abs(resumed[s] - straight[s]) / max(abs(straight[s]), 1e-12) for s in RESUME_STEPS)


def weight_difference(path_a, path_b):
    """The largest absolute difference between the weights of two checkpoints, or None if either is missing."""
    if not (os.path.isfile(path_a) and os.path.isfile(path_b)):
        return None
    a, b = (torch.load(p, map_location="cpu", weights_only=True)["model"] for p in (path_a, path_b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def comparisons(steps, out):
    """Each comparison between steps: {"compare", "difference", "tolerance", "agree"} (difference None when a step
    it needs failed; agree is then False)."""
    by_name = {step["step"]: step for step in steps}
    found = [("FlexAttention against SDPA, losses of 25 steps, eager",
              loss_difference(by_name["FlexAttention, small preset"], by_name["SDPA, small preset"]), LOSS_TOLERANCE),
             ("FlexAttention against SDPA, losses of 15 steps, compiled",
              loss_difference(by_name["FlexAttention, tiny preset, compiled"], by_name["SDPA, tiny preset, compiled"]),
              LOSS_TOLERANCE),
             ("a run resumed at step 50 against a straight one, losses of steps 51 and 52", resume_difference(out),
              RESUME_TOLERANCE)]
    if "large preset, two GPUs, DDP" in by_name:
        found.append(("the large preset sharded against DDP, losses of 13 steps",
                      loss_difference(by_name["large preset, two GPUs, sharded (--fsdp)"],
                                      by_name["large preset, two GPUs, DDP"]), SHARDED_LOSS_TOLERANCE))
    return [{"compare": what, "difference": difference, "tolerance": tolerance,
             "agree": difference is not None and difference <= tolerance} for what, difference, tolerance in found]


def write_results(results, out):
    """OUT/gpu_check.json, written whole (a stopped check leaves the last version)."""
    path = os.path.join(out, "gpu_check.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


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
    for run in ("straight", "resumed", "two_gpus"):  # a folder of an earlier check would be resumed, not trained
        shutil.rmtree(os.path.join(args.output_dir, run), ignore_errors=True)
    results = {"device": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
               "steps": []}
    steps = plan(data, spm, args.output_dir)
    if torch.cuda.device_count() >= 2:
        steps += plan(data, spm, args.output_dir, TWO_GPU_STEPS)
    for name, seconds, command in steps:
        try:
            before_step(name, args.output_dir)
            results["steps"].append(run_step(name, seconds, command))
        except Exception as e:  # what the step needs is missing (an earlier step failed), or its output is unreadable
            results["steps"].append({"step": name, "seconds": 0.0, "status": f"not run: {type(e).__name__}: {e}"})
        print(json.dumps(results["steps"][-1]), flush=True)
        write_results(results, args.output_dir)  # kept so far if the check is stopped
    try:
        results["comparisons"] = comparisons(results["steps"], args.output_dir)
        results["resumed_weight_difference"] = weight_difference(
            *(os.path.join(args.output_dir, run, "ckpt.pt") for run in ("straight", "resumed")))
    except Exception as e:  # a run folder's files unreadable: said, and the steps' figures kept
        results["comparisons"] = [{"compare": "all", "difference": None, "tolerance": None, "agree": False,
                                   "error": f"{type(e).__name__}: {e}"}]
    for comparison in results["comparisons"]:
        print(json.dumps(comparison), flush=True)
    write_results(results, args.output_dir)
    failed = [s["step"] for s in results["steps"] if s["status"] != 0]
    failed += [c["compare"] for c in results["comparisons"] if not c["agree"]]
    if failed:
        raise CommandError(f"{len(failed)} checks failed: {'; '.join(failed)} (gpu_check.json)")


if __name__ == "__main__":
    run_command(main)
