"""export.py: a folder of safetensors weights, config.json and the tokenizer, without pickle, that sample.py, eval.py
and api.load read as the run folder it came from; written whole or not at all."""
import json
import os
import shutil

import pytest
import torch

import api
import eval as evaluate
import export
import sample
import train
from conftest import FIXTURES
from utils import UsageError

pytest.importorskip("safetensors")  # requirements-extra.txt


def test_an_exported_folder_samples_and_evaluates_as_its_run_folder(memorised_run, tmp_path, capsys):
    model_dir, lines = memorised_run
    out = tmp_path / "shared"
    export.main(["-mdir", str(model_dir), "-o", str(out)])
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.model"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask  # readable as any folder made here, to share
    assert os.stat(out / "model.safetensors").st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(UsageError, match="an exported folder already"):
        export.main(["-mdir", str(out), "-o", str(tmp_path / "again")])
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError, match="an exported folder \\(export.py\\), not a run folder"):
        train.main(["-d", str(corpus), "-spm", str(model_dir / "tokenizer.model"), "-mdir", str(out),
                    "--cache_dir", str(tmp_path / "cache")])  # would write a run's config.json over the export's
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    for name in os.listdir(out):  # no pickle: neither torch's zip archive nor a bare pickle
        assert open(out / name, "rb").read(2) not in (b"PK", b"\x80\x02", b"\x80\x04"), name
    valid = tmp_path / "valid.txt"
    valid.write_text("\n".join(lines) + "\n")
    outputs = []
    for folder in (model_dir, out):
        sample.main(["-mdir", str(folder), "-n", "3", "--steps", "10", "--jsonl", "--no-progress", "--precision",
                     "fp32"])
        evaluate.main(["-mdir", str(folder), "--valid", str(valid), "--draws", "2", "--sigmas", "2", "--json",
                       "--no-progress"])
        printed = capsys.readouterr().out.splitlines()
        result = json.loads(printed[-1])
        outputs.append(([json.loads(line)["ids"] for line in printed[:-1]], result["nll_nats_per_token"],
                        result["shuffle_gap"]))
    assert outputs[0] == outputs[1]
    assert api.load(str(out)).sampling["warp"] is not None  # the time warp came along (--grid warped works)


def test_the_ema_weights_are_exported_by_rate_and_only_those_load(tmp_path):
    out = tmp_path / "ema"
    export.main(["-mdir", f"{FIXTURES}/main_run", "-o", str(out), "--ema", "0.999"])
    direct, exported = api.load(f"{FIXTURES}/main_run", ema=0.999), api.load(str(out), ema="0.999")
    for (name, a), (_, b) in zip(direct.model.state_dict().items(), exported.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert json.loads((out / "config.json").read_text())["weights"] == "ema 0.999"
    with pytest.raises(UsageError, match="--ema 0.9999: .* holds one set of weights, the ema 0.999 ones"):
        api.load(str(out), ema=0.9999)
    with pytest.raises(UsageError, match="-o .*: exists already"):
        export.main(["-mdir", f"{FIXTURES}/main_run", "-o", str(out)])
    with pytest.raises(UsageError, match="--ema 0.5: .* has EMA rates"):
        export.main(["-mdir", f"{FIXTURES}/main_run", "-o", str(tmp_path / "none"), "--ema", "0.5"])
    assert not (tmp_path / "none").exists()


def test_tensors_that_do_not_fit_the_config_are_refused_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file
    out = tmp_path / "bad"
    export.main(["-mdir", f"{FIXTURES}/main_run", "-o", str(out)])
    tensors = load_file(out / "model.safetensors")
    tensors["logit_bias"] = tensors["logit_bias"][:-1]
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(UsageError, match=r"model.safetensors \[raw\]"):
        api.load(str(out))
    (out / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UsageError, match="model.safetensors: not readable as safetensors"):
        api.load(str(out))


def test_an_interrupted_export_leaves_no_folder(tmp_path, monkeypatch):
    import safetensors.torch

    def fail(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(KeyboardInterrupt):
        export.main(["-mdir", f"{FIXTURES}/main_run", "-o", str(tmp_path / "cut")])
    assert os.listdir(tmp_path) == []
    shutil.rmtree(tmp_path, ignore_errors=True)
