"""The training engine: precision, skipped steps, checkpoint safety, metrics."""
import json
import os

import pytest
import torch

import flags
import training
from conftest import run_train, small_model
from corpus import load_corpus
from data import PackedBatches, PackedRows
from objectives import training_objective
from utils import UsageError, load_checkpoint, load_state_dict_strict, save_checkpoint


def test_bf16_training_on_cpu_gives_finite_losses_and_every_metric(tmp_path, corpus_file, spm_path):
    run_train(corpus_file, spm_path, tmp_path / "run", "--max_steps", "4", "--precision", "bf16")
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [line["step"] for line in lines] == [2, 4]
    for line in lines:
        assert {"step", "epoch", "loss", "accuracy", "lr", "grad_norm", "tokens_per_s", "packing_efficiency",
                "skipped_steps", "seconds"} <= set(line)
        assert all(torch.isfinite(torch.tensor(float(line[k]))) for k in ("loss", "grad_norm", "accuracy"))
        assert 0 <= line["accuracy"] <= 1 and 0.5 < line["packing_efficiency"] <= 1


def engine(tmp_path, corpus_file, tokenizer, precision):
    args = flags.parse_args(["-d", corpus_file, "-spm", "x", "-mdir", "y", "-bsz", "4", "-slen", "32",
                                "--precision", precision, "-ema", "0.9"])
    cache = load_corpus(corpus_file, tokenizer, str(tmp_path / "cache"), progress=False)
    loader = PackedBatches(PackedRows(cache, 32, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id), 4)
    model = small_model(vocab_size=tokenizer.vocab_size)
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    emas = {0.9: {k: v.detach().clone() for k, v in model.state_dict().items()}}
    objective = training_objective(args)
    state = training.TrainingState(model, training.build_optimizer(model, args), scaler, emas, loader, objective,
                                   runner=training.TrainingForward(model, objective))
    return args, state


def snapshot(state):
    return ({k: v.clone() for k, v in state.model.state_dict().items()},
            {k: v.clone() for k, v in state.emas[0.9].items()}, len(state.optimizer.state))


@pytest.mark.parametrize("precision, poison, status", [("fp16", float("inf"), "overflow"),
                                                        ("fp32", float("nan"), "bad")])
def test_a_step_with_a_non_finite_gradient_changes_nothing(tmp_path, corpus_file, tokenizer, precision, poison,
                                                          status):
    args, state = engine(tmp_path, corpus_file, tokenizer, precision)
    device = torch.device("cpu")
    assert training.optimizer_step(state, args, device, 0)[0] == "applied"
    before, scale = snapshot(state), state.scaler.get_scale()
    step_before = {k: v["step"].clone() for k, v in state.optimizer.state.items()}
    handle = state.model.input_proj.weight.register_hook(lambda grad: grad * poison)
    assert training.optimizer_step(state, args, device, 1)[0] == status
    handle.remove()
    after = snapshot(state)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])  # weights
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])  # EMA
    assert all(torch.equal(step_before[k], v["step"]) for k, v in state.optimizer.state.items())  # Adam's step count
    if precision == "fp16":
        assert state.scaler.get_scale() == scale / 2  # the scaler backs off
    assert training.optimizer_step(state, args, device, 1)[0] == "applied"


def test_too_many_bad_steps_in_a_row_stop_the_run_with_its_checkpoint_intact(tmp_path, corpus_file, spm_path,
                                                                             monkeypatch):
    model_dir = tmp_path / "run"
    run_train(corpus_file, spm_path, model_dir, "--max_steps", "2")
    saved = load_checkpoint(str(model_dir / "ckpt.pt"))
    real_step = training.train_step

    def nan_step(*args):
        ce_sum, correct, targets, losses = real_step(*args)
        return ce_sum * float("nan"), correct, targets, losses
    monkeypatch.setattr(training, "train_step", nan_step)
    with pytest.raises(training.Diverged, match="3 attempts in a row at step 3 had a non-finite loss or gradient; "
                                             "the last checkpoint is intact"):
        run_train(corpus_file, spm_path, model_dir, "--max_steps", "6", "--max_bad_steps", "3")
    kept = load_checkpoint(str(model_dir / "ckpt.pt"))
    assert kept["step"] == 2 and all(torch.equal(kept["model"][k], v) for k, v in saved["model"].items())


