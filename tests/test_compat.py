"""A run folder written by an earlier version of this project (tests/fixtures/main_run, see its README.md) still
resumes, samples and evaluates, and gives what that version gave (its Monte Carlo bound within the error)."""
import json
import math
import platform
import shutil

import pytest
import torch

import eval as evaluate
import sample
import train
from conftest import FIXTURES

RUN_FLAGS = ["-dim", "32", "-nl", "1", "-nh", "2", "-emb", "8", "-bsz", "4", "-slen", "32", "-lr", "3e-3", "-wus", "0",
             "-ema", "0.999", "--save_interval", "3", "--log_interval", "1", "--num_workers", "0", "--sample_interval",
             "0", "--no-progress"]


@pytest.fixture
def old_run(tmp_path):
    """A copy of the fixture's run folder (stopped after step 3 of 6) and what the old version gave."""
    run = tmp_path / "run"
    shutil.copytree(f"{FIXTURES}/main_run", run)
    return run, json.loads((run / "expected.json").read_text())


def tolerance(expected):
    """Relative tolerance of the comparisons: floating-point noise on the platform that wrote the fixture (its torch
    build and machine), loose elsewhere, where other kernels round differently."""
    same = torch.__version__ == expected["torch"] and platform.machine() == expected["machine"]
    return 1e-6 if same else 1e-3


def fingerprint(state_dict):
    return {k: [float(v.double().sum()), float((v.double() ** 2).sum())] for k, v in state_dict.items()}


def test_an_old_run_resumes_to_the_weights_the_old_version_reached(old_run, capsys):
    run, expected = old_run
    train.main(["-d", str(run / "corpus.txt"), "-spm", str(run / "tokenizer.model"), "-mdir", str(run),
                "--max_steps", "6", *RUN_FLAGS])
    assert "warning" not in capsys.readouterr().err  # no flag reads as changed
    checkpoint = torch.load(run / "ckpt.pt", weights_only=True)
    data_state = expected["step_6"]["data_state"]  # fields added since then take the old behaviour's values
    assert checkpoint["step"] == 6 and checkpoint["data_state"] == {**data_state, "cond_prob": 1.0}
    for name, state in (("model", checkpoint["model"]), ("ema_0.999", checkpoint["ema"]["0.999"])):
        got = fingerprint(state)
        assert got.keys() == expected["step_6"][name].keys()
        for key, values in expected["step_6"][name].items():
            assert got[key] == pytest.approx(values, rel=tolerance(expected), abs=1e-9), (name, key)
    losses = {str(line["step"]): line["loss"] for line in map(json.loads, open(run / "metrics.jsonl"))}
    assert {step: losses[step] for step in ("4", "5", "6")} == pytest.approx(expected["step_6"]["loss"],
                                                                             rel=tolerance(expected))


def test_an_old_run_samples_and_evaluates_as_the_old_version_did(old_run, capsys):
    run, expected = old_run
    # in fp32, as the old version sampled by default (auto is bf16 on CPUs that have it)
    sample.main(["-mdir", str(run), "-n", "3", "--steps", "5", "--jsonl", "--prompt", "the river",
                 "--precision", "fp32"])
    sample.main(["-mdir", str(run), "-n", "2", "--steps", "4", "--ema", "0.999", "--sampler", "heun", "--schedule",
                 "ar", "--jsonl", "--precision", "fp32"])
    samples = [json.loads(line)["ids"] for line in capsys.readouterr().out.splitlines()]
    if tolerance(expected) < 1e-3:  # argmax tokens of an untrained model flip under another platform's rounding
        assert samples == expected["samples"]
    assert [len(ids) for ids in samples] == [len(ids) for ids in expected["samples"]]
    assert all(ids[:5] == want[:5] for ids, want in zip(samples[:3], expected["samples"][:3]))  # bos, held prompt
    evaluate.main(["-mdir", str(run), "--valid", str(run / "corpus.txt"), "--draws", "2", "--sigmas", "3",
                   "--plot_dir", str(run), "--json"])
    result = json.loads(capsys.readouterr().out)
    expected_curve = expected["eval"].pop("ce_by_sigma")
    # the bound's draws are seeded per line now (scoring.line_seeds): another Monte Carlo estimate of the same bound,
    # equal within its error; the prior term and the counts draw nothing
    bound, error = expected["eval"].pop("nll_bound_nats_per_token"), expected["eval"].pop("bound_stderr")
    assert abs(result["nll_bound_nats_per_token"] - bound) < 4 * math.hypot(error, result["bound_stderr"])
    assert result["bound_stderr"] == pytest.approx(error, rel=0.5)
    prior = expected["eval"].pop("bound_terms")["prior"]
    assert result["bound_terms"]["prior"] == pytest.approx(prior, rel=tolerance(expected))
    for key, value in expected["eval"].items():
        assert result[key] == pytest.approx(value, rel=tolerance(expected)), key
    assert [point.keys() for point in result["ce_by_sigma"]] == [point.keys() for point in expected_curve]
    for point, expected_point in zip(result["ce_by_sigma"], expected_curve):  # its noise no longer follows the bound's
        assert point["sigma"] == expected_point["sigma"]
        assert point["ce"] == pytest.approx(expected_point["ce"], rel=0.02)
        assert point["accuracy"] == pytest.approx(expected_point["accuracy"], abs=0.02)
