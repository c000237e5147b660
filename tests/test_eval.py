"""The likelihood bound against an exact case, and eval.py on a trained tiny model."""
import json
import math

import pytest
import torch

import eval as evaluate
import sample
from data import sample_rows
from diffusion import nll_bound
from model import ScoreLM
from test_sampling import ExactDenoiser


def toy_bound(model, rows, sigma_min=0.01, sigma_max=200.0, copies=1024, draws=64):
    """Bound per row (nats) and its standard error for data uniform over `rows`, every row equally often."""
    ids = rows.repeat(copies // len(rows), 1)
    terms = nll_bound(model, ids, torch.zeros_like(ids, dtype=torch.bool), sigma_min, sigma_max, draws,
                      generator=torch.Generator().manual_seed(0))
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
    trained, tokenizer, sampling = sample.load_model(str(model_dir))
    torch.manual_seed(0)
    untrained = ScoreLM(trained.cfg).eval()
    layouts = [(ids, [True] + [False] * (len(ids) - 1)) for ids in (tokenizer.encode(line)[:32] for line in lines)]
    ids, cond_mask, segment_ids = sample_rows(layouts, tokenizer.pad_id)
    bounds = []
    for model in (untrained, trained):
        terms = nll_bound(model, ids, cond_mask, sampling["sigma_min"], sampling["sigma_max"], 8, segment_ids,
                          torch.Generator().manual_seed(0))
        nats = (terms["reconstruction"] + terms["diffusion"] + terms["prior"]).sum()
        bounds.append(float(nats / terms["tokens"].sum()))
    assert bounds[1] < bounds[0] - 1.0, bounds


def test_eval_reports_the_bound_and_the_loss_by_noise_level(memorised_run, tmp_path, capsys):
    model_dir, lines = memorised_run
    valid = tmp_path / "valid.txt"
    valid.write_text("\n".join(lines + ["word " * 60]) + "\n")
    plot = tmp_path / "curve.png"
    evaluate.main(["-mdir", str(model_dir), "--valid", str(valid), "--draws", "4", "--sigmas", "4",
                   "--plot", str(plot), "--json"])
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
    assert plot.stat().st_size > 0 and result["plot"] == str(plot)