def test_keep_leaves_the_last_k_checkpoints(tmp_path, corpus_file, spm_path):
    model_dir = tmp_path / "run"
    run_train(corpus_file, spm_path, model_dir, "--max_steps", "5", "--save_interval", "1", "--keep", "2")
    assert sorted(f for f in os.listdir(model_dir) if f.startswith("ckpt")) == \
        ["ckpt-00000004.pt", "ckpt-00000005.pt", "ckpt.pt"]
    assert load_checkpoint(str(model_dir / "ckpt-00000004.pt"))["step"] == 4
    assert load_checkpoint(str(model_dir / "ckpt.pt"))["step"] == 5


class CreatesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # what a malicious checkpoint would carry: unpickling calls open(path, "w")
        return open, (self.path, "w")


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    target = tmp_path / "pwned"
    torch.save({"model": {}, "payload": CreatesAFile(str(target))}, tmp_path / "evil.pt")
    with pytest.raises(UsageError, match="evil.pt: refused: it holds pickled objects"):
        load_checkpoint(str(tmp_path / "evil.pt"))
    assert not target.exists()


def test_missing_unexpected_or_misshapen_tensors_are_refused_by_name(tmp_path):
    model = small_model()
    state = model.state_dict()
    state.pop("logit_bias")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(UsageError, match=r"missing \['logit_bias'\], unexpected \['extra.weight'\]"):
        load_state_dict_strict(model, state, "ckpt.pt [model]")
    state = model.state_dict()
    state["logit_bias"] = torch.zeros(3)
    with pytest.raises(UsageError, match=r"logit_bias \(3,\) for \(8000,\)"):
        load_state_dict_strict(model, state, "ckpt.pt [model]")
    torch.save(model.state_dict(), tmp_path / "bare.pt")  # another tool's plain state dict
    with pytest.raises(UsageError, match="bare.pt: not a checkpoint of this project"):
        load_checkpoint(str(tmp_path / "bare.pt"))
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UsageError, match="empty.pt: empty, cut short"):
        load_checkpoint(str(tmp_path / "empty.pt"))


def test_a_write_interrupted_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"step": 1, "weights": torch.ones(3)}, path)

    def dies_midway(obj, f):
        f.write(b"\x80\x02half a checkpoint")
        raise KeyboardInterrupt  # as a kill or Ctrl-C in the middle of torch.save
    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2, "weights": torch.zeros(3)}, path)
    assert load_checkpoint(path, needs=("step",))["step"] == 1


