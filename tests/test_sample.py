"""sample.py end to end on a trained tiny model: prompts, infilling, suffixes, lengths, output and early exit."""
import json
import re
import subprocess
import sys

import pytest
import torch

import sample
from checkpoint import load_model
from conftest import ROOT
from corpus import Tokenizer, decode_line
from data import parse_template, sample_layout, sample_rows
from diffusion import EarlyExit, Grid, euler_step, generate, uniform_schedule
from utils import UsageError


def run_sample(capsys, model_dir, *flags):
    """sample.main on `model_dir` with `flags`; returns (stdout lines, stderr)."""
    capsys.readouterr()
    sample.main(["-mdir", str(model_dir), "--steps", "8", *flags])
    captured = capsys.readouterr()
    return captured.out.splitlines(), captured.err


def records(lines):
    return [json.loads(line) for line in lines]


def test_parse_template_and_sample_layout(tokenizer):
    assert parse_template("the [5] of the [3]") == ["the", 5, "of the", 3]
    assert parse_template("[2]") == [2]
    for bad in ("no blank here", "the [0] of"):
        with pytest.raises(UsageError, match="--infill"):
            parse_template(bad)
    ids, held = sample_layout(tokenizer, ["an entity", 3, "of", 2], suffix="")
    entity, of = tokenizer.encode("an entity", bos=False, eos=False), tokenizer.encode("of", bos=False, eos=False)
    assert ids == [0] + entity + [2] * 3 + of + [2] * 2 + [1]
    assert held == [True] * (1 + len(entity)) + [False] * 3 + [True] * len(of) + [False] * 2 + [True]
    ids, held = sample_layout(tokenizer, ["an entity", None], length=10, suffix="existence")
    suffix = tokenizer.encode("existence", bos=False, eos=True)
    assert len(ids) == 10 and ids[-len(suffix):] == suffix and held.count(False) == 10 - 1 - len(entity) - len(suffix)
    with pytest.raises(UsageError, match="nothing to generate"):
        sample_layout(tokenizer, ["an entity that has physical existence", None], length=6)


def test_sample_rows_isolate_shorter_samples_and_decode_cuts_generated_spans_only(tokenizer):
    layouts = [([0, 2, 2], [True, False, False]), ([0, 5, 2, 2, 1], [True] * 2 + [False] * 2 + [True])]
    ids, cond_mask, segment_ids = sample_rows(layouts, 2)
    assert ids.tolist() == [[0, 2, 2, 2, 2], [0, 5, 2, 2, 1]]
    assert cond_mask.tolist() == [[True, False, False, True, True], [True, True, False, False, True]]
    assert segment_ids.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert sample_rows([([0, 2], [True, False])] * 2, 2)[2] is None
    entity = tokenizer.encode("entity", bos=False, eos=False)
    a, of = tokenizer.encode("a", bos=False, eos=False), tokenizer.encode("of", bos=False, eos=False)
    # generated: "a", eos, then junk up to the held "of"; the junk after the generated eos is dropped
    row = [0] + a + [1] + entity + of + entity + [1]
    held = [True] + [False] * (len(a) + 1 + len(entity)) + [True] * len(of) + [False] * len(entity) + [True]
    assert tokenizer.decode_sample(row, held) == "a of entity"


def test_prompts_are_kept_and_each_gives_n_samples(memorised_run, capsys):
    model_dir, _ = memorised_run
    out, err = run_sample(capsys, model_dir, "-n", "3", "--prompt", "an entity", "a separate", "--sampler", "heun")
    assert len(out) == 6 and "mean network evaluations per sample: 15.0" in err
    assert all(o.startswith("an entity") for o in out[:3]) and all(o.startswith("a separate") for o in out[3:])
    with pytest.raises(UsageError, match="has EMA rates none"):
        sample.main(["-mdir", str(model_dir), "--ema", "0.5"])


@pytest.mark.parametrize("sampler", ["iterative", "euler", "heun", "stochastic"])
def test_infill_and_suffix_tokens_come_out_exactly(memorised_run, capsys, sampler):
    model_dir, _ = memorised_run
    tokenizer = Tokenizer(str(model_dir / "tokenizer.model"))
    out, _ = run_sample(capsys, model_dir, "-n", "2", "--infill", "an [3] that has [4]", "--suffix", "existence",
                        "--sampler", sampler, "--schedule", "ar", "--jsonl")
    expected, held = sample_layout(tokenizer, ["an", 3, "that has", 4], suffix="existence")
    for record in records(out):
        assert len(record["ids"]) == len(expected)
        assert [i for i, h in zip(record["ids"], held) if h] == [i for i, h in zip(expected, held) if h]
        assert record["text"].startswith("an") and record["text"].endswith("existence") and "that has" in record["text"]
        assert record["prompt"] == "an [3] that has [4]"


