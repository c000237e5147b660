"""Masked diffusion (masked.py, MDLM): the mask times and masks, the loss's weights, the bound exact on a toy with a
known answer, the ancestral sampler (held tokens kept, nothing left masked, draws from the model's marginals,
caching, batch independence), and the objective end to end through train.py, sample.py and eval.py."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import eval as evaluate
import flags
import sample
from conftest import run_train, small_model
from masked import draw_mask_times, draw_masks, generate_masked, mask_id, masked_loss, nll_bound
from objectives import Masked
from utils import UsageError


class Marginals(torch.nn.Module):
    """A masked "network" that knows the exact marginals q (V,) of a toy corpus whose tokens are independent: at
    every position it predicts q, whatever it reads, so it is the exact denoiser of that corpus."""

    def __init__(self, q):
        super().__init__()
        self.q = q
        self.cfg = SimpleNamespace(vocab_size=len(q), causal=False, masked=True)

    def embed(self, ids):
        return ids.float()[..., None]

    def forward(self, x, c_noise, segment_ids=None):
        return self.q.log().expand(*x.shape[:2], len(self.q))


def toy(rows=64, length=10, seed=0):
    """Rows of a toy corpus of independent tokens drawn from q over 6 tokens, bos (token 0) held at position 0."""
    q = torch.tensor([0.05, 0.4, 0.25, 0.15, 0.1, 0.05])
    g = torch.Generator().manual_seed(seed)
    ids = torch.multinomial(q, rows * length, replacement=True, generator=g).view(rows, length)
    ids[:, 0] = 0
    cond = torch.zeros_like(ids, dtype=torch.bool)
    cond[:, 0] = True
    return q, ids, cond


def test_the_bound_equals_the_exact_nll_of_independent_tokens_under_their_exact_denoiser():
    q, ids, cond = toy()
    exact = -(q.log()[ids] * ~cond).sum(-1)  # (B,) nats
    terms = nll_bound(Marginals(q), ids, cond, draws=32)
    assert torch.equal(terms["tokens"], torch.full((64,), 9.0, dtype=torch.float64))
    error = math.sqrt(float(terms["variance"].sum()))
    assert abs(float(terms["masked"].sum() - exact.sum())) < 4 * error + 1e-9, (terms["masked"].sum(), exact.sum())
    assert error < 0.02 * float(exact.sum())  # tight: without the n/k weight the estimate would be 45% short


def test_the_training_loss_is_an_unbiased_estimate_of_the_nll_and_never_masks_held_positions():
    q, ids, cond = toy(rows=4096, length=6)
    ce = -q.log()[ids]  # the exact denoiser's cross-entropy at every position
    segment_ids = torch.ones_like(ids)
    segment_ids[:, 4:] = 2  # two sequences a row: a t each
    g = torch.Generator().manual_seed(0)
    t = draw_mask_times(segment_ids, per_token=False, generator=g)
    assert torch.equal(t[:, 0], t[:, 3]) and not torch.equal(t[:, 3], t[:, 4])
    assert 1e-3 <= float(t.min()) and float(t.max()) <= 1
    masked = draw_masks(t, ~cond, generator=g)
    assert not masked[:, 0].any()  # held: never masked
    share = masked[:, 1:].float().mean()
    assert abs(float(share) - 0.5) < 0.01  # E[t] = 1/2, stratified
    estimate = (masked / t * ce).sum(-1)  # the ELBO integrand the loss takes, per row
    exact = (ce * ~cond).sum(-1)
    error = float(estimate.std() / math.sqrt(len(estimate)))
    assert abs(float(estimate.mean() - exact.mean())) < 4 * error, (estimate.mean(), exact.mean(), error)
    per_token = draw_mask_times(segment_ids, per_token=True, generator=g)
    assert not torch.equal(per_token[:, 0], per_token[:, 1])


def test_the_loss_weights_masked_cross_entropy_by_one_over_t_and_carries_the_rest_over():
    model = small_model(vocab_size=30, masked=True).eval()
    assert model.embedding.weight.shape[0] == 31 and model.head_weights()[0].shape[0] == 30  # [MASK]: never predicted
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30, (2, 8), generator=g)
    t = torch.tensor([[0.25] * 8, [0.5] * 8])
    masked = torch.rand(2, 8, generator=g) < 0.5
    masked[0, 0], masked[1, 1] = True, False
    loss, ce, hit = masked_loss(model, ids, t, masked)
    logits = model(model.embed(torch.where(masked, mask_id(model), ids)), torch.zeros(2, 8))
    expected = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(2, 8) / t * masked
    torch.testing.assert_close(ce, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, expected.sum(), rtol=1e-5, atol=1e-5)
    assert hit[~masked].all() and torch.equal(hit[masked], (logits.argmax(-1) == ids)[masked])
    _, uniform, _ = masked_loss(model, ids, t, masked, uniform=True)
    torch.testing.assert_close(uniform, expected * t, rtol=1e-5, atol=1e-5)


def test_the_sampler_keeps_held_tokens_unmasks_everything_and_draws_the_marginals():
    q, ids, cond = toy(rows=400, length=8)
    cond[:, 3] = True  # infill context in the middle of every row
    out, evaluations, steps = generate_masked(Marginals(q), ids, cond, seeds=range(400), steps=12)
    assert torch.equal(out[cond], ids[cond]) and not (out == len(q)).any()
    counts = torch.bincount(out[~cond], minlength=len(q)).double()
    expected = q.double() * counts.sum()
    assert float(((counts - expected) ** 2 / expected).sum()) < 25  # chi-square, 5 degrees of freedom: p < 1e-4
    assert int(evaluations.max()) <= 6 and int(steps.max()) <= 12  # 6 free positions: at most one evaluation each


def test_a_step_that_unmasks_nothing_reuses_the_last_output_and_a_row_does_not_depend_on_its_batch():
    model = small_model(vocab_size=30, masked=True).eval()
    ids = torch.randint(0, 30, (3, 9), generator=torch.Generator().manual_seed(0))
    cond = torch.zeros_like(ids, dtype=torch.bool)
    cond[:, :2] = True
    calls = []
    real_forward = model.forward
    model.forward = lambda *a, **k: calls.append(1) or real_forward(*a, **k)
    out, evaluations, _ = generate_masked(model, ids, cond, seeds=[5, 6, 7], steps=500, top_p=0.9)
    assert len(calls) <= 7 * 3 and int(evaluations.max()) <= 7  # 7 free positions, 500 steps
    alone, _, _ = generate_masked(model, ids[1:2], cond[1:2], seeds=[6], steps=500, top_p=0.9)
    assert torch.equal(alone[0], out[1])
    assert torch.equal(out[:, :2], ids[:, :2])
    # beside a longer row, as sampling.draw pads a batch: the shorter row draws as it does alone
    segment_ids = torch.ones_like(ids)
    segment_ids[1, 6:] = 0
    short = cond.clone()
    short[1, 6:] = True
    padded, _, _ = generate_masked(model, ids, short, seeds=[5, 6, 7], steps=50, segment_ids=segment_ids)
    single, _, _ = generate_masked(model, ids[1:2, :6], short[1:2, :6], seeds=[6], steps=50)
    assert torch.equal(padded[1, :6], single[0]) and torch.equal(padded[1, 6:], ids[1, 6:])


def test_the_masked_objective_never_masks_held_or_fill_positions():
    objective = Masked()
    model = small_model(vocab_size=30, masked=True)
    segment_ids = torch.tensor([[1, 1, 1, 2, 2, 0, 0]] * 256)
    cond = torch.zeros_like(segment_ids, dtype=torch.bool)
    cond[:, 0] = cond[:, 3] = True  # each sequence's bos, say, or a conditioning span
    noise = objective.draw(model, torch.zeros_like(segment_ids), segment_ids, cond, 0)
    assert not noise["masked"][cond].any() and not noise["masked"][:, 5:].any()
    assert noise["masked"][:, [1, 2, 4]].any()
    assert torch.equal(objective.targets(segment_ids, cond), (segment_ids > 0) & ~cond)


@pytest.fixture(scope="module")
def mdlm_run(tmp_path_factory, corpus_file_module, spm_path):
    folder = tmp_path_factory.mktemp("mdlm") / "run"
    checkpoint = run_train(corpus_file_module, spm_path, folder, "--objective", "mdlm", "--max_steps", "6",
                           "-ema", "0.999")
    return folder, checkpoint


@pytest.fixture(scope="module")
def corpus_file_module(tmp_path_factory, corpus_lines):
    path = tmp_path_factory.mktemp("mdlm_corpus") / "corpus.txt"
    path.write_text("\n".join(corpus_lines) + "\n", encoding="utf-8")
    return str(path)


def test_an_mdlm_run_trains_samples_and_evaluates(mdlm_run, corpus_file_module, capsys):
    folder, checkpoint = mdlm_run
    assert checkpoint["config"]["masked"] and not checkpoint["config"]["causal"]
    assert checkpoint["args"]["objective"] == "mdlm" and checkpoint["args"]["self_cond"] == 0
    losses = [json.loads(line)["loss"] for line in open(folder / "metrics.jsonl")]
    assert all(math.isfinite(loss) and loss > 0 for loss in losses)
    sample.main(["-mdir", str(folder), "-n", "3", "--steps", "20", "--prompt", "The", "--no-progress", "--jsonl"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and all(row["text"].startswith("The") for row in rows)
    sample.main(["-mdir", str(folder), "-n", "2", "--steps", "20", "--infill", "The [3] of [2]", "--no-progress"])
    assert all(line.startswith("The") and " of" in line for line in capsys.readouterr().out.splitlines())
    evaluate.main(["-mdir", str(folder), "--valid", corpus_file_module, "--max_lines", "16", "--draws", "2",
                   "--shuffle_lines", "8", "--samples", "4", "--steps", "10", "--json", "--no-progress"])
    result = json.loads(capsys.readouterr().out)
    assert result["objective"] == "mdlm" and result["nll_nats_per_token"] == result["nll_bound_nats_per_token"]
    assert 0 < result["nll_stderr"] and math.isfinite(result["shuffle_gap"])
    assert result["samples"]["sampler"] == "masked" and "samples_self_nll" in result


@pytest.mark.parametrize("argv, message", [
    (["--sampler", "heun"], "--sampler heun: not for .*a masked diffusion run"),
    (["--grid", "warped"], "--grid warped: not for"),
    (["--early_exit", "3"], "--early_exit: not for"),
])
def test_sample_refuses_the_continuous_samplers_flags_for_an_mdlm_run(mdlm_run, argv, message):
    with pytest.raises(UsageError, match=message):
        sample.main(["-mdir", str(mdlm_run[0]), "-n", "1", *argv])


def test_another_objective_in_a_run_folder_is_one_line_naming_the_flag_and_folder(mdlm_run, corpus_file_module,
                                                                                  spm_path):
    folder = str(mdlm_run[0])
    for objective in ("diffusion", "ar"):
        problem = flags.resolve(flags.build_parser().parse_args(["-d", "c", "-spm", "s", "-mdir", folder,
                                                                  "--objective", objective]))
        assert problem == (f"--objective {objective}: {folder} holds a run of --objective mdlm; each objective needs "
                           "a -mdir of its own")
    with pytest.raises(SystemExit):
        flags.parse_args(["-d", "c", "-spm", "s", "-mdir", "m", "--objective", "mdlm", "--self_cond", "0.5"])
    for objective, flag in (("mdlm", ["-smax", "5"]), ("mdlm", ["--prior_ramp", "10"]), ("ar", ["-rho", "7"]),
                            ("ar", ["--multilevel_prob", "0.5"])):
        problem = flags.resolve(flags.build_parser().parse_args(["-d", "c", "-spm", "s", "-mdir", "m", "--objective",
                                                                  objective, *flag]))
        assert problem == f"{flag[0]}: only for the diffusion objective, not --objective {objective}"
    for objective in ("diffusion", "ar"):
        problem = flags.resolve(flags.build_parser().parse_args(["-d", "c", "-spm", "s", "-mdir", "m", "--objective",
                                                                  objective, "--mask_weight", "uniform"]))
        assert problem == "--mask_weight uniform: only for --objective mdlm"