def test_plot_and_tensorboard_read_the_metrics(tmp_path, corpus_file, spm_path):
    pytest.importorskip("matplotlib")  # optional for users; .ci/run installs it so that this runs
    pytest.importorskip("tensorboard")
    import plot
    model_dir = tmp_path / "run"
    run_train(corpus_file, spm_path, model_dir, "--max_steps", "4", "--tensorboard")
    plot.main(["-mdir", str(model_dir)])
    with open(model_dir / "metrics.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(model_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [2, 4]
    (model_dir / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(UsageError, match=r"metrics.jsonl:2: not JSON"):
        plot.main(["-mdir", str(model_dir)])


def test_a_folder_of_kept_checkpoints_without_ckpt_pt_is_not_silently_restarted(tmp_path, corpus_file, spm_path,
                                                                               capsys):
    model_dir = tmp_path / "run"
    run_train(corpus_file, spm_path, model_dir, "--max_steps", "3", "--save_interval", "1", "--keep", "2")
    os.remove(model_dir / "ckpt.pt")
    with pytest.raises(UsageError, match="holds ckpt-00000003.pt and others but no ckpt.pt"):
        run_train(corpus_file, spm_path, model_dir, "--max_steps", "5", "--keep", "2")
    # a run that died before its first save: its metrics are moved aside, not mixed with the next run's
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text('{"step": 7, "loss": 1.0}\n')
    run_train(corpus_file, spm_path, fresh, "--max_steps", "2")
    assert [json.loads(line)["step"] for line in open(fresh / "metrics.jsonl")] == [2]
    assert (fresh / "metrics.jsonl.old").read_text() == '{"step": 7, "loss": 1.0}\n'
    capsys.readouterr()
    run_train(corpus_file, spm_path, fresh, "--max_steps", "1")
    err = capsys.readouterr().err
    assert "the run is at step 2, --max_steps is 1: nothing to train" in err and "warning" not in err
    # a start that never saved left another tokenizer's copy (--max_steps 0, a crash before step 1): no run to
    # protect, so the folder takes this start's tokenizer; with a checkpoint the other one is refused
    unsaved = tmp_path / "unsaved"
    unsaved.mkdir()
    (unsaved / "tokenizer.model").write_bytes(b"another tokenizer")
    (unsaved / "tokenizer.json").write_text("{}")
    run_train(corpus_file, spm_path, unsaved, "--max_steps", "1")
    assert (unsaved / "tokenizer.model").read_bytes() == open(spm_path, "rb").read()
    assert not (unsaved / "tokenizer.json").exists()
    (unsaved / "tokenizer.json").write_text("{}")
    with pytest.raises(UsageError, match="differs from the tokenizer this run .* was started with .its tokenizer.json"):
        run_train(corpus_file, spm_path, unsaved, "--max_steps", "2")


def test_bench_passes_every_train_flag_on(tmp_path):
    import bench
    args = bench.parse_args(["train", "-d", "c.txt", "-spm", "m.model", "-dim", "32", "-dop", "0.1", "--json"])
    assert args.json and args.train_flags == ["-d", "c.txt", "-spm", "m.model", "-dim", "32", "-dop", "0.1"]


def test_plot_refuses_an_output_it_cannot_write(tmp_path):
    import plot
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(UsageError, match="ending in .png, .pdf or .svg"):
        plot.main(["-mdir", str(tmp_path), "-o", str(tmp_path / "curves.jpgg")])
    with pytest.raises(UsageError, match="no folder"):
        plot.main(["-mdir", str(tmp_path), "-o", str(tmp_path / "missing" / "curves.png")])


@pytest.mark.parametrize("damage", ["ema", "optimizer"])
def test_a_checkpoint_with_a_misshapen_ema_or_optimizer_tensor_is_refused_at_resume(tmp_path, corpus_file,
                                                                                    spm_path, damage):
    model_dir = tmp_path / "run"
    run_train(corpus_file, spm_path, model_dir, "--max_steps", "2")
    checkpoint = torch.load(model_dir / "ckpt.pt", weights_only=True)
    if damage == "ema":
        checkpoint["ema"]["0.999"]["embedding.weight"] = checkpoint["ema"]["0.999"]["embedding.weight"].flatten()
    else:
        state = next(iter(checkpoint["optimizer"]["state"].values()))
        state["exp_avg"] = state["exp_avg"].flatten()[:3]
    torch.save(checkpoint, model_dir / "ckpt.pt")
    with pytest.raises(UsageError, match="ema 0.999.*other shapes" if damage == "ema" else "optimizer.*other shapes"):
        run_train(corpus_file, spm_path, model_dir, "--max_steps", "4")


def test_bench_times_training_and_the_loader_on_a_corpus(tmp_path, corpus_file, spm_path, capsys):
    import bench
    bench.main(["train", "-d", corpus_file, "-spm", spm_path, "-dim", "32", "-nl", "2", "-nh", "2", "-emb", "16",
                "-bsz", "4", "-slen", "32", "--num_workers", "0", "--warmup", "1", "--steps", "2", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["tokens_per_s"] > 0 and result["steps"] == 2 and result["batch_size"] == 4
    assert 1 <= result["mean_attended_keys"] <= 32 and result["mfu"] is None  # no known peak for a CPU
    bench.main(["data", "-d", corpus_file, "-spm", spm_path, "--batches", "3", "-slen", "32", "--num_workers", "0",
                "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["examples_in_corpus"] == 400 and 0.9 < result["packing_efficiency"] <= 1


def test_auto_precision_is_bf16_only_where_the_device_computes_it_and_a_given_one_stays(monkeypatch):
    import utils
    cpu = torch.device("cpu")
    for native, expected, dtype in ((True, "bf16", torch.bfloat16), (False, "fp32", None)):
        monkeypatch.setattr(utils, "native_bf16", lambda device: native)
        assert utils.resolve_precision("auto", cpu) == expected
        with utils.autocast(cpu, "auto"):
            assert torch.is_autocast_enabled("cpu") == (dtype is not None)
            assert dtype is None or torch.get_autocast_dtype("cpu") == dtype
        assert [utils.resolve_precision(p, cpu) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]


@pytest.mark.parametrize("variable, value, native", [
    (None, None, True), ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16", True),
    ("ONEDNN_MAX_CPU_ISA", "avx512_core_amx", True),
    ("ONEDNN_MAX_CPU_ISA", "ALL", True), ("ONEDNN_MAX_CPU_ISA", "no such isa", True),  # oneDNN ignores it too
    ("ONEDNN_MAX_CPU_ISA", "AVX2", False), ("ONEDNN_MAX_CPU_ISA", "avx512_core", False),
    ("DNNL_MAX_CPU_ISA", "AVX2", False), ("ATEN_CPU_CAPABILITY", "avx2", True)])  # ATen's pin: products stay fast
def test_a_bf16_cpu_whose_matrix_products_are_pinned_below_bf16_emulates_it(monkeypatch, variable, value, native):
    from conftest import NATIVE_BF16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    if variable is not None:
        monkeypatch.setenv(variable, value)
    assert NATIVE_BF16(torch.device("cpu")) is native
    assert not NATIVE_BF16(torch.device("meta"))  # neither a GPU nor a CPU


@pytest.mark.parametrize("native", [False, True])
def test_bf16_asked_for_where_it_is_emulated_is_warned_about_once_and_the_run_goes_on(tmp_path, corpus_file, spm_path,
                                                                                     memorised_run, monkeypatch,
                                                                                     capsys, native):
    import sample
    import utils
    monkeypatch.setattr(utils, "native_bf16", lambda device: native)
    warning = ("warning: --precision bf16 is emulated on this CPU (no bf16 instructions in the kernels it runs): "
               "expect it to run many times slower than fp32 (a training step 15x in RESULTS.md); --precision auto "
               "picks fp32 here\n")
    run_train(corpus_file, spm_path, tmp_path / "run", "--max_steps", "2", "--precision", "bf16")
    err = capsys.readouterr().err
    assert err.count(warning) == (not native) and "parameters on cpu (bf16)" in err
    assert json.loads(open(tmp_path / "run" / "metrics.jsonl").readlines()[-1])["step"] == 2  # it trained on
    sample.main(["-mdir", str(memorised_run[0]), "--steps", "2", "-n", "1", "--precision", "bf16"])
    captured = capsys.readouterr()
    assert captured.err.count(warning) == (not native) and len(captured.out.splitlines()) == 1
    with pytest.raises(utils.UsageError, match="--length 40: a sample of 40 tokens"):  # a bad request: its error alone
        sample.main(["-mdir", str(memorised_run[0]), "--length", "40", "--precision", "bf16"])
    assert "warning" not in capsys.readouterr().err
    assert utils.warn_if_emulated("fp32", torch.device("cpu")) is None and "warning" not in capsys.readouterr().err


def test_fp16_is_emulated_on_a_cpu_without_amx_fp16(monkeypatch):
    import utils
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)
    assert "--precision fp16 is emulated on this CPU" in utils.warn_if_emulated("fp16", torch.device("cpu"))
    assert utils.warn_if_emulated("bf16", torch.device("meta")) is None  # neither a CPU nor a GPU: not judged
