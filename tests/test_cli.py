"""End to end through the entry points: prepare, train, resume, sample, and their error messages."""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import flags
import prepare
import train
from checkpoint import load_model
from conftest import ROOT, TINY, run_train
from corpus import Tokenizer
from diffusion import network_logits
from utils import UsageError


@pytest.mark.parametrize("flags, stop_at", [([], 10),
                                            (["--self_cond", "0.5", "--time_warp", "--multilevel_prob", "0.5"], 7),
                                            (["--objective", "mdlm", "--multilevel_prob", "0.5"], 9),
                                            (["--time_warp", "--warp_shape", "gumbel", "--anchor_prob", "0.5",
                                              "--elbo_weight", "0.5", "--probe_interval", "4", "--probe_lines", "3",
                                              "--conditioning", "shared", "--adam_eps", "1e-6",
                                              "--embedding_lr_scale", "0"], 8)])
def test_resumed_run_reaches_the_same_step_and_weights_as_a_straight_one(tmp_path, corpus_file, spm_path, monkeypatch,
                                                                         flags, stop_at):
    saved = {}
    real_save = train.save_checkpoint

    def save_and_keep(checkpoint, path):
        real_save(checkpoint, path)
        shutil.copyfile(path, tmp_path / f"step{checkpoint['step']}.pt")
        saved[checkpoint["step"]] = path

    monkeypatch.setattr(train, "save_checkpoint", save_and_keep)
    every_step = ["--max_steps", "20", "--save_interval", str(stop_at), "--log_interval", "1", *flags]
    straight = run_train(corpus_file, spm_path, tmp_path / "straight", *every_step)
    assert stop_at in saved and 20 in saved
    # a run stopped after step `stop_at`: its folder holds that checkpoint; starting it again resumes (with the
    # time warp, between two refits, so its window of losses must survive too)
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copyfile(tmp_path / f"step{stop_at}.pt", stopped / "ckpt.pt")
    shutil.copyfile(tmp_path / "straight" / "tokenizer.model", stopped / "tokenizer.model")
    resumed = run_train(corpus_file, spm_path, stopped, *every_step)
    assert resumed["step"] == straight["step"] == 20
    for name, tensor in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=1e-6, msg=name)
    for name, tensor in straight["ema"]["0.999"].items():
        torch.testing.assert_close(resumed["ema"]["0.999"][name], tensor, rtol=0, atol=1e-6, msg=name)
    assert resumed["data_state"] == straight["data_state"]
    if "--time_warp" in flags:
        assert straight["time_warp"]["counts"].sum() > 0
        for key in ("means", "counts", "window", "cdf_knots"):
            torch.testing.assert_close(resumed["time_warp"][key], straight["time_warp"][key], rtol=0, atol=1e-5)
    def losses(folder):  # the log lines' (a probe's lines have none)
        lines = [json.loads(line) for line in open(folder / "metrics.jsonl")]
        return [line["loss"] for line in lines if "loss" in line]

    assert len(losses(tmp_path / "straight")) == 20 and len(losses(stopped)) == 20 - stop_at
    assert losses(stopped) == pytest.approx(losses(tmp_path / "straight")[stop_at:], abs=1e-6)  # at every step


def test_tiny_model_overfits_a_handful_of_lines(memorised_run):
    model_dir, lines = memorised_run
    losses = [json.loads(line)["loss"] for line in open(model_dir / "metrics.jsonl")]
    assert losses[0] > 4 and sum(losses[-3:]) / 3 < 1.0, (losses[0], losses[-3:])  # from near ln V = 7.6
    # the trained denoiser recovers every token of the lines from sigma_min = 1
    model, tokenizer, _ = load_model(str(model_dir))
    ids = torch.full((4, 32), tokenizer.pad_id)
    for i, line in enumerate(lines):
        encoded = tokenizer.encode(line)[:32]
        ids[i, :len(encoded)] = torch.tensor(encoded)
    torch.manual_seed(0)
    noisy = model.embed(ids) + torch.randn(4, 32, 16)
    with torch.no_grad():
        predicted = network_logits(model, noisy, torch.ones(4, 32)).argmax(-1)
    assert (predicted == ids).float().mean() > 0.95