def test_jsonl_records_and_a_suffix_of_eos_alone(memorised_run, capsys):
    model_dir, _ = memorised_run
    out, _ = run_sample(capsys, model_dir, "-n", "3", "--length", "12", "--suffix", "", "--jsonl", "--seed", "4")
    for i, record in enumerate(records(out)):
        assert set(record) == {"sample", "seed", "prompt", "text", "ids", "steps", "evaluations"}
        assert record["sample"] == i and record["seed"] == 4 and record["steps"] == 8 and record["evaluations"] == 8
        assert len(record["ids"]) == 12 and record["ids"][0] == 0 and record["ids"][-1] == 1


def test_a_length_range_draws_each_length_from_the_sample_seed(memorised_run, capsys):
    model_dir, _ = memorised_run
    # fp32: bf16's rounding of a product depends on the batch's shape
    flags = ["-n", "12", "--length", "6:20", "--jsonl", "--seed", "3", "--schedule", "confidence",
             "--precision", "fp32"]
    first = records(run_sample(capsys, model_dir, *flags, "--batch_size", "12")[0])
    again = records(run_sample(capsys, model_dir, *flags, "--batch_size", "5")[0])
    lengths = [len(r["ids"]) for r in first]
    assert all(6 <= n <= 20 for n in lengths) and len(set(lengths)) > 3
    assert first == again  # neither lengths nor tokens depend on the batch


def test_prompt_file_one_prompt_a_line(memorised_run, capsys, tmp_path):
    model_dir, _ = memorised_run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("an entity\n\na separate\n")
    out, _ = run_sample(capsys, model_dir, "-n", "2", "--prompt_file", str(prompts), "--jsonl")
    assert [r["prompt"] for r in records(out)] == ["an entity"] * 2 + ["a separate"] * 2
    assert all(r["text"].startswith(r["prompt"]) for r in records(out))
    prompts.write_text("an entity\n" + "word " * 40 + "\n")
    with pytest.raises(UsageError, match=r"prompts.txt:2: .* leave nothing to generate"):
        sample.main(["-mdir", str(model_dir), "--prompt_file", str(prompts)])
    with pytest.raises(UsageError, match="no such file"):
        sample.main(["-mdir", str(model_dir), "--prompt_file", str(tmp_path / "none.txt")])
    with pytest.raises(UsageError, match="is a folder"):
        sample.main(["-mdir", str(model_dir), "--prompt_file", str(tmp_path)])
    with pytest.raises(UsageError, match="--prompt_file : no such file"):
        sample.main(["-mdir", str(model_dir), "--prompt_file", ""])
    piped = subprocess.run([sys.executable, "sample.py", "-mdir", str(model_dir), "--steps", "2", "-n", "1",
                            "--prompt_file", "-"], input="an entity\n", capture_output=True, text=True, cwd=ROOT)
    assert piped.returncode == 0 and piped.stdout.startswith("an entity"), piped.stderr


def test_unusable_text_and_sizes_end_with_one_line_errors(memorised_run, capsys):
    model_dir, _ = memorised_run
    suffix = len(Tokenizer(str(model_dir / "tokenizer.model")).encode("entity that", bos=False))  # with eos
    cases = [(["--prompt", "ab\udcffc"], "--prompt: not valid UTF-8"),
             (["--infill", "a [99999999999]"], "a blank asks for 1 to 4,096 tokens"),
             (["--length", "4:12", "--prompt", "an entity that has physical existence"],
              "leave nothing to generate in --length 4 (the shortest of --length 4:12)"),
             (["--length", "4", "--suffix", "entity that"],
              f"an unprompted sample: {1 + suffix} held tokens (bos, suffix and eos)"),
             # longer than the 32-token rows it was trained on
             (["--length", "20:33"], "--length 20:33: a sample of 33 tokens is longer than the 32-token rows"),
             (["--infill", "a [31] b"], "--infill: a sample of 34 tokens is longer than the 32-token rows")]
    for flags, message in cases:
        with pytest.raises(UsageError, match=re.escape(message)):
            sample.main(["-mdir", str(model_dir), *flags])


def test_repeated_prompt_flags_add_up_and_held_text_without_pieces_is_warned_about(memorised_run, capsys):
    model_dir, _ = memorised_run
    out, err = run_sample(capsys, model_dir, "-n", "1", "--prompt", "an entity", "--prompt", "a separate")
    assert len(out) == 2 and out[1].startswith("a separate")
    _, err = run_sample(capsys, model_dir, "-n", "1", "--infill", "\u4e2d [3]")
    assert "--infill: the tokenizer has no piece" in err
    _, err = run_sample(capsys, model_dir, "-n", "1", "--prompt", "a", "--suffix", "\u4e2d")
    assert err.count("has no piece") == 1 and "--suffix: the tokenizer has no piece" in err


def test_prompt_file_lines_are_decoded_like_the_corpus():
    assert decode_line("\ufeff  an entity \r\n".encode()) == "an entity"


