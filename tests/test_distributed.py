"""Several processes: torchrun with CPU processes and the gloo backend, on one "machine" and on two (two torchrun
agents meeting at a c10d rendezvous on localhost), with DistributedDataParallel and with --fsdp."""
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading

import pytest
import torch

import checkpoint
import flags
import sharding
import utils
from conftest import ROOT, TINY
from utils import UsageError

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FLAGS = [*TINY, "--num_workers", "0", "--log_interval", "1"]


def torchrun(*args, timeout=180):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def two_machines(*args, mdirs=None, timeout=180):
    """torchrun on two "machines" of two processes each (two agents, a c10d rendezvous on localhost); `mdirs`, one
    -mdir for each machine's processes (else args has it). Returns both agents' results."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agents = []
    for machine in range(2):
        own = ["-mdir", str(mdirs[machine])] if mdirs else []
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test", *args, *own]
        agents.append(subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env=ENV))
    results = []
    for agent in agents:
        stdout, stderr = agent.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(agent.args, agent.returncode, stdout, stderr))
    return results


def metrics_losses(model_dir):
    return [json.loads(line)["loss"] for line in open(model_dir / "metrics.jsonl") if '"loss"' in line]


def run_from(source, step, folder):
    """A run folder holding `source`'s step-`step` checkpoint as its own, with its tokenizer and flags (the run as it
    was after that step)."""
    folder.mkdir()
    shutil.copyfile(source / f"ckpt-{step:08d}.pt", folder / "ckpt.pt")
    for name in ("tokenizer.model", "args.json"):
        shutil.copyfile(source / name, folder / name)
    return folder


# 12 steps, a checkpoint at step 6: the resume falls inside a window of the time warp, whose fit at step 10 sums
# what every rank observed since step 0
STEPS = ["--max_steps", "12", "--save_interval", "6", "--keep", "2"]


def assert_same_weights(a, b, atol=1e-6):
    for name, tensor in b["model"].items():
        torch.testing.assert_close(a["model"][name], tensor, rtol=0, atol=atol, msg=name)


def steps_script(tmp_path, corpus_file, spm_path, launch, *flags):
    out = tmp_path / "difference.json"
    results = launch(os.path.join("tests", "distributed_steps.py"), corpus_file, spm_path, str(tmp_path / "cache"),
                     str(out), *flags)
    for result in results if isinstance(results, list) else [results]:
        assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("launch, flags", [
    (torchrun, []), (two_machines, []), (torchrun, ["--fsdp"]), (torchrun, ["--objective", "mdlm"]),
    (torchrun, ["--objective", "ar", "--fsdp"])],
    ids=["2 processes", "2 machines x 2 processes", "2 processes, --fsdp", "masked diffusion", "baseline, --fsdp"])
def test_steps_equal_the_single_process_steps_of_the_same_global_batch(tmp_path, corpus_file, spm_path, launch,
                                                                       flags):
    found = steps_script(tmp_path, corpus_file, spm_path, launch, *flags)
    assert found["steps"] == 3 and found["scale"] > 1e-3, found
    assert found["gradient"] < 1e-6 * max(found["scale"], 1.0), found  # fp32 sums in another order
    # Adam divides a gradient entry by its own root plus eps (1e-4 here): a rounding difference d moves a weight by
    # at most lr / eps * d (1e-2 / 1e-4 * 2e-7), where a wrong batch moves every weight by about the whole rate
    assert found["losses"] < 1e-5 and found["weights"] < 1e-3, found


def test_torchrun_trains_writes_once_and_resumes_like_a_straight_run(tmp_path, corpus_file, spm_path):
    def train_ddp(model_dir, *extra):
        torchrun("train.py", "-d", corpus_file, "-spm", spm_path, "-mdir", str(model_dir), *FLAGS, *extra)
        return torch.load(model_dir / "ckpt.pt", weights_only=True)

    straight = train_ddp(tmp_path / "straight", *STEPS)
    assert [json.loads(line)["step"] for line in open(tmp_path / "straight" / "metrics.jsonl")] == list(range(1, 13))
    stopped = run_from(tmp_path / "straight", 6, tmp_path / "resumed")  # rank 0 alone wrote the lines above
    saved = torch.load(stopped / "ckpt.pt", weights_only=True)
    assert len(saved["rng_ranks"]) == 2 and len(saved["time_warp_windows"]) == 2
    assert not torch.equal(*saved["time_warp_windows"])  # each rank observed its own rows
    resumed = train_ddp(stopped, *STEPS)
    assert_same_weights(resumed, straight)
    assert resumed["data_state"] == straight["data_state"]


def test_two_machines_train_resume_exactly_and_refuse_run_folders_they_do_not_share(tmp_path, corpus_file, spm_path):
    args = ["train.py", "-d", corpus_file, "-spm", spm_path, *FLAGS, "-bsz", "2", *STEPS]
    for result in two_machines(*args, "-mdir", str(tmp_path / "straight")):
        assert result.returncode == 0, result.stderr[-3000:]
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    assert len(straight["rng_ranks"]) == 4
    assert [json.loads(line)["step"] for line in open(tmp_path / "straight" / "metrics.jsonl")] == list(range(1, 13))
    stopped = run_from(tmp_path / "straight", 6, tmp_path / "resumed")
    for result in two_machines(*args, "-mdir", str(stopped)):
        assert result.returncode == 0, result.stderr[-3000:]
    resumed = torch.load(stopped / "ckpt.pt", weights_only=True)
    assert_same_weights(resumed, straight)
    assert resumed["data_state"] == straight["data_state"]
    # the second machine does not see the run folder (a local disk): every process stops, saying why
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    results = two_machines(*args, mdirs=[run_from(tmp_path / "straight", 6, tmp_path / "local"), elsewhere])
    assert all(result.returncode != 0 for result in results)
    assert "the processes found different checkpoints (steps 0 to 6): every machine must read the same -mdir" in \
        results[0].stderr + results[1].stderr


def test_fsdp_trains_as_ddp_does_with_half_the_parameters_a_process_and_resumes_with_or_without_it(
        tmp_path, corpus_file, spm_path):
    def train(model_dir, *extra, launcher=torchrun):
        result = launcher("train.py", "-d", corpus_file, "-spm", spm_path, "-mdir", str(model_dir), *FLAGS, *STEPS,
                          "--sample_interval", "9", "--probe_interval", "6", *extra)
        return result, torch.load(model_dir / "ckpt.pt", weights_only=True)

    ddp_run, ddp = train(tmp_path / "ddp")
    fsdp_run, fsdp = train(tmp_path / "fsdp", "--fsdp")
    # the same draws on every rank (the coins shared, the noise each rank's own): the same losses, samples and probes
    assert metrics_losses(tmp_path / "fsdp") == pytest.approx(metrics_losses(tmp_path / "ddp"), rel=1e-5)
    samples = [[line for line in run.stdout.splitlines() if line.startswith("[step")] for run in (ddp_run, fsdp_run)]
    assert len(samples[0]) == 8 and samples[1] == samples[0]  # steps 9 and 12, from the gathered EMA weights
    probes = [[x or 0.0 for line in open(tmp_path / run / "metrics.jsonl") if "grad_share_by_level" in line
               for x in json.loads(line)["grad_share_by_level"]] for run in ("ddp", "fsdp")]
    assert len(probes[0]) == 16 and probes[1] == pytest.approx(probes[0], abs=1e-5)  # steps 6 and 12, raw weights
    assert_same_weights(fsdp, ddp, atol=1e-5)
    for rate, ema in ddp["ema"].items():  # the EMAs kept over the shards, gathered whole
        assert_same_weights({"model": fsdp["ema"][rate]}, {"model": ema}, atol=1e-5)
    full = int(re.search(r"([\d,]+) parameters on", ddp_run.stderr).group(1).replace(",", ""))
    held = int(re.search(r"each holding ([\d,]+) \(--fsdp\)", fsdp_run.stderr).group(1).replace(",", ""))
    assert 0.45 < held / full <= 0.55, (held, full)
    # a sharded checkpoint is full tensors: it resumes sharded exactly, replicated (--fsdp is not taken from args.json)
    # as DDP would have gone on, and in one process at the same rows a step
    _, resumed = train(run_from(tmp_path / "fsdp", 6, tmp_path / "resumed"), "--fsdp")
    assert_same_weights(resumed, fsdp, atol=0)
    assert resumed["data_state"] == fsdp["data_state"]
    replicated_run, replicated = train(run_from(tmp_path / "fsdp", 6, tmp_path / "replicated"))
    assert "(--fsdp)" not in replicated_run.stderr
    assert_same_weights(replicated, ddp, atol=1e-5)
    single = run_from(tmp_path / "fsdp", 6, tmp_path / "single")
    refused = subprocess.run([sys.executable, "train.py", "-d", corpus_file, "-spm", spm_path, "-mdir", str(single),
                              *FLAGS, *STEPS], cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        "error: -bsz 4 x 1 process x --accumulation_steps 1 = 4 rows a step; the run was trained with 8 (-bsz 4 x 2 "
        "x 1): resume with -bsz 8, or start a new -mdir for another batch")
    subprocess.run([sys.executable, "train.py", "-d", corpus_file, "-spm", spm_path, "-mdir", str(single), *FLAGS,
                    *STEPS, "-bsz", "8"], cwd=ROOT, check=True, capture_output=True, env=ENV)
    assert torch.load(single / "ckpt.pt", weights_only=True)["data_state"] == fsdp["data_state"]
    sampled = subprocess.run([sys.executable, "sample.py", "-mdir", str(tmp_path / "fsdp"), "-n", "2", "--steps", "5",
                              "--no-progress"], cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert sampled.returncode == 0 and len(sampled.stdout.strip().splitlines()) == 2, sampled.stderr[-2000:]


def test_fsdp_in_one_process_and_another_batch_on_resume_are_one_line_errors(tmp_path, corpus_file, spm_path):
    single = subprocess.run([sys.executable, "train.py", "-d", corpus_file, "-spm", spm_path, "-mdir",
                             str(tmp_path / "run"), *FLAGS, "--fsdp"], cwd=ROOT, capture_output=True, text=True,
                            env=ENV)
    assert single.returncode == 2 and single.stderr.strip().splitlines()[-1] == (
        "error: --fsdp shards over the processes of a torchrun run: start it with torchrun --nproc-per-node N (N of 2 "
        "or more), or drop --fsdp")
    with pytest.raises(UsageError, match="--fsdp on mps: sharding runs on CUDA GPUs or CPUs; drop --fsdp"):
        sharding.check_sharding(2, torch.device("mps"))
    saved = {"args": {"batch_size": 4, "accumulation_steps": 1}, "rng": {}, "rng_ranks": [{}, {}]}  # 8 rows a step
    args = type("Args", (), {"batch_size": 2, "accumulation_steps": 2})
    checkpoint.check_rows_a_step(saved, args, 2)  # 2 x 2 processes x 2: the same 8 rows
    args.accumulation_steps = 3
    with pytest.raises(UsageError, match=r"= 12 rows a step; the run was trained with 8 \(-bsz 4 x 2 x 1\): resume "
                                         r"with -bsz and --accumulation_steps whose product is 4"):
        checkpoint.check_rows_a_step(saved, args, 2)
    with pytest.raises(UsageError, match="resume with a number of processes that divides 8"):
        checkpoint.check_rows_a_step(saved, args, 3)
    args.accumulation_steps = 1
    with pytest.raises(UsageError, match="resume with -bsz 8, or start a new -mdir"):
        checkpoint.check_rows_a_step(saved, args, 1)


def test_gradient_sync_asks_ddp_and_fully_shard_alike_for_the_micro_steps_before_the_last():
    calls = []

    class Sharded:
        def set_requires_gradient_sync(self, enabled):
            calls.append(("sharded", enabled))

    class Replicated:
        def no_sync(self):
            calls.append(("ddp", False))
            return contextlib.nullcontext()

    for runner in (Sharded(), Replicated(), object()):
        for last in (False, True):
            with sharding.gradient_sync(runner, last):
                pass
    assert calls == [("sharded", False), ("sharded", True), ("ddp", False)]  # and then back on


def test_teardown_leaves_the_group_and_lets_a_thread_that_waits_for_the_gil_run_before_it_returns(monkeypatch):
    # a gloo worker thread that lets go of a finished collective's tensors needs the GIL: a rank that exits before the
    # thread has had it aborts (utils.distributed_teardown). Here a thread is woken just before the teardown and must
    # have run by the time the teardown returns, where without a pause the main thread keeps the GIL for its switch
    # interval (5 ms) and is done first
    left = []
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: left.append("group"))
    utils.distributed_teardown(1)
    assert left == []  # a single process has no group to leave
    woken, ran = threading.Event(), []

    def worker():
        woken.wait()
        ran.append(sum(range(1000)))

    thread = threading.Thread(target=worker)
    thread.start()
    woken.set()
    utils.distributed_teardown(2)
    finished = bool(ran)
    thread.join()
    assert left == ["group"] and finished


def test_the_slurm_script_starts_one_agent_per_machine_with_train_flags_that_parse(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "srun.log"
    fakes = {"srun": f'echo "$@" >> {log}', "scontrol": "printf 'gpu-a\\ngpu-b\\n'",
             "nvidia-smi": "printf 'GPU 0\\nGPU 1\\n'"}
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[a-b]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "77", "DATA": "c.txt", "SPM": "m.model", "MDIR": "/shared/runs/x",
           "ENCODING_ERRORS": "replace"}
    subprocess.run(["bash", os.path.join(ROOT, "scripts", "slurm_train.sh"), "--preset", "large", "--fsdp"],
                   check=True, env=env, cwd=tmp_path)
    cache, launch = log.read_text().splitlines()
    assert cache.startswith("--nodes 1 --ntasks 1 --cpus-per-task 1 python bench.py data -d c.txt -spm m.model "
                            "--cache_dir /shared/runs/token-cache --encoding_errors replace")
    words = launch.split()[2:]  # after srun's --cpus-per-task
    assert launch.startswith("--cpus-per-task 1 ")
    assert words[:11] == ["torchrun", "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-id", "77", "--rdzv-backend",
                          "c10d", "--rdzv-endpoint", "gpu-a:29500"]
    args = flags.parse_args(words[12:])  # what follows train.py
    assert (args.model_dir, args.cache_dir, args.preset, args.fsdp, args.encoding_errors) == (
        "/shared/runs/x", "/shared/runs/token-cache", "large", True, "replace")  # the cache's key as train.py reads it


def test_on_gpus_in_bf16_the_blocks_gather_bf16_weights_and_reduce_fp32_gradients(monkeypatch):
    import torch.distributed.fsdp as fsdp
    policies = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, mp_policy=fsdp.MixedPrecisionPolicy(): policies.append(
        (type(module).__name__, mp_policy)))
    blocks = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]
    root = torch.nn.ModuleList(blocks)
    sharding.sharded_training_forward(root, blocks, torch.device("cuda"), "bf16")
    bf16 = fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                     cast_forward_inputs=False)  # the rotary phases keep fp32
    assert policies == [("Linear", bf16), ("Linear", bf16), ("ModuleList", fsdp.MixedPrecisionPolicy())]
    for device, precision in (("cuda", "fp32"), ("cpu", "bf16")):  # fp32 weights gathered: the CPU, or fp32 asked
        policies.clear()
        sharding.sharded_training_forward(root, blocks, torch.device(device), precision)
        assert [policy for _, policy in policies] == [fsdp.MixedPrecisionPolicy()] * 3


def test_fsdp_shards_with_the_precision_auto_resolves_to(monkeypatch, tmp_path, corpus_file, spm_path, tokenizer):
    import training
    seen = []
    monkeypatch.setattr(training, "check_sharding", lambda world_size, device: None)
    monkeypatch.setattr(training, "resolve_precision", lambda precision, device: "bf16")  # a GPU with bf16
    monkeypatch.setattr(training, "sharded_training_forward",
                        lambda runner, blocks, device, precision: seen.append(precision) or runner)
    args = flags.parse_args(["-d", corpus_file, "-spm", spm_path, "-mdir", str(tmp_path / "run"), *TINY,
                             "--num_workers", "0", "--fsdp", "--precision", "auto"])
    training.build_state(args, tokenizer, torch.device("cpu"), 0, 2).loader.close()
    assert seen == ["bf16"]  # what the run computes in, not "auto"


def test_each_rank_resumes_its_own_time_warp_window_and_another_count_of_processes_counts_each_once():
    from timewarp import TimeWarp
    saved = TimeWarp(1.0, 50.0, 1.0, bins=4)
    windows = [torch.tensor([[1.0, 2.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]),
               torch.tensor([[0.0, 3.0, 5.0, 0.0], [0.0, 1.0, 2.0, 0.0]])]  # what two ranks observed since the fit
    entry = {"time_warp": saved.state_dict(), "time_warp_windows": windows}

    def window(rank, world_size, restored=entry):
        warp = TimeWarp(1.0, 50.0, 1.0, bins=4)
        checkpoint.restore_warp(restored, warp, lambda message: None, rank, world_size)
        return warp.window

    assert torch.equal(window(1, 2), windows[1])  # the same processes: each its own
    assert torch.equal(window(0, 1), windows[0] + windows[1])  # fewer: rank 0 holds the sum, counted once at the fit
    assert torch.equal(window(0, 3), windows[0] + windows[1]) and not window(2, 3).any()  # more: the others empty
    older = {"time_warp": {**saved.state_dict(), "window": windows[0]}}  # before the windows were kept: rank 0's
    assert torch.equal(window(0, 2, older), windows[0]) and not window(1, 2, older).any()
