"""--wandb: the metrics and the printed samples go to a Weights & Biases run (offline here), a resumed run continues
it, and a run without the flag never imports wandb."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, run_train


def test_an_offline_wandb_run_gets_the_metrics_and_samples_and_resumes(tmp_path, corpus_file, spm_path,
                                                                        monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    real_log = wandb.sdk.wandb_run.Run.log

    def spy(self, data, step=None, **kwargs):
        logged.append((step, data))
        return real_log(self, data, step=step, **kwargs)
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    run = tmp_path / "run"
    flags = ["--wandb", "tests", "--log_interval", "2", "--sample_interval", "4"]
    run_train(corpus_file, spm_path, run, "--max_steps", "4", *flags)
    first_id = (run / "wandb_id").read_text()
    run_train(corpus_file, spm_path, run, "--max_steps", "6", *flags)
    assert (run / "wandb_id").read_text() == first_id
    offline = sorted(d for d in os.listdir(run / "wandb") if d.startswith("offline-run-"))
    # wandb appends "-1" to a folder whose name (second and id) is taken: two runs can start in one second
    assert len(offline) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{first_id}(-\d+)?", d)
                                     for d in offline)  # one W&B run, continued
    assert all(any(f.endswith(".wandb") for f in os.listdir(run / "wandb" / d)) for d in offline)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    numbers = [(step, data) for step, data in logged if "loss" in data]
    assert [step for step, _ in numbers] == [line["step"] for line in lines] == [2, 4, 6]
    assert all(data["loss"] == line["loss"] for (_, data), line in zip(numbers, lines))
    samples = [(step, data["samples"]) for step, data in logged if "samples" in data]
    assert [step for step, _ in samples] == [4, 6] and len(samples[0][1].data) == 4  # each run's last step


def test_a_run_without_wandb_never_imports_it(tmp_path, corpus_file, spm_path):
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, 'tests')!r}); "
            f"from conftest import run_train; run_train({str(corpus_file)!r}, {str(spm_path)!r}, "
            f"{str(tmp_path / 'run')!r}, '--max_steps', '2'); assert 'wandb' not in sys.modules, 'imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