def cli(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_bad_inputs_end_with_one_line_errors(tmp_path, corpus_file, corpus_lines, spm_path):
    import sentencepiece as spm
    bad_corpus = str(tmp_path / "bad.txt")
    with open(bad_corpus, "wb") as f:
        f.write(b"good line\n\nbroken \xc3( line\n")
    spm.SentencePieceTrainer.train(input=corpus_file, model_prefix=str(tmp_path / "default"), vocab_size=300,
                                   minloglevel=2)
    cases = [
        (["train.py", "-d", corpus_file, "-spm", str(tmp_path / "default.model"), "-mdir", str(tmp_path / "o")],
         "default.model: the tokenizer has no pad id"),
        (["train.py", "-d", str(tmp_path / "nope.txt"), "-spm", str(tmp_path / "default.model"), "-mdir",
          str(tmp_path / "o")], "default.model"),
        (["train.py", "-d", str(tmp_path), "-spm", spm_path, "-mdir", str(tmp_path / "o")], "is a directory"),
        (["train.py", "-d", bad_corpus, "-spm", spm_path, "-mdir", str(tmp_path / "o")], "bad.txt:3: not UTF-8"),
        (["train.py", "-d", corpus_file, "-spm", corpus_file, "-mdir", str(tmp_path / "o")],
         "corpus.txt: not a readable SentencePiece model"),
        (["sample.py", "-mdir", str(tmp_path / "empty")], "ckpt.pt: no checkpoint there"),
        (["prepare.py", "-i", str(tmp_path / "nope.txt"), "-o", str(tmp_path / "p")], "nope.txt: no such file"),
    ]
    import importlib
    for args, message in cases[1:]:  # in this process: the error raised, its message on one line
        with pytest.raises(UsageError, match=message) as error:
            importlib.import_module(args[0][:-3]).main(args[1:])
        assert "\n" not in str(error.value)
    result = cli(*cases[0][0])  # as a command: one line on stderr, no traceback, exit status 2
    assert result.returncode == 2 and result.stderr == f"error: {tmp_path / 'default.model'}: the tokenizer has no " \
        "pad id; retrain it with bos_id=0 eos_id=1 pad_id=2 unk_id=3 (prepare.py does)\n", result.stderr


def test_boolean_switches_cannot_be_misread():
    with pytest.raises(SystemExit):
        train.parse_args(["-d", "x", "-spm", "y", "-mdir", "z", "--progress", "False"])
    assert train.parse_args(["-d", "x", "-spm", "y", "-mdir", "z", "--no-progress"]).progress is False


def test_prepare_cleans_splits_and_trains_a_tokenizer(tmp_path, corpus_lines):
    raw = tmp_path / "raw.txt"
    body = "\r\n".join(f"  {line}\t " if i % 7 else "" for i, line in enumerate(corpus_lines))
    raw.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    out = tmp_path / "out"
    prepare.main(["-i", str(raw), "-o", str(out), "--vocab_size", "400", "--valid_fraction", "0.1", "--lowercase"])
    train_lines = (out / "train.txt").read_text().splitlines()
    valid_lines = (out / "valid.txt").read_text().splitlines()
    kept = [" ".join(line.split()).lower() for i, line in enumerate(corpus_lines) if i % 7]
    assert sorted(train_lines + valid_lines) == sorted(kept)
    assert 0 < len(valid_lines) < 0.25 * len(kept)
    assert not set(train_lines) & set(valid_lines)
    tokenizer = Tokenizer(str(out / "bpe.model"))
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id) == (0, 1, 2, 3)
    assert tokenizer.vocab_size == 400
    assert [tokenizer.sp.id_to_piece(i) for i in range(4, 14)] == [str(d) for d in range(10)]


