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


def test_args_json_of_a_demo_or_baseline_run_repeats_it_on_other_data(tmp_path):
    """A run's args.json records every flag, also those its objective does not read and --demo: with -d and -spm
    given, neither stands in the way; a value the objective would refuse still is refused."""
    saved = {"demo": True, "preset": "tiny", "objective": "ar", "sigma_min": 1.0, "sigma_max": 50.0, "rho": 1.0,
             "warp_shape": "monotone", "multilevel_prob": 1.0, "mask_weight": "elbo", "self_cond": 0.0,
             "time_warp": False, "max_steps": 1000.0, "tokenizer": "bpe.model"}
    path = tmp_path / "args.json"
    path.write_text(json.dumps(saved))
    args = parse_args(["--config", str(path), "-d", "other.txt", "-mdir", "out2"])
    assert (args.objective, args.demo, args.data_path, args.spm_model, args.max_steps) == \
        ("ar", False, "other.txt", "bpe.model", 1000)
    path.write_text(json.dumps({**saved, "sigma_min": 2.0}))
    with pytest.raises(SystemExit):
        parse_args(["--config", str(path), "-d", "other.txt", "-mdir", "out2"])
    yaml = pytest.importorskip("yaml")
    cfg = tmp_path / "run.YML"
    cfg.write_text(yaml.safe_dump({"max_steps": "1e3", "learning_rate": -1}))
    with pytest.raises(SystemExit):
        parse_args(PATHS + ["--config", str(cfg)])


def test_a_range_error_of_a_config_value_names_the_config(tmp_path, capsys):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"learning_rate": -1, "max_steps": "1e3"}))
    with pytest.raises(SystemExit):
        parse_args(PATHS + ["--config", str(path)])
    assert f"-lr -1.0: must be positive (flags from --config {path} count as given)" in capsys.readouterr().err


def test_another_objective_takes_its_own_defaults_and_a_runs_own_record_needs_a_new_folder(tmp_path, capsys):
    """A masked diffusion run's args.json records self-conditioning, the time warp and the output prior off (flags
    it does not read) and its own defaults: as a config for --objective diffusion those are not choices, and the
    diffusion defaults apply; a value other than masked diffusion's default is taken. args.json as a config without
    -mdir would resume (and change) the run it records: refused."""
    saved = {"preset": "tiny", "objective": "mdlm", "self_cond": 0.0, "time_warp": False, "output_prior": False,
             "embedding_lr_scale": 1.0, "multilevel_prob": 0.0, "learning_rate": 0.002}
    path = tmp_path / "args.json"
    path.write_text(json.dumps(saved))
    args = parse_args(PATHS + ["--config", str(path), "--objective", "diffusion"])
    assert (args.self_cond, args.time_warp, args.output_prior, args.embedding_lr_scale) == (0.5, True, True, 60.0)
    assert (args.multilevel_prob, args.learning_rate) == (1.0, 0.002)
    # the other way: a continuous run's record of its defaults (self-conditioning, warp, prior, its learning rates at
    # the tiny preset) is not a choice that the baseline or masked diffusion refuses or takes; the learning rate the
    # baseline wants at the tiny preset applies; a value other than the defaults is still a choice
    diffusion = {"preset": "tiny", "objective": "diffusion", "self_cond": 0.5, "time_warp": True, "output_prior": True,
                 "embedding_lr_scale": 60.0, "multilevel_prob": 1.0, "expand_prob": 0.1, "learning_rate": 1e-3}
    for learning_rate, taken in ((1e-3, {"ar": 3e-3, "mdlm": 1e-3}), (0.002, {"ar": 0.002, "mdlm": 0.002})):
        path.write_text(json.dumps({**diffusion, "learning_rate": learning_rate}))
        for objective in ("ar", "mdlm"):
            args = parse_args(PATHS + ["--config", str(path), "--objective", objective])
            assert (args.self_cond, args.time_warp, args.output_prior, args.embedding_lr_scale) == (0, False, False, 1)
            assert (args.multilevel_prob, args.learning_rate) == ({"ar": 1.0, "mdlm": 0.0}[objective], taken[objective])
    # another preset: the file's preset's architecture and rate (the baseline's 3e-3 at the tiny preset) give way to
    # the new one's, a choice does not
    path.write_text(json.dumps({"preset": "tiny", "objective": "ar", "model_dim": 128, "num_layers": 6,
                                "learning_rate": 3e-3, "embedding_lr_scale": 1.0}))
    args = parse_args(PATHS + ["--config", str(path), "--preset", "base"])
    assert (args.model_dim, args.num_layers, args.learning_rate, args.embedding_lr_scale) == (512, 6, 1e-4, 1.0)
    path.write_text(json.dumps({**diffusion, "self_cond": 0.25}))
    with pytest.raises(SystemExit):
        parse_args(PATHS + ["--config", str(path), "--objective", "ar"])
    assert "--self_cond" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({**saved, "model_dir": str(run)}))
    with pytest.raises(SystemExit):
        parse_args(["-d", "corpus.txt", "-spm", "bpe.model", "--config", str(run / "args.json")])
    assert f"the record of the run in {run}; give -mdir for a new run" in capsys.readouterr().err
    assert parse_args(PATHS + ["--config", str(run / "args.json")]).model_dir == "out"
