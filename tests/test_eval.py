"""The likelihood bound against an exact case, and eval.py on a trained tiny model."""
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch

import eval as evaluate
import sample
import scoring
from checkpoint import load_model
from data import sample_rows
from diffusion import nll_bound
from model import ScoreLM
from test_sampling import ExactDenoiser
from utils import UsageError


def toy_bound(model, rows, sigma_min=0.01, sigma_max=200.0, copies=1024, draws=64):
    """Bound per row (nats) and its standard error for data uniform over `rows`, every row equally often."""
    ids = rows.repeat(copies // len(rows), 1)
    terms = nll_bound(model, ids, torch.zeros_like(ids, dtype=torch.bool), sigma_min, sigma_max, draws)
    total = terms["reconstruction"] + terms["diffusion"] + terms["prior"]
    return float(total.mean()), float(terms["variance"].sum().sqrt()) / len(total), terms


def test_the_bound_is_tight_for_the_exact_denoiser_and_above_the_likelihood_otherwise():
    rows = torch.randint(4, 50, (4, 6), generator=torch.Generator().manual_seed(1))
    exact_nll = math.log(4)  # data uniform over four rows
    bound, stderr, terms = toy_bound(ExactDenoiser(rows), rows)
    assert stderr < 0.05
    assert abs(bound - exact_nll) < 3 * stderr + 0.02, (bound, stderr)
    assert float(terms["reconstruction"].max()) < 1e-3  # at sigma 0.01 the rows are told apart for sure
    # prior term, |e|^2 = E: E/2 ln(1 + 1 / sigma_max^2) a token, 6 tokens a row
    torch.testing.assert_close(terms["prior"], torch.full_like(terms["prior"], 6 * 8 * math.log(1 + 1 / 200 ** 2)))

    class Overconfident(ExactDenoiser):  # the posterior of a smaller sigma: sure of rows too early
        def forward(self, x_in, c_noise, segment_ids=None):
            return super().forward(x_in, c_noise - math.log(10) / 4, segment_ids)

    wrong, wrong_stderr, _ = toy_bound(Overconfident(rows), rows)
    assert wrong > exact_nll + 3 * wrong_stderr + 0.1, (wrong, wrong_stderr)


def test_bound_arguments_are_checked():
    rows = torch.randint(4, 50, (2, 3))
    with pytest.raises(ValueError):
        nll_bound(ExactDenoiser(rows), rows, torch.zeros_like(rows, dtype=torch.bool), 1.0, 10.0, draws=1)
    with pytest.raises(ValueError):
        nll_bound(ExactDenoiser(rows), rows, torch.zeros_like(rows, dtype=torch.bool), 10.0, 1.0, draws=4)


def test_training_lowers_the_bound_on_the_lines_it_learned(memorised_run):
    model_dir, lines = memorised_run
    trained, tokenizer, sampling = load_model(str(model_dir))
    torch.manual_seed(0)
    untrained = ScoreLM(trained.cfg).eval()
    layouts = [(ids, [True] + [False] * (len(ids) - 1)) for ids in (tokenizer.encode(line)[:32] for line in lines)]
    ids, cond_mask, segment_ids = sample_rows(layouts, tokenizer.pad_id)
    bounds = []
    for model in (untrained, trained):
        terms = nll_bound(model, ids, cond_mask, sampling["sigma_min"], sampling["sigma_max"], 8, segment_ids)
        nats = (terms["reconstruction"] + terms["diffusion"] + terms["prior"]).sum()
        bounds.append(float(nats / terms["tokens"].sum()))
    assert bounds[1] < bounds[0] - 1.0, bounds


def test_eval_reports_the_bound_and_the_loss_by_noise_level(memorised_run, tmp_path, capsys):
    model_dir, lines = memorised_run
    valid = tmp_path / "valid.txt"
    valid.write_text("\n".join(lines + ["word " * 60]) + "\n")
    plot = tmp_path / "plots" / "new" / "ce_by_sigma.png"  # a --plot_dir not made yet is made
    evaluate.main(["-mdir", str(model_dir), "--valid", str(valid), "--draws", "4", "--sigmas", "4",
                   "--plot_dir", str(plot.parent), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["lines"] == 4 and result["skipped_lines"] == 1  # the 60-word line does not fit 32 tokens
    chars = sum(len(line) + 1 for line in lines)
    assert result["characters"] == chars
    nats = result["nll_bound_nats_per_token"] * result["tokens"]
    assert result["bits_per_char"] == pytest.approx(nats / chars / math.log(2))
    assert sum(result["bound_terms"].values()) == pytest.approx(result["nll_bound_nats_per_token"])
    curve = result["ce_by_sigma"]
    assert [round(p["sigma"], 3) for p in (curve[0], curve[-1])] == [1.0, 5.0]
    assert curve[0]["ce"] < curve[-1]["ce"] and curve[0]["accuracy"] > curve[-1]["accuracy"]
    if evaluate.pyplot() is None:  # matplotlib is optional (requirements-extra.txt): the figures come without plots
        assert result["plot"] is None and not plot.exists()
        return
    assert plot.stat().st_size > 0 and result["plot"] == str(plot)
    # a plot that cannot be written costs a warning, not the figures
    blocked = tmp_path / "blocked"
    (blocked / "ce_by_sigma.png").mkdir(parents=True)
    evaluate.main(["-mdir", str(model_dir), "--valid", str(valid), "--draws", "2", "--sigmas", "2",
                   "--plot_dir", str(blocked), "--json"])
    out = capsys.readouterr()
    assert json.loads(out.out)["plot"] is None and "cannot write the plot" in out.err


def test_sample_metrics_equal_hand_computed_values():
    samples = [[1, 2, 3, 1], [2, 2]]  # tokens 1 x2, 2 x3, 3 x1
    m = scoring.sample_metrics(samples)
    p = [2 / 6, 3 / 6, 1 / 6]
    assert m["entropy"] == pytest.approx(-sum(q * math.log(q) for q in p))
    assert m["distinct_1"] == pytest.approx(3 / 6)
    assert m["distinct_2"] == pytest.approx(4 / 4)  # (1,2) (2,3) (3,1) (2,2)
    assert m["distinct_3"] == pytest.approx(2 / 2)
    assert m["mean_length"] == 3.0
    assert scoring.sample_metrics([[5, 6, 7, 8, 5, 6, 7, 8]])["rep_4"] == pytest.approx(1 - 4 / 5)


def test_the_autoregressive_baseline_learns_and_its_perplexity_is_exp_of_its_mean_nll(memorised_ar_run, tmp_path,
                                                                                      capsys):
    model_dir, lines = memorised_ar_run
    losses = [json.loads(line)["loss"] for line in open(model_dir / "metrics.jsonl")]
    assert losses[-1] < losses[0] / 5, losses  # the first interval's mean, over 20 steps from near ln V
    valid = tmp_path / "valid.txt"
    valid.write_text("\n".join(lines) + "\n")
    evaluate.main(["-mdir", str(model_dir), "--valid", str(valid), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["objective"] == "ar" and result["perplexity"] == pytest.approx(math.exp(result["nll_nats_per_token"]))
    # the same NLL, one line at a time, by feeding each prefix to the model and reading off its next token
    model, tokenizer, _ = load_model(str(model_dir))
    nats = tokens = 0
    with torch.no_grad():
        for line in lines:
            ids = tokenizer.encode(line)
            for t in range(1, len(ids)):
                prefix = torch.tensor([ids[:t]])
                logits = model(model.embed(prefix), torch.zeros(prefix.shape))
                nats -= float(logits[0, -1].log_softmax(-1)[ids[t]])
                tokens += 1
    assert result["tokens"] == tokens
    assert result["nll_nats_per_token"] == pytest.approx(nats / tokens, rel=1e-4)


def test_the_judge_finds_its_training_lines_likelier_than_shuffled_ones(memorised_ar_run, memorised_run, tmp_path,
                                                                        capsys):
    ar_dir, lines = memorised_ar_run
    judge, tokenizer, _ = load_model(str(ar_dir))
    real = [tokenizer.encode(line) for line in lines]
    generator = torch.Generator().manual_seed(0)
    shuffled = [[ids[0]] + [ids[1:-1][i] for i in torch.randperm(len(ids) - 2, generator=generator)] + [ids[-1]]
                for ids in real]
    ppl = [math.exp(n / t) for n, t in (scoring.sequence_nll(judge, s, 4, tokenizer.pad_id, "cpu")
                                        for s in (real, shuffled))]
    assert ppl[0] < ppl[1] / 10, ppl
    # one command line: the diffusion run's bound, the judge's perplexity, scored samples and a sweep
    valid = tmp_path / "valid.txt"
    valid.write_text("\n".join(lines) + "\n")
    diffusion_dir, _ = memorised_run
    common = ["-mdir", str(diffusion_dir), "--valid", str(valid), "--draws", "2", "--sigmas", "2", "--judge",
              str(ar_dir), "--plot_dir", str(tmp_path), "--json"]
    evaluate.main(common + ["--samples", "4", "--steps", "3"])
    result = json.loads(capsys.readouterr().out)
    assert result["valid_gen_ppl"] == pytest.approx(result["judge"]["perplexity"]) and result["gen_ppl"] > 0
    assert result["samples"]["count"] == 4 and result["samples"]["evaluations"] == 3.0
    # a sweep draws its settings only (3 samples each, in batches of 2), not the default sample set as well
    evaluate.main(common + ["--samples", "3", "--batch_size", "2", "--sweep", "steps=2,3", "--sweep",
                            "schedule=uniform,ar"])
    result = json.loads(capsys.readouterr().out)
    assert "samples" not in result and "gen_ppl" not in result
    assert [(row["steps"], row["schedule"]) for row in result["sweep"]] == \
        [(2, "uniform"), (2, "ar"), (3, "uniform"), (3, "ar")]
    assert all(row["evaluations"] == float(row["steps"]) and row["gen_ppl"] > 0 for row in result["sweep"])
    assert result["sweep_plot"] in (None, str(tmp_path / "sweep.png"))
    with pytest.raises(UsageError, match="not an autoregressive run"):
        evaluate.main(["-mdir", str(diffusion_dir), "--valid", str(valid), "--judge", str(diffusion_dir)])


@pytest.mark.parametrize("flags, message", [
    (["--sweep", "steps=abc"], "steps are whole numbers"),
    (["--sweep", "schedule=nope"], "'nope' is not one of"),
    (["--sweep", "steps=2", "--sweep", "steps=3"], "give each key once"),
    (["--sweep", "colour=red"], "KEY one of"),
])
def test_bad_sweeps_are_refused_before_any_work(flags, message, capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["-mdir", "x", "--valid", "y", *flags])
    assert message in capsys.readouterr().err


def test_an_autoregressive_run_samples_and_scores_its_samples_but_takes_no_steps_sweep(memorised_ar_run, tmp_path,
                                                                                     capsys):
    model_dir, lines = memorised_ar_run
    valid = tmp_path / "valid.txt"
    valid.write_text("\n".join(lines) + "\n")
    command = ["-mdir", str(model_dir), "--valid", str(valid), "--json", "--no-progress"]
    evaluate.main(command + ["--samples", "4", "--temperature", "0.5"])
    result = json.loads(capsys.readouterr().out)
    assert result["samples"]["sampler"] == "autoregressive" and result["samples"]["temperature"] == 0.5
    assert result["samples"]["evaluations"] > 0 and result["self_nll_samples"] == 4
    # the memorised lines again, near-deterministically: as likely to it as the lines themselves
    assert result["samples_self_nll"] == pytest.approx(result["samples_valid_nll"], abs=0.5)
    with pytest.raises(UsageError, match=r"--steps \(in --sweep or --frontier\): not for .* an autoregressive run"):
        evaluate.main(command + ["--sweep", "steps=2,3"])
    assert json.load(open(model_dir / "args.json"))["expand_prob"] == 0.0  # no pads after eos to predict


@pytest.mark.parametrize("flags, message", [
    (["--length", "33"], "--length 33: a sample of 33 tokens is longer than the 32-token rows"),
    (["--sweep", "length=16,20:40"], "--length 20:40: a sample of 40 tokens is longer than the 32-token rows"),
    (["--sweep", "temperature=0.01,1"], r"--temperature 0.01: must be in \[0.05, 20\] \(a sample setting"),
    (["--frontier", "temperature=1,30", "--judge", "nowhere"], r"--temperature 30(.0)?: must be in \[0.05, 20\]"),
    (["--temperature", "25"], r"--temperature 25(.0)?: must be in \[0.05, 20\]"),
    (["--clamp", "-1"], r"--clamp -1(.0)?: a noise level")])
def test_samples_the_run_cannot_draw_are_refused_before_any_work(memorised_run, tmp_path, flags, message,
                                                                 monkeypatch):
    model_dir, lines = memorised_run
    valid = tmp_path / "valid.txt"
    valid.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(evaluate, "line_estimates_of", lambda *a, **k: pytest.fail("scored before refusing"))
    with pytest.raises(UsageError, match=message):
        evaluate.main(["-mdir", str(model_dir), "--valid", str(valid), "--samples", "2", *flags])


def test_eval_warns_of_emulated_bf16_only_when_it_samples_and_only_once_its_inputs_are_good(memorised_run, tmp_path,
                                                                                           monkeypatch, capsys):
    import utils
    monkeypatch.setattr(utils, "native_bf16", lambda device: False)
    model_dir, lines = memorised_run
    valid = tmp_path / "valid.txt"
    valid.write_text("\n".join(lines) + "\n")
    command = ["-mdir", str(model_dir), "--valid", str(valid), "--draws", "2", "--sigmas", "2", "--precision", "bf16",
               "--plot_dir", str(tmp_path)]
    evaluate.main(command)  # the bound alone: fp32 whatever --precision says
    assert "is emulated" not in capsys.readouterr().err
    with pytest.raises(UsageError, match="no checkpoint"):
        evaluate.main(command + ["--samples", "2", "--judge", str(tmp_path / "nowhere")])
    assert "is emulated" not in capsys.readouterr().err
    evaluate.main(command + ["--samples", "2", "--steps", "2"])
    assert capsys.readouterr().err.count("warning: --precision bf16 is emulated on this CPU") == 1


def test_progress_goes_to_stderr_and_lines_too_long_for_the_rows_are_counted_loudly(memorised_run, tmp_path, capsys):
    model_dir, lines = memorised_run
    valid = tmp_path / "valid.txt"
    valid.write_text("\n".join(lines + ["word " * 60, "word " * 70]) + "\n")
    evaluate.main(["-mdir", str(model_dir), "--valid", str(valid), "--draws", "2", "--sigmas", "2", "--samples", "2",
                   "--steps", "2", "--plot_dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert all(f"{name}: 100%" in err for name in ("bound", "loss by sigma", "sampling")), err
    assert f"2 of 6 lines read from {valid} (33.3%) are longer than the 32-token rows and are not scored" in err
    assert out.splitlines()[0] == "4 valid lines scored; 2 longer than the rows (33.3%) not scored"
    assert "%|" not in out  # the figures alone
    evaluate.main(["-mdir", str(model_dir), "--valid", str(valid), "--draws", "2", "--sigmas", "2", "--json",
                   "--no-progress", "--plot_dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert json.loads(out)["skipped_share"] == pytest.approx(2 / 6) and "%|" not in err


def test_the_loss_by_noise_level_plot_has_a_title_and_its_legend_below_the_axes(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    drawn, save = {}, evaluate.save_figure

    def measured(plt, fig, path):
        fig.canvas.draw()
        drawn.update(title=fig.axes[0].get_title(), axes=[ax.get_window_extent() for ax in fig.axes],
                     legend=fig.legends[0].get_window_extent())
        return save(plt, fig, path)
    monkeypatch.setattr(evaluate, "save_figure", measured)
    curve = [{"sigma": s, "ce": 8 * s / (s + 1), "accuracy": 1 / (s + 1)} for s in (0.5, 1, 5, 20, 50)]
    assert evaluate.plot_curve(curve, str(tmp_path / "ce_by_sigma.png"), "Loss by noise level: run")
    assert drawn["title"] == "Loss by noise level: run"
    assert all(drawn["legend"].y1 <= axes.y0 for axes in drawn["axes"])  # below both axes, covering no curve


def test_shuffled_words_keep_each_lines_words_and_length_limit(tokenizer):
    lines = [(tokenizer.encode(text), len(text) + 1) for text in ("the cat sat on the mat", "alone", "a b c d e f")]
    kept, shuffled, indices = scoring.shuffled_words(lines, tokenizer, 0, 64)
    assert kept == lines and [c for _, c in shuffled] == [c for _, c in lines] and indices == [0, 1, 2]
    for (ids, _), (mixed, _) in zip(lines, shuffled):
        assert sorted(tokenizer.decode(mixed).split()) == sorted(tokenizer.decode(ids).split())
    assert tokenizer.decode(shuffled[0][0]) != "the cat sat on the mat"  # seed 0 moves this one
    assert shuffled[1][0] == lines[1][0]  # one word: nothing to shuffle
    assert scoring.shuffled_words(lines, tokenizer, 0, 64) == (kept, shuffled, indices)  # the seed fixes the order
    assert scoring.shuffled_words(lines, tokenizer, 0, 4)[::2] == ([lines[1]], [1])  # left out where it no longer fits


@pytest.mark.parametrize("run", ["memorised_run", "memorised_ar_run"])
def test_a_run_that_learned_its_lines_finds_them_likelier_than_their_words_shuffled(run, request, tmp_path, capsys):
    model_dir, lines = request.getfixturevalue(run)
    valid = tmp_path / "valid.txt"
    valid.write_text("\n".join(lines) + "\n")
    command = ["-mdir", str(model_dir), "--valid", str(valid), "--draws", "4", "--sigmas", "2", "--json"]
    evaluate.main(command + (["--samples", "4", "--steps", "8"] if run == "memorised_run" else []))
    result = json.loads(capsys.readouterr().out)
    assert result["shuffle_lines"] == 4
    assert result["shuffle_gap"] == pytest.approx(result["shuffled_nll"] - result["ordered_nll"])
    ordered = result["nll_bound_nats_per_token" if run == "memorised_run" else "nll_nats_per_token"]
    assert result["ordered_nll"] == pytest.approx(ordered)  # the same lines, the same draws
    assert result["shuffle_gap"] > 1.0, result  # four memorised lines: their shuffled words are far less likely
    if run == "memorised_run":  # its samples are its lines again: as likely to it as the valid lines
        assert result["self_nll_samples"] == result["self_nll_valid_lines"] == 4
        assert result["samples_self_nll"] < result["shuffled_nll"]
    evaluate.main(command[:-1] + ["--shuffle_lines", "0"])
    assert "word order" not in capsys.readouterr().out


def test_a_judge_that_knows_the_lines_less_well_than_the_judged_run_is_warned_about(capsys):
    result = {"bits_per_char": 2.0, "judge": {"bits_per_char": 2.5}}
    warning = evaluate.weak_judge_warning(result, "out-ar")
    assert warning.startswith("warning: --judge out-ar scores the valid lines at 2.5000 bits/char, worse than this "
                              "run's own 2.0000") and "1,000 steps" in warning
    assert capsys.readouterr().err.strip() == warning
    result["judge"]["bits_per_char"] = 1.5
    assert evaluate.weak_judge_warning(result, "out-ar") is None and capsys.readouterr().err == ""


def test_the_frontier_interpolates_gen_ppl_at_an_entropy_and_pools_tokens_at_one_count():
    points = [{"entropy": 3.0, "gen_ppl": 100.0}, {"entropy": 5.0, "gen_ppl": 400.0}, {"entropy": 4.0,
                                                                                       "gen_ppl": 200.0}]
    assert scoring.at_entropy(points, 4.5) == pytest.approx(math.sqrt(200 * 400))  # linear in log gen-PPL
    assert scoring.at_entropy(points, 3.0) == pytest.approx(100.0)
    assert scoring.at_entropy(points, 5.5) is None and scoring.at_entropy(points, 2.9) is None
    level = [{"entropy": 0.7, "gen_ppl": 10.0}, {"entropy": 0.7, "gen_ppl": 90.0}]  # no curve: no value at 0.7
    assert scoring.at_entropy(level, 0.7) is None
    assert scoring.pooled_entropy([[1, 2], [3, 4]], 4) == pytest.approx(math.log(4))
    assert scoring.pooled_entropy([[1, 1], [3, 4]], 2) == 0.0  # the first two tokens only


@pytest.mark.parametrize("argv, message", [
    (["--frontier", "temperature=0.8"], "at least two values"),
    (["--frontier", "steps=8,16"], "temperature or top_p"),
    (["--compare", "other"], "--compare: the runs compared on a --frontier"),
    (["--frontier", "temperature=0.5,1", "--samples", "0"], "--samples 0: --sweep and --frontier score samples"),
    (["--frontier", "temperature=0.5,1"], "--frontier: needs --judge"),
    (["--plot_dir", __file__], f"--plot_dir {__file__}: not a folder"),
])
def test_a_frontier_of_one_value_or_another_key_or_a_comparison_without_it_is_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["-mdir", "m", "--valid", "v", *argv])
    assert message in capsys.readouterr().err


def test_the_frontier_draws_and_judges_every_run_alike_and_draws_its_plot(memorised_run, memorised_ar_run, tmp_path,
                                                                          capsys, monkeypatch):
    model_dir, lines = memorised_run
    valid = tmp_path / "valid.txt"
    valid.write_text("\n".join(lines) + "\n")
    command = ["-mdir", str(model_dir), "--valid", str(valid), "--draws", "2", "--sigmas", "2", "--shuffle_lines",
               "0", "--judge", str(memorised_ar_run[0]), "--samples", "4", "--steps", "8", "--plot_dir",
               str(tmp_path), "--no-progress"]
    evaluate.main(command + ["--frontier", "temperature=0.5,1", "--compare", str(memorised_ar_run[0]), "--json"])
    frontier = json.loads(capsys.readouterr().out)["frontier"]
    assert [run["objective"] for run in frontier["runs"]] == ["diffusion", "ar"]
    assert [[point["value"] for point in run["points"]] for run in frontier["runs"]] == [[0.5, 1.0]] * 2
    assert frontier["tokens"] == min(point["tokens"] for run in frontier["runs"] for point in run["points"])
    for run in frontier["runs"]:
        assert all(point["gen_ppl"] > 1 and point["seconds"] >= 0 for point in run["points"])
        expected = scoring.at_entropy(run["points"], frontier["real"]["entropy"])
        assert run["gen_ppl_at_real_entropy"] == expected
    if frontier["plot"]:
        assert (tmp_path / "frontier.png").stat().st_size > 0
    with pytest.raises(UsageError, match=r"--top_p \(in --sweep or --frontier\): not for .*a continuous diffusion"):
        evaluate.main(command + ["--frontier", "top_p=0.5,1"])
    with pytest.raises(UsageError, match="--compare .*: already on the frontier .the evaluated run or named twice"):
        evaluate.main(command + ["--frontier", "temperature=0.5,1", "--compare", str(model_dir)])
    with pytest.raises(UsageError, match="--compare .*nowhere"):  # before any work
        evaluate.main(command + ["--frontier", "temperature=0.5,1", "--compare", str(tmp_path / "nowhere")])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # refused with the flags, before a run loads
        evaluate.main(command[:10] + ["--frontier", "temperature=0.5,1", "--compare", str(tmp_path / "nowhere")])
    assert "--frontier: needs --judge" in capsys.readouterr().err
    # --steps is the compared diffusion run's: each run reads the flags its sampler takes, whichever is -mdir
    evaluate.main([str(memorised_ar_run[0]) if part == str(model_dir) else part for part in command] +
                  ["--frontier", "temperature=0.5,1", "--compare", str(model_dir), "--json"])
    assert [run["objective"] for run in json.loads(capsys.readouterr().out)["frontier"]["runs"]] == ["ar", "diffusion"]
    # empty samples (bos and eos alone): no entropy to compare at, and a warning that their gen-PPL means nothing
    monkeypatch.setattr(evaluate, "draw_samples", lambda model, tokenizer, *rest: (
        [[tokenizer.bos_id, tokenizer.eos_id]] * 4, 1))
    evaluate.main(command + ["--frontier", "temperature=0.5,1", "--json"])
    out = capsys.readouterr()
    frontier = json.loads(out.out)["frontier"]
    assert frontier["tokens"] == 0 and [run["gen_ppl_at_real_entropy"] for run in frontier["runs"]] == [None]
    assert "warning: all 4 samples are empty" in out.err


def test_the_baseline_sweeps_temperature_and_top_p_and_refuses_the_diffusion_samplers(memorised_ar_run, tmp_path,
                                                                                      capsys):
    model_dir, lines = memorised_ar_run
    valid = tmp_path / "valid.txt"
    valid.write_text("\n".join(lines) + "\n")
    command = ["-mdir", str(model_dir), "--valid", str(valid), "--shuffle_lines", "0", "--samples", "3",
               "--plot_dir", str(tmp_path), "--no-progress"]
    evaluate.main(command + ["--sweep", "temperature=0.5,1", "--sweep", "top_p=0.9", "--json"])
    sweep = json.loads(capsys.readouterr().out)["sweep"]
    assert [(row["sampler"], row["temperature"], row["top_p"]) for row in sweep] == [
        ("autoregressive", 0.5, 0.9), ("autoregressive", 1.0, 0.9)]
    for argv, flag in ((["--sweep", "steps=4,8"], "--steps"), (["--sampler", "heun"], "--sampler heun"),
                       (["--steps", "16"], "--steps 16"), (["--steps", "200"], "--steps 200")):
        with pytest.raises(UsageError, match=f"{flag}.*not for .*an autoregressive run"):
            evaluate.main(command + argv)


def test_against_scores_other_runs_with_the_same_draws(memorised_run, memorised_ar_run, tmp_path, capsys):
    """--against: a copy of the run differs by exactly 0 with error 0 (the same lines, the same draws), where two
    independent estimates would differ by about their errors combined; against the baseline's exact NLL the error is
    the bound's own. The run itself is refused."""
    (model_dir, lines), (ar_dir, _) = memorised_run, memorised_ar_run
    valid = tmp_path / "valid.txt"
    valid.write_text("\n".join(lines) + "\n")
    copy = shutil.copytree(model_dir, tmp_path / "copy")
    with pytest.raises(UsageError, match="--against .*: the evaluated run itself"):
        evaluate.main(["-mdir", str(model_dir), "--valid", str(valid), "--against", str(model_dir) + "/"])
    evaluate.main(["-mdir", str(model_dir), "--valid", str(valid), "--draws", "4", "--sigmas", "2", "--shuffle_lines",
                   "0", "--json", "--against", str(copy), str(ar_dir)])
    result = json.loads(capsys.readouterr().out)
    itself, baseline = result["against"]
    assert result["nll_stderr"] > 0.01
    assert itself["difference"] == 0.0 and itself["difference_stderr"] == 0.0
    assert itself["nll_nats_per_token"] == result["nll_nats_per_token"]
    assert baseline["objective"] == "ar"
    assert baseline["difference"] == pytest.approx(result["nll_nats_per_token"] - baseline["nll_nats_per_token"])
    assert baseline["difference_stderr"] == pytest.approx(result["nll_stderr"])
    evaluate.main(["-mdir", str(model_dir), "--valid", str(valid), "--draws", "2", "--sigmas", "2", "--shuffle_lines",
                   "0", "--against", str(ar_dir)])
    assert f"against {ar_dir} (ar): its NLL" in capsys.readouterr().out


def test_an_against_run_of_shorter_rows_is_warned_about(memorised_ar_run, monkeypatch, capsys):
    run, tokenizer = str(memorised_ar_run[0]), object()
    monkeypatch.setattr(evaluate, "load_other", lambda *a: ("model", tokenizer, {"sequence_length": 16}))
    args = SimpleNamespace(model_dir="out")
    assert evaluate.load_against(run, args, tokenizer, {"sequence_length": 32}, "cpu")[1] is tokenizer
    assert f"warning: --against {run} was trained on rows of 16 tokens, shorter than the 32" in capsys.readouterr().err
    evaluate.load_against(run, args, tokenizer, {"sequence_length": 16}, "cpu")
    assert capsys.readouterr().err == ""


def test_samples_are_judged_as_their_text_reads_without_pads(monkeypatch):
    """A continuous sample may hold pads (and no eos) where its text is empty: they are no text, so neither the judge
    nor the own NLL scores them."""
    tokenizer = SimpleNamespace(bos_id=0, eos_id=1, pad_id=2)
    rows = [[0, 5, 2, 6, 1, 2, 2], [0, 2, 2, 2], [0, 7, 0, 8]]
    monkeypatch.setattr(evaluate, "unconditional_layouts", lambda *a: None)
    monkeypatch.setattr(evaluate, "objective_name", lambda cfg: "ar")
    monkeypatch.setattr(evaluate, "draw", lambda *a: ((None, row, None, 3) for row in rows))
    args = SimpleNamespace(samples=3, seed=0, batch_size=4, progress=False, model_dir="out")
    sequences, evaluations = evaluate.draw_samples(SimpleNamespace(cfg=None), tokenizer, {}, None, None, args, "cpu")
    assert sequences == [[0, 5, 6, 1], [0], [0, 7, 8]] and evaluations == 3


def test_a_run_of_another_tokenizer_is_refused_by_against_and_compare(memorised_ar_run, tmp_path):
    from corpus import Tokenizer, demo_sentences, prepare_corpus
    prepare_corpus(demo_sentences()[:2000], str(tmp_path / "other"), 0.0, 300)
    other, run = Tokenizer(str(tmp_path / "other" / "bpe.model")), str(memorised_ar_run[0])
    args = SimpleNamespace(ema=None, model_dir="out", compare=[run], frontier=("temperature", [0.5, 1.0]))
    with pytest.raises(UsageError, match="--against .*another tokenizer than out's; runs scored on the same lines"):
        evaluate.load_other(run, "--against", args, other, "cpu")
    with pytest.raises(UsageError, match="--compare .*another tokenizer than out's; a frontier's entropies"):
        evaluate.load_compared(args, other, "cpu")


def test_sigmas_0_leaves_the_loss_curve_out_and_1_is_refused(memorised_run, tmp_path, capsys):
    model_dir, lines = memorised_run
    valid = tmp_path / "valid.txt"
    valid.write_text("\n".join(lines) + "\n")
    command = ["-mdir", str(model_dir), "--valid", str(valid), "--draws", "2", "--shuffle_lines", "0", "--json",
               "--no-progress", "--plot_dir", str(tmp_path)]
    evaluate.main(command + ["--sigmas", "0"])
    result = json.loads(capsys.readouterr().out)
    assert "ce_by_sigma" not in result and result["lines"] == 4 and not (tmp_path / "ce_by_sigma.png").exists()
    with pytest.raises(SystemExit):
        evaluate.main(command + ["--sigmas", "1"])
    assert "--sigmas 1: a curve needs at least 2 points (0: none)" in capsys.readouterr().err