def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes(tmp_path, corpus_file, spm_path):
    import signal
    import time
    model_dir = tmp_path / "run"
    args = [sys.executable, "train.py", "-d", corpus_file, "-spm", spm_path, "-mdir", str(model_dir), *TINY,
            "--max_steps", "100000", "--log_interval", "1", "--save_interval", "100000", "--num_workers", "2"]
    process = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while not (model_dir / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C does: the main process and its data workers
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "stopped by SIGINT" in stderr and "Traceback" not in stderr
    step = torch.load(model_dir / "ckpt.pt", weights_only=True)["step"]
    assert step >= 1
    resumed = run_train(corpus_file, spm_path, model_dir, "--max_steps", str(step + 2))
    assert resumed["step"] == step + 2


def test_a_compiled_run_leaves_a_checkpoint_the_plain_model_loads(tmp_path, corpus_file, spm_path, monkeypatch):
    real_compile = torch.compile  # the eager backend: the same wrapping, without minutes of code generation
    monkeypatch.setattr(train.torch, "compile", lambda module, **kw: real_compile(module, backend="eager", **kw))
    model_dir = tmp_path / "run"
    checkpoint = run_train(corpus_file, spm_path, model_dir, "--max_steps", "2", "--compile")
    assert not any("_orig_mod" in name or name.startswith("model.") for name in checkpoint["model"])
    model, _, _ = load_model(str(model_dir))
    assert sum(p.numel() for p in model.parameters()) > 0


def test_an_unexpected_error_with_data_workers_running_ends_the_process(tmp_path, corpus_file, spm_path):
    # the workers ignore SIGTERM (the training process saves on it), so only an explicit close lets Python exit
    script = ("import sys, train\n"
              "def boom(*args): raise RuntimeError('disk full')\n"
              "train.save_checkpoint = boom\n"
              "train.main(sys.argv[1:])\n")
    args = [sys.executable, "-c", script, "-d", corpus_file, "-spm", spm_path, "-mdir", str(tmp_path / "run"),
            *TINY, "--max_steps", "4", "--save_interval", "2", "--num_workers", "2"]
    process = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
    assert process.returncode == 1 and "RuntimeError: disk full" in stderr


@pytest.mark.parametrize("flags, message", [
    (["-smin", "5", "-smax", "2"], "need 1e-4 <= sigma_min < sigma_max <= 1e4"),
    (["-smax", "1e300"], "sigma_max <= 1e4"),
    (["-rho", "inf"], "-rho inf: must be in [0.1, 100]"),
    (["-rho", "1e-300"], "must be in [0.1, 100]"),
    (["-bsz", "0"], "--batch_size 0: must be at least 1"),
    (["-ema", "0.9,x"], "expected comma-separated numbers"),
    (["-ema", "1.5"], "every rate must be in (0, 1)"),
    (["-dim", "30", "-nh", "4"], "heads of even size"),
    (["--expand_prob", "2"], "must be in [0, 1]"),
    (["-dop", "1"], "-dop 1: must be in [0, 1) (at 1 dropout zeroes every block's output)"),
    (["-dop", "-0.1"], "-dop -0.1: must be in [0, 1)"),
    (["--probe_draws", "1"], "--probe_draws 1: must be at least 2"),  # the probe's bound, at its first probe
    (["--output_prior_scale", "0"], "--output_prior_scale 0: must be in (0, 100]"),
    (["--output_prior_scale", "nan"], "--output_prior_scale nan: must be in (0, 100]"),
    (["--output_prior_scale", "1e39"], "--output_prior_scale 1e+39: must be in (0, 100]"),
    (["--objective", "mdlm", "--output_prior_scale", "0"], "--output_prior_scale 0: only for the diffusion objective"),
    (["--no-output_prior", "--output_prior_scale", "2"], "--output_prior_scale 2: weighs the output prior, which"),
    (["--objective", "ar", "--output_prior_scale", "2"], "--output_prior_scale: only for the diffusion objective"),
    (["--fsdp", "--compile"], "--fsdp with --compile: not supported together; drop --compile"),
    (["--fsdp", "--precision", "fp16"], "--fsdp with --precision fp16: not supported together"),
])
def test_bad_flag_values_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["-d", "x", "-spm", "y", "-mdir", "z", *flags])
    assert message in capsys.readouterr().err