@pytest.mark.parametrize("flags, message", [
    (["--skew", "2"], "--skew applies to --schedule ar"),
    (["--schedule", "ar", "--threshold", "0.5"], "--threshold applies to --schedule confidence"),
    (["--S_churn", "5"], "--S_churn applies to --sampler stochastic, not iterative (continuous diffusion's"),
    (["--infill", "a [3]", "--length", "9"], "--length does not apply to --infill"),
    (["--early_exit", "0"], "--early_exit 0"),
    (["--schedule", "confidence", "--patience", "1"], "--patience 1.0"),
    (["--length", "9:4"], "--length"),
    (["--length", "5:"], "--length"),
    (["--seed", "-1"], "--seed -1"),
    (["--schedule", "ar", "--skew", "inf"], "--skew inf"),
    (["--rho", "inf"], "--rho inf"),
    (["--sampler", "stochastic", "--S_noise", "inf"], "--S_noise inf: must be finite"),
    (["--exit_confidence", "0.3"], "--exit_confidence applies to --early_exit"),
])
def test_bad_sampling_flags_are_refused(memorised_run, capsys, flags, message):
    model_dir, _ = memorised_run
    with pytest.raises(SystemExit):
        sample.main(["-mdir", str(model_dir), *flags])
    assert message in capsys.readouterr().err


def test_early_exit_saves_evaluations_on_a_trained_model_and_keeps_converged_samples(memorised_run):
    model_dir, _ = memorised_run
    model, tokenizer, sampling = load_model(str(model_dir))
    ids, cond_mask, _ = sample_rows([sample_layout(tokenizer, [None], 24)] * 16, tokenizer.pad_id)
    trajectory = []
    args = (model, euler_step, uniform_schedule, Grid(sampling["sigma_min"], sampling["sigma_max"]), ids, cond_mask,
            range(16), 60)
    full, full_evals, _ = generate(*args, callback=lambda i, rows, tokens, sigma: trajectory.append(tokens.clone()))
    trajectory = torch.stack(trajectory)  # (steps, B, L): every row runs to the end
    K = 5  # counting steps whose mean top probability is at least 0.8 (this model is sure early, then changes)
    early, evals, steps = generate(*args, early_exit=EarlyExit(K, 0.8))
    assert evals.sum() < full_evals.sum()
    for b in range(16):
        s = int(steps[b])  # the row stopped after step s (1-based): its tokens then, unchanged for K steps before
        assert torch.equal(early[b], trajectory[s - 1, b])
        if s < 60:
            assert (trajectory[max(0, s - 1 - K):s, b] == trajectory[s - 1, b]).all()
    # some rows that stopped early hold the sample the full run ends at
    assert sum(torch.equal(early[b], full[b]) for b in range(16) if steps[b] < 60) >= 1


def test_bench_sample_reports_every_sampler(memorised_run, capsys):
    import bench
    model_dir, _ = memorised_run
    bench.main(["sample", "--steps", "3", "-bsz", "2", "-slen", "8", "--preset", "tiny", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert {name: result[name]["evaluations_per_sequence"] for name in ("euler", "heun", "stochastic", "iterative")} \
        == {"euler": 3, "heun": 5, "stochastic": 5, "iterative": 3}
    assert all(result[name]["sequences_per_s"] > 0 for name in ("euler", "iterative"))
    bench.main(["sample", "-mdir", str(model_dir), "--steps", "30", "-bsz", "4", "-slen", "16", "--early_exit", "2",
                "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == str(model_dir) and result["early_exit"] == 2 and result["sequence_length"] == 16


def test_eval_draws_the_samples_sample_py_draws(memorised_run, capsys):
    import eval as evaluate
    from types import SimpleNamespace
    from sampling import sample_lengths, sampler_settings
    model_dir, _ = memorised_run
    out, err = run_sample(capsys, model_dir, "-n", "3", "--jsonl", "--seed", "5", "--batch_size", "2")
    assert "sampling: 100%" in err  # progress of the steps on stderr, the samples alone on stdout
    model, tokenizer, sampling = load_model(str(model_dir))
    eos = tokenizer.eos_id
    cut = [ids[:ids.index(eos) + 1] if eos in ids else ids for ids in (r["ids"] for r in records(out))]
    assert any(tokenizer.pad_id in ids for ids in cut)  # a pad to leave out, as the text leaves it out
    expected = [ids[:1] + [t for t in ids[1:] if t not in (tokenizer.pad_id, tokenizer.bos_id)] for ids in cut]
    args = SimpleNamespace(samples=3, seed=5, batch_size=3, progress=False, model_dir=str(model_dir))
    lengths = sample_lengths(None, sampling, str(model_dir))
    assert isinstance(lengths, list)  # the default: drawn from the training lines' lengths
    sequences, evaluations = evaluate.draw_samples(model, tokenizer, sampling, sampler_settings(steps=8), lengths,
                                                   args, "cpu")
    assert sequences == expected and evaluations == 8
