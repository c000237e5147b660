"""Several processes: torchrun with 2 CPU processes and the gloo backend."""
import json
import os
import shutil
import subprocess
import sys

import torch

from conftest import ROOT
from conftest import TINY


def torchrun(*args, timeout=180):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_ddp_gradient_equals_the_single_process_gradient_of_the_same_global_batch(tmp_path, corpus_file, spm_path):
    out = tmp_path / "difference.txt"
    torchrun(os.path.join("tests", "ddp_gradient.py"), corpus_file, spm_path, str(tmp_path / "cache"), str(out))
    difference, scale = map(float, out.read_text().split())
    assert scale > 1e-3 and difference < 1e-6 * max(scale, 1.0), (difference, scale)


def test_torchrun_trains_writes_once_and_resumes_like_a_straight_run(tmp_path, corpus_file, spm_path):
    flags = [*TINY, "--num_workers", "0", "--log_interval", "1"]

    def train_ddp(model_dir, *extra):
        torchrun("train.py", "-d", corpus_file, "-spm", spm_path, "-mdir", str(model_dir), *flags, *extra)
        return torch.load(model_dir / "ckpt.pt", weights_only=True)

    straight = train_ddp(tmp_path / "straight", "--max_steps", "4", "--save_interval", "2", "--keep", "2")
    steps = [json.loads(line)["step"] for line in open(tmp_path / "straight" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]  # rank 0 alone writes
    stopped = tmp_path / "resumed"  # the run as it was after step 2
    stopped.mkdir()
    shutil.copyfile(tmp_path / "straight" / "ckpt-00000002.pt", stopped / "ckpt.pt")
    shutil.copyfile(tmp_path / "straight" / "tokenizer.model", stopped / "tokenizer.model")
    assert len(torch.load(stopped / "ckpt.pt", weights_only=True)["rng_ranks"]) == 2
    resumed = train_ddp(stopped, "--max_steps", "4", "--save_interval", "2", "--keep", "2")
    for name, tensor in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=1e-6, msg=name)
    assert resumed["data_state"] == straight["data_state"]