def test_an_ema_rate_added_on_resume_starts_from_the_resumed_weights(tmp_path, corpus_file, spm_path, capsys):
    model_dir = tmp_path / "run"
    first = run_train(corpus_file, spm_path, model_dir, "--max_steps", "3", "-ema", "0.999")
    second = run_train(corpus_file, spm_path, model_dir, "--max_steps", "4", "-ema", "0.999,0.5")
    assert "EMA 0.5 is new in this run" in capsys.readouterr().err
    name = "blocks.0.attn.qkv.weight"
    # one EMA step from the step-3 weights, decay min(0.5, (1 + 3) / (10 + 3)) with the warm-up
    decay = min(0.5, 4 / 13)
    expected = decay * first["model"][name] + (1 - decay) * second["model"][name]
    torch.testing.assert_close(second["ema"]["0.5"][name], expected)


def test_unknown_or_unavailable_devices_are_refused():
    from utils import UsageError, resolve_device
    for name in ("foo", "cuda:0" if not torch.cuda.is_available() else "foo"):
        with pytest.raises(UsageError, match=f"--device {name}"):
            resolve_device(name)


def test_prepare_rerun_on_its_own_output_keeps_the_lines_and_counts_bad_bytes(tmp_path, corpus_lines):
    out = tmp_path / "out"
    out.mkdir()
    lines = corpus_lines[:300]
    raw = "\n".join(lines).encode("utf-8") + b"\nbad \xff byte\nkept \xef\xbf\xbd as written\n\n"
    (out / "train.txt").write_bytes(raw)
    prepare.main(["-i", str(out / "train.txt"), "-o", str(out), "--vocab_size", "300", "--valid_fraction", "0"])
    assert (out / "train.txt").read_text().splitlines() == lines + ["bad \ufffd byte", "kept \ufffd as written"]
    assert not list(out.glob("*.tmp"))


def test_prepare_reports_the_lines_it_dropped_and_replaced(tmp_path, corpus_lines, capsys):
    raw = tmp_path / "raw.txt"
    raw.write_bytes(b"\n".join(line.encode() for line in corpus_lines[:300]) + b"\n\n  \nbad \xff\xfe\n")
    prepare.main(["-i", str(raw), "-o", str(tmp_path / "out"), "--vocab_size", "300"])
    err = capsys.readouterr().err
    assert "303 lines read" in err and "2 blank lines dropped" in err and "1 lines had invalid UTF-8" in err


def test_prepare_on_the_valid_side_of_its_own_split_says_why_nothing_is_left_to_train(tmp_path, corpus_lines):
    raw = tmp_path / "raw.txt"
    raw.write_text("\n".join(corpus_lines) + "\n")
    prepare.main(["-i", str(raw), "-o", str(tmp_path / "out"), "--vocab_size", "300", "--valid_fraction", "0.3"])
    with pytest.raises(UsageError, match="valid.txt: every line fell to valid.txt \\(the split is by a hash of each"):
        prepare.main(["-i", str(tmp_path / "out" / "valid.txt"), "-o", str(tmp_path / "again"), "--valid_fraction",
                      "0.3"])
    assert not (tmp_path / "again").exists()


