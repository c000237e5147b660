"""gpu_check.py on a machine without a GPU: it says so, and every command it would run parses."""
import os

import pytest
import torch

import bench
import flags
import gpu_check
import sample


def test_without_a_gpu_it_says_so_and_measures_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stopped:
        gpu_check.run_command(lambda: gpu_check.main(["-o", str(tmp_path / "out")]))
    assert stopped.value.code == 1
    assert capsys.readouterr().err.startswith("error: no GPU found (torch.cuda.is_available() is False)")
    assert not (tmp_path / "out").exists()


def test_every_step_is_a_command_its_parser_accepts(tmp_path):
    steps = gpu_check.plan("my c.txt", "m.model", str(tmp_path))
    assert [name for name, _, _ in steps] == [name for name, _, _ in gpu_check.STEPS]
    assert sum(seconds for _, seconds, _ in steps) <= 600  # one command on a lent GPU
    assert sum(seconds for _, seconds, _ in gpu_check.plan("c", "m", "o", gpu_check.TWO_GPU_STEPS)) <= 180
    two_gpus = gpu_check.plan("my c.txt", "m.model", str(tmp_path), gpu_check.TWO_GPU_STEPS)
    assert two_gpus[0][2][1:5] == ["-m", "torch.distributed.run", "--nproc-per-node", "2"]  # torchrun, this Python
    steps += [(name, seconds, [argv[0], *argv[5:]]) for name, seconds, argv in two_gpus]  # the script's own flags
    for _, _, argv in steps:
        assert os.path.isfile(argv[1])  # found beside gpu_check.py, from any working folder
        script, flags_given = os.path.basename(argv[1]), argv[2:]
        assert "my c.txt" in flags_given or script == "sample.py"  # a path with a space stays one argument
        if script == "bench.py":
            args = bench.parse_args(flags_given)
            flags.parse_args(args.train_flags, required=("data_path", "spm_model"))  # what bench passes on
        elif script == "train.py":
            assert flags.parse_args(flags_given).model_dir in [f"{tmp_path}/{run}" for run in ("straight", "resumed",
                                                                                              "two_gpus", "mdlm")]
        else:
            assert script == "sample.py" and sample.parse_args(flags_given).device in ("cpu", "auto")


def test_one_of_d_and_spm_alone_is_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["-d", "c.txt"])
    assert "give -d and -spm together, or neither" in capsys.readouterr().err
