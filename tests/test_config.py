"""train.py --config: flags from a YAML or JSON file, the command line winning, a run's args.json as a config, and
one-line errors naming the key and the file."""
import json

import pytest

from conftest import FIXTURES
from flags import parse_args

PATHS = ["-d", "corpus.txt", "-spm", "bpe.model", "-mdir", "out"]


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_config_sets_flags_and_the_command_line_wins(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"learning_rate": 0.005, "num_layers": 2, "self_cond": 0, "time_warp": False,
                                    "ema_rate": 0.999, "objective": "diffusion", "preset": "tiny"}))
    else:
        pytest.importorskip("yaml")
        path.write_text("learning_rate: 5e-3\nnum_layers: 2\nself_cond: 0\ntime_warp: false\nema_rate: 0.999\n"
                        "objective: diffusion\npreset: tiny\n")
    args = parse_args(PATHS + ["--config", str(path), "-nl", "3"])
    assert args.learning_rate == 0.005 and args.num_layers == 3 and args.self_cond == 0.0
    assert args.time_warp is False and args.ema_rate == "0.999" and args.model_dim == 128  # the tiny preset's
    assert parse_args(PATHS + ["--config", str(path), "--time_warp"]).time_warp is True


def test_a_runs_args_json_repeats_it_on_other_data():
    saved = json.loads(open(f"{FIXTURES}/main_run/args.json").read())
    args = parse_args(["--config", f"{FIXTURES}/main_run/args.json"] + PATHS)
    assert (args.data_path, args.spm_model, args.model_dir) == ("corpus.txt", "bpe.model", "out")
    kept = {k: v for k, v in saved.items() if k not in ("data_path", "spm_model", "model_dir")}
    assert {k: getattr(args, k) for k in kept} == kept


@pytest.mark.parametrize("content, message", [
    ('{"learning_rte": 0.1}', "unknown key 'learning_rte': the keys are train.py's long flag names"),
    ('{"learning_rate": "fast"}', "learning_rate: 'fast' is not a valid value of --learning_rate"),
    ('{"num_layers": 2.5}', "num_layers: 2.5 is not a valid value of --num_layers"),
    ('{"time_warp": "yes"}', "time_warp: 'yes' is not true or false"),
    ('{"objective": "gpt"}', "objective: 'gpt' is not one of diffusion, ar, mdlm"),
    ('[1, 2]', "expected a mapping of flag names to values"),
    ('{"learning_rate": 0.1', "not valid JSON"),
])
def test_a_bad_config_is_one_line_naming_the_key_and_the_file(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SystemExit):
        parse_args(PATHS + ["--config", str(path)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--config {path}: " in err and message in err, err


def test_a_missing_config_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(PATHS + ["--config", str(tmp_path / "none.yaml")])
    assert f"--config {tmp_path / 'none.yaml'}: no such file or directory" in capsys.readouterr().err.lower()