def test_prepare_on_lines_too_long_for_sentencepiece_names_the_file_and_the_limit(tmp_path, corpus_lines):
    raw = tmp_path / "raw.txt"
    raw.write_text("\n".join(" ".join(corpus_lines[i:i + 200]) for i in range(0, 1000, 200)) + "\n")  # > 4,192 bytes
    with pytest.raises(UsageError, match=r"raw.txt: every training line is longer than SentencePiece's 4,192 bytes"):
        prepare.main(["-i", str(raw), "-o", str(tmp_path / "out"), "--vocab_size", "300", "--valid_fraction", "0"])
    assert not (tmp_path / "out").exists()


def test_prepare_counts_the_lines_longer_than_the_default_rows_and_names_the_flag(tmp_path, corpus_lines, capsys):
    short = list(dict.fromkeys(" ".join(line.split()[:4]) for line in corpus_lines))[:200]
    long_lines = [" ".join(corpus_lines[i:i + 8]) for i in range(0, 80, 8)]  # 10 lines of 8 corpus lines each
    out = tmp_path / "out"
    for lines in (short, short + long_lines):
        (tmp_path / "raw.txt").write_text("\n".join(lines) + "\n")
        prepare.main(["-i", str(tmp_path / "raw.txt"), "-o", str(out), "--vocab_size", "300"])
        tokenizer = Tokenizer(str(out / "bpe.model"))
        lengths = sorted(len(tokenizer.encode(line)) for name in ("train.txt", "valid.txt")
                         for line in (out / name).read_text().splitlines())
        err = capsys.readouterr().err
        if lines == short:
            assert lengths[-1] <= 64
            assert f"every line fits train.py's default rows of 64 tokens (the longest: {lengths[-1]})" in err
    assert len(lengths) == 210 and sum(n > 64 for n in lengths) == 10 and lengths[207] > 64  # 99%: 208 of 210
    assert ("note: 10 of 210 lines (4.8%) are longer than train.py's default rows of 64 tokens (bos and eos "
            f"included): training crops them and eval.py leaves them out; -slen {lengths[207]} holds 99% of the lines "
            "whole") in err


def test_a_model_folder_that_cannot_take_a_checkpoint_is_refused_before_training(tmp_path, corpus_file, spm_path):
    model_dir = tmp_path / "run"
    (model_dir / "metrics.jsonl").mkdir(parents=True)
    with pytest.raises(UsageError, match="metrics.jsonl there is not a file"):
        run_train(corpus_file, spm_path, model_dir, "--max_steps", "2")
    assert not (model_dir / "ckpt.pt").exists()


def test_demo_keeps_explicit_flags_and_resume_refuses_another_seed_or_preset(tmp_path, corpus_file, spm_path,
                                                                              monkeypatch, capsys):
    with monkeypatch.context() as m:
        m.chdir(tmp_path)  # not the checkout's own demo/, which a user's `train.py --demo` may have left
        args = train.parse_args(["--demo", "--max_steps", "100000", "--sample_interval", "1000", "--preset", "base"])
        assert (args.max_steps, args.sample_interval, args.preset) == (100000, 1000, "base")
        args = train.parse_args(["--demo"])
        (tmp_path / "demo" / "model").mkdir(parents=True)
        (tmp_path / "demo" / "model" / "args.json").write_text(json.dumps({"preset": "tiny"}))
        with pytest.raises(SystemExit):
            train.parse_args(["--demo", "--preset", "small"])
    assert (args.max_steps, args.sample_interval, args.preset) == (1000, 0, "tiny")
    assert "--preset small: the run in demo/model was started with --preset tiny" in capsys.readouterr().err
    model_dir = tmp_path / "run"
    run_train(corpus_file, spm_path, model_dir, "--max_steps", "2")
    with pytest.raises(Exception, match="--seed 5: the run was started with --seed 1"):
        run_train(corpus_file, spm_path, model_dir, "--max_steps", "3", "--seed", "5")
    # a resumed run keeps its preset's architecture: another --preset is refused, not ignored
    command = ["-d", corpus_file, "-spm", spm_path, "-mdir", str(model_dir)]
    assert train.parse_args(command + ["--preset", "base"]).model_dim == 32  # the preset it was started with
    with pytest.raises(SystemExit):
        train.parse_args(command + ["--preset", "tiny"])
    assert f"--preset tiny: the run in {model_dir} was started with --preset base and keeps its architecture" \
        in capsys.readouterr().err


def test_a_checkpoint_from_before_a_new_model_field_still_resumes(tmp_path, corpus_file, spm_path):
    model_dir = tmp_path / "run"
    run_train(corpus_file, spm_path, model_dir, "--max_steps", "2")
    path = model_dir / "ckpt.pt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["config"]["causal"]  # as written before the autoregressive baseline existed
    torch.save(checkpoint, path)
    assert run_train(corpus_file, spm_path, model_dir, "--max_steps", "4")["step"] == 4


def test_a_resumed_run_keeps_its_own_flags_where_the_defaults_changed_since(tmp_path, corpus_file, spm_path,
                                                                          monkeypatch, capsys):
    model_dir = tmp_path / "run"
    monkeypatch.setitem(flags.DEFAULTS["every"], "output_prior", False)  # the defaults when the run began
    monkeypatch.setitem(flags.DEFAULTS["every"], "cond_prob", 1.0)
    run_train(corpus_file, spm_path, model_dir, "--max_steps", "2", "--multilevel_prob", "0.3")
    monkeypatch.setitem(flags.DEFAULTS["every"], "output_prior", True)  # and after they changed
    monkeypatch.setitem(flags.DEFAULTS["every"], "cond_prob", 0.5)
    command = ["-d", corpus_file, "-spm", spm_path, "-mdir", str(model_dir), "--max_steps", "4"]
    args = train.parse_args(command)
    assert (args.output_prior, args.cond_prob, args.multilevel_prob, args.max_steps) == (False, 1.0, 0.3, 4)
    assert train.parse_args(command + ["--cond_prob", "0.7"]).cond_prob == 0.7  # a flag given still wins
    with pytest.raises(SystemExit):
        train.parse_args(["-mdir", str(model_dir)])
    assert "--data_path is required (or use --demo); a resumed run takes -d and -spm again" in capsys.readouterr().err
    saved = json.loads((model_dir / "args.json").read_text())
    (model_dir / "args.json").write_text(json.dumps({**saved, "compile": True, "tensorboard": True}))
    args = train.parse_args(command)
    assert (args.compile, args.tensorboard) == (True, True)  # on-off flags resume as they were too
    assert train.parse_args(command + ["--no-compile", "--no-tensorboard"]).compile is False
    # an args.json written before a flag existed: the flag takes the behaviour from before it
    del saved["output_prior"], saved["cond_prob"]
    (model_dir / "args.json").write_text(json.dumps(saved))
    args = train.parse_args(command)
    assert (args.output_prior, args.cond_prob) == (False, 1.0)
    assert run_train(corpus_file, spm_path, model_dir, "--max_steps", "4")["step"] == 4  # no model flag differs
    fresh = train.parse_args(["-d", corpus_file, "-spm", spm_path, "-mdir", str(tmp_path / "fresh")])
    assert (fresh.output_prior, fresh.cond_prob) == (True, 0.5)
    (model_dir / "args.json").write_text("{not json")
    with pytest.raises(SystemExit):
        train.parse_args(command)


@pytest.mark.parametrize("command, args, message", [
    ("train", ["--demo", "--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    ("train", ["--demo", "--max_steps", "-5"], "--max_steps -5: must be at least 0"),
    ("train", ["--demo", "--time_budget", "-1"], "--time_budget -1: minutes, 0 (no budget) or more"),
    ("train", ["-d", "c.txt", "-spm", "m.model"], "--model_dir is required (or use --demo)"),
    ("train", ["--demo", "-d", "c.txt"], "--demo with -d: --demo trains on the demo corpus; to train on your own, drop "
                                         "--demo (its settings are --preset tiny --max_steps 1000)"),
    ("sample", ["-mdir", "x", "--steps", "0"], "--steps 0: must be at least 1"),
    ("eval", ["-mdir", "x", "--valid", "y", "--draws", "1"], "--draws 1: must be at least 2"),
    ("prepare", ["-o", "x", "--vocab_size", "5"], "--vocab_size 5: must be at least 16"),
    ("bench", ["sample", "--steps", "0"], "--steps 0: must be at least 1"),
    ("bench", ["train", "--reference", "nowhere"], "--reference nowhere: no pytorch/trainer.py there"),
    ("plot", [], "the following arguments are required: -mdir/--model_dir"),
])
def test_a_bad_flag_value_is_one_line_naming_the_flag(command, args, message, capsys):
    import importlib
    module = importlib.import_module(command)
    with pytest.raises(SystemExit) as stopped:
        (module.main if command in ("prepare", "plot", "bench") else module.parse_args)(args)
    captured = capsys.readouterr()
    assert stopped.value.code == 2 and captured.out == ""
    assert captured.err.startswith(f"error: {message}") and captured.err.endswith(f" (see {command}.py --help)\n")
    assert captured.err.count("\n") == 1


def test_a_bad_flag_value_ends_the_command_with_one_line(tmp_path):
    result = cli("train.py", "--demo", "--max_steps", "-5")
    assert result.returncode == 2 and result.stdout == "" and not (tmp_path / "demo").exists()
    assert result.stderr == "error: --max_steps -5: must be at least 0 (see train.py --help)\n"


def test_a_warm_up_longer_than_a_tenth_of_the_run_is_shortened_to_fit(tmp_path, corpus_file, spm_path, capsys):
    from utils import lr_at
    args = train.parse_args(["-d", "c", "-spm", "s", "-mdir", "m", "--preset", "small", "--max_steps", "60"])
    assert (args.warmup_steps, flags.warmup_steps(args), args.learning_rate) == (500, 6, 1e-3)
    assert lr_at(5, args.learning_rate, flags.warmup_steps(args), args.max_steps) == pytest.approx(1e-3)  # peak
    args.max_steps = 5000
    assert flags.warmup_steps(args) == 500
    capsys.readouterr()
    run_train(corpus_file, spm_path, tmp_path / "run", "--max_steps", "3", "-wus", "5")
    assert "note: no warm-up (a tenth of --max_steps 3 is under a step) instead of --warmup_steps 5" in \
        capsys.readouterr().err
    lr = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())["lr"]  # step 2 of 3, no warm-up
    assert lr == pytest.approx(3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 3))))


def test_every_default_comes_from_the_one_table_and_every_flag_has_help(tmp_path, monkeypatch):
    args = flags.parse_args([], required=())
    for name, value in flags.DEFAULTS["every"].items():
        if name not in flags.PRESETS["base"]:
            assert getattr(args, name) == value, name
    assert all(getattr(args, name) == value for name, value in flags.PRESETS["base"].items())
    assert args.cache_dir is None and args.demo is False  # given or not: nothing else has a default
    with monkeypatch.context() as m:
        m.chdir(tmp_path)  # as above: --demo reads demo/model/args.json of the working folder
        demo_ar = flags.parse_args(["--demo", "--objective", "ar"])
    assert (demo_ar.max_steps, demo_ar.model_dim, demo_ar.expand_prob, demo_ar.time_warp) == (1000, 128, 0.0, False)
    # an objective's own rates at a preset (OBJECTIVE_PRESETS) win over the preset's, and only at that preset
    rates = {}
    for objective in ("diffusion", "ar", "mdlm"):
        for preset in ("tiny", "small"):
            args = flags.parse_args(["--objective", objective, "--preset", preset], required=())
            rates[objective, preset] = (args.learning_rate, args.embedding_lr_scale)
    assert rates == {("diffusion", "tiny"): (1e-3, 60.0), ("ar", "tiny"): (3e-3, 1.0), ("mdlm", "tiny"): (1e-3, 1.0),
                     ("diffusion", "small"): (1e-3, 60.0), ("ar", "small"): (1e-3, 1.0), ("mdlm", "small"): (1e-3, 1.0)}
    assert demo_ar.learning_rate == 3e-3 and "0.003 with --objective ar at --preset tiny" in \
        flags.default_text("learning_rate")
    # a run begun before: its args.json keeps the rates it started with when it resumes
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "args.json").write_text(json.dumps({"preset": "tiny", "learning_rate": 3e-3}))
    old = flags.parse_args(["-mdir", str(tmp_path / "old")], required=())
    assert (old.learning_rate, old.embedding_lr_scale) == (3e-3, 1.0)  # 1.0: "legacy", before the flag existed
    import bench
    import eval as evaluate
    import export
    import gpu_check
    import plot
    import sample
    parsers = [flags.build_parser(), sample.build_parser(), evaluate.build_parser(), prepare.build_parser(),
               plot.build_parser(), bench.build_parser(), gpu_check.build_parser(), export.build_parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            assert action.help, (parser.prog, action.option_strings)
            if isinstance(action, argparse._SubParsersAction):  # bench.py's data, train and sample
                parsers += list(action.choices.values())


def test_no_command_imports_another():
    import ast
    commands = {"train", "sample", "eval", "bench", "plot", "prepare", "gpu_check", "export"}
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            tree = ast.parse(open(os.path.join(ROOT, name)).read())
            imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                        for alias in node.names}
            imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                         if isinstance(node, ast.ImportFrom) and node.module}
            assert not imported & commands, (name, imported & commands)


def test_prepare_leaves_nothing_half_written_when_the_tokenizer_cannot_be_trained(tmp_path, corpus_lines):
    out = tmp_path / "out"
    prepare.main(["-i", write_lines(tmp_path / "raw.txt", corpus_lines[:300]), "-o", str(out), "--vocab_size", "300"])
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    result = cli("prepare.py", "-i", write_lines(tmp_path / "small.txt", corpus_lines[:20]), "-o", str(out),
                 "--vocab_size", "8000")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "error: --vocab_size 8000: " in result.stderr and "supports at most" in result.stderr
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before  # the earlier output, whole
    fresh = tmp_path / "fresh"
    result = cli("prepare.py", "-i", str(tmp_path / "small.txt"), "-o", str(fresh), "--vocab_size", "8000")
    assert result.returncode == 2
    assert not fresh.exists()  # the folder made for the output is removed again


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_samples_printed_in_training_continue_the_corpus_own_valid_lines(tmp_path, corpus_lines, spm_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    write_lines(folder / "train.txt", corpus_lines[:100])
    write_lines(folder / "valid.txt", corpus_lines[300:302])
    run_train(str(folder / "train.txt"), spm_path, tmp_path / "run", "--max_steps", "2", "--sample_interval", "1000",
              "--sample_steps", "2")
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[step 2] ")]
    tokenizer = Tokenizer(spm_path)
    prefixes = [tokenizer.decode(tokenizer.encode(line, bos=False, eos=False)[:3]) for line in corpus_lines[300:302]]
    assert len(printed) == 4  # two unprompted, then one continuing each valid line
    assert all(p[len("[step 2] "):].startswith(q) for p, q in zip(printed[2:], prefixes))


def test_the_same_stop_twice_at_once_saves_and_a_later_second_signal_interrupts(monkeypatch):
    import signal
    with train.StopOnSignal() as stop:  # a scheduler and torchrun both send the first SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        monkeypatch.setattr(train.StopOnSignal, "REPEAT_SECONDS", 0.0)  # a second, later signal: stop at once
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
