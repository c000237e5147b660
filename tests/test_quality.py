"""Self-conditioning and time warping: the model path, the training and sampling paths, the fitted warp."""
import math
from types import SimpleNamespace

import pytest
import torch

import eval as evaluate
import plot
import sample
import train
import training
from conftest import run_train, schedule_sigmas, small_model
from diffusion import Grid, generate, iterative_step, nll_bound, rho_schedule, uniform_schedule
from model import ScoreLM
from objectives import Continuous
from timewarp import TimeWarp, pool_adjacent_violators
from utils import UsageError


def test_a_zero_estimate_reproduces_the_plain_forward_and_a_real_one_is_read():
    conditioned = small_model(vocab_size=50, self_cond=True)
    plain = ScoreLM(small_model(vocab_size=50).cfg)
    plain.load_state_dict({k: v for k, v in conditioned.state_dict().items() if not k.startswith("self_cond_proj")})
    x, c_noise = torch.randn(2, 7, 16), torch.rand(2, 7)
    expected = plain(x, c_noise)
    torch.testing.assert_close(conditioned(x, c_noise, None, torch.zeros(2, 7, 16)), expected)
    torch.testing.assert_close(conditioned(x, c_noise), expected)  # None reads as zeros
    assert not torch.allclose(conditioned(x, c_noise, None, torch.randn(2, 7, 16)), expected, atol=1e-3)


def count_calls(model):
    """Record every pass of `model` through its network (model.features, which forward and the losses call):
    (whether its output carries a gradient, its self_cond argument)."""
    calls, features = [], model.features

    def recording(*args):
        out = features(*args)
        calls.append((out.requires_grad, args[3] if len(args) > 3 else None))
        return out
    model.features = recording
    return calls


def step_state(model, self_cond):
    """What train_step reads of a TrainingState: the model, its runner, a scaler, the continuous objective with
    self-conditioning in a `self_cond` share of the batches, and a loader of one process."""
    objective = Continuous(1.0, 10.0, 1.0, multilevel_prob=0.5, self_cond=self_cond)
    return SimpleNamespace(model=model, runner=training.TrainingForward(model, objective), objective=objective,
                           scaler=torch.amp.GradScaler("cpu", enabled=False), warp=None,
                           loader=SimpleNamespace(world_size=1))


def test_training_calls_the_model_twice_for_the_self_conditioned_share_and_once_otherwise():
    torch.manual_seed(0)
    model = small_model(vocab_size=50, self_cond=True)
    batch = {"ids": torch.randint(4, 50, (2, 8)), "segment_ids": torch.ones(2, 8, dtype=torch.long),
             "cond_mask": torch.zeros(2, 8, dtype=torch.bool)}
    batch["cond_mask"][:, 0] = True
    calls = count_calls(model)
    for share, expected in ((1.0, 2), (0.0, 1)):
        calls.clear()
        training.train_step(step_state(model, share), batch, SimpleNamespace(precision="fp32"), torch.device("cpu"),
                            1.0)
        assert len(calls) == expected
        if expected == 2:  # a first pass without gradient, then the trained one reading its estimate
            (first_grad, first_estimate), (second_grad, estimate) = calls
            assert not first_grad and first_estimate is None and second_grad
            # held positions (sigma = 0) read their clean embedding, the others a mix of embeddings
            torch.testing.assert_close(estimate[:, 0], model.embed(batch["ids"][:, :1])[:, 0].detach())
            assert estimate.abs().sum() > 0
        else:
            assert calls[0][1] is None
    # the configured share of batches: 0.3 of 400 draws (binomial standard deviation about 9 batches)
    twice = 0
    for _ in range(400):
        calls.clear()
        training.train_step(step_state(model, 0.3), batch, SimpleNamespace(precision="fp32"), torch.device("cpu"),
                            1.0)
        twice += len(calls) == 2
    assert 90 <= twice <= 150, twice


def test_sampling_passes_each_evaluation_the_previous_estimate():
    model = small_model(vocab_size=50, self_cond=True).eval()
    calls, features = [], model.features

    def recording(*args):  # each evaluation's arguments and logits
        out = features(*args)
        calls.append((args, model.project(out).detach()))
        return out
    model.features = recording
    ids = torch.randint(4, 50, (2, 6))
    cond = torch.zeros(2, 6, dtype=torch.bool)
    cond[:, :2] = True  # a held prompt
    generate(model, iterative_step, uniform_schedule, Grid(1.0, 10.0), ids, cond, [0, 1], 4)
    assert len(calls) == 4 and len(calls[0][0]) == 3  # the first evaluation has no estimate
    table = model.embedding_table()
    for (_, previous_logits), (args, _) in zip(calls, calls[1:]):
        # what the previous evaluation estimated: its expected embedding, the clean one where held
        expected = torch.where(cond[..., None], model.embed(ids), previous_logits.softmax(-1) @ table)
        torch.testing.assert_close(args[3], expected, atol=1e-5, rtol=1e-5)


def test_a_self_conditioned_sample_alone_equals_it_padded_in_a_batch_with_a_prompt():
    model = small_model(vocab_size=50, self_cond=True).eval()
    long_ids, long_cond = torch.randint(4, 50, (1, 8)), torch.zeros(1, 8, dtype=torch.bool)
    long_cond[:, :3] = True
    short_ids, short_cond = long_ids[:, :5], long_cond[:, :5]
    alone, _, _ = generate(model, iterative_step, uniform_schedule, Grid(1.0, 10.0), short_ids, short_cond, [7], 5)
    ids = torch.cat([torch.cat([short_ids, torch.full((1, 3), 2)], 1), long_ids])
    cond = torch.cat([torch.cat([short_cond, torch.ones(1, 3, dtype=torch.bool)], 1), long_cond])
    segment_ids = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    batched, _, _ = generate(model, iterative_step, uniform_schedule, Grid(1.0, 10.0), ids, cond, [7, 8], 5,
                             segment_ids=segment_ids)
    assert torch.equal(batched[0, :5], alone[0]) and torch.equal(batched[:, :3], ids[:, :3])


def test_pool_adjacent_violators_gives_the_closest_non_decreasing_sequence():
    assert pool_adjacent_violators([1, 3, 2, 4], [1, 1, 1, 1]) == [1, 2.5, 2.5, 4]
    assert pool_adjacent_violators([1, 3, 2, 4], [1, 3, 1, 1]) == [1, 2.75, 2.75, 4]
    assert pool_adjacent_violators([5, 0, 1], [1, 0, 1]) == [3, 3, 3]  # the unobserved 0 takes its block's level


@pytest.mark.parametrize("rho", [1.0, 7.0])
def test_the_warp_is_monotone_onto_the_noise_range_and_recovers_a_known_distribution(rho):
    warp = TimeWarp(0.5, 20.0, rho)
    u = torch.linspace(0, 1, 1001, dtype=torch.float64)
    # unfitted: the unwarped spacing, to the accuracy of 64 linear pieces
    torch.testing.assert_close(warp(u), rho_schedule(1 - u, 0.5, 20.0, rho), rtol=1e-3, atol=0)
    # synthetic losses: the cross-entropy at coordinate s is 6 s^3 plus noise, so the normalised loss, the CDF
    # the warp should draw s from, is G(s) = s^3 (mixed with 5% uniform)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        s = torch.rand(4096, generator=generator)
        sigma = rho_schedule(1 - s, 0.5, 20.0, rho)
        ce = 6 * warp.coordinate(sigma) ** 3 + 0.3 * torch.randn(4096, generator=generator)
        warp.observe(sigma, ce, torch.ones_like(ce))
        warp.fit()
    levels = warp(u)
    assert levels[0] == pytest.approx(0.5) and levels[-1] == pytest.approx(20.0)
    assert (levels.diff() > 0).all()
    drawn = warp.coordinate(warp(torch.rand(200_000, generator=generator, dtype=torch.float64)))
    for q in (0.2, 0.4, 0.6, 0.8, 0.9):
        expected = 0.95 * q ** 3 + 0.05 * q
        assert float((drawn <= q).double().mean()) == pytest.approx(expected, abs=0.01), q
    # positions that carry no loss (weight 0) change nothing
    before = warp.state_dict()
    warp.observe(sigma, ce + 100, torch.zeros_like(ce))
    warp.fit()
    torch.testing.assert_close(warp.cdf_knots, before["cdf_knots"])
    restored = TimeWarp.from_state_dict(warp.state_dict())
    torch.testing.assert_close(restored(u), warp(u))


def test_over_a_wide_range_the_warp_draws_where_the_loss_changes():
    # CDCD's range, linear spacing: unwarped, 3% of the levels fall below sigma 10; a loss that is decided there
    # (as a language model's is: RESULTS.md's cross-entropy by noise level) must pull most draws below it
    warp = TimeWarp(1.0, 300.0, 1.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        sigma = warp(torch.rand(8192, generator=generator))
        warp.observe(sigma, 6 * (1 - torch.exp(-(sigma - 1) / 2)), torch.ones_like(sigma))
        warp.fit()
    below = float((warp(torch.rand(100_000, generator=generator)) < 10).float().mean())
    assert below > 0.9, below


def test_levels_the_fit_has_left_behind_are_still_drawn_and_their_estimate_refreshed():
    # early estimates left the low levels above their neighbours (an untrained model), so the isotonic fit pools
    # them into a flat stretch the warp draws nothing from; the floor alone must reach them often enough to bring
    # their estimate down within a few hundred steps
    warp = TimeWarp(1.0, 50.0, 1.0)
    generator = torch.Generator().manual_seed(0)
    sigma = torch.linspace(1, 50, 5000)
    warp.observe(sigma, torch.where(sigma < 3, 8.0, 2 + 3 * (sigma - 3) / 47), torch.ones_like(sigma))
    warp.observe(torch.full((900,), 1.01), torch.full((900,), 10.0), torch.ones(900))  # an early burst at sigma_min
    warp.fit()
    assert (warp.cdf_knots.diff() >= 0.05 / 64 - 1e-12).all()  # every bin keeps its share of the floor
    for _ in range(30):  # 300 steps of 2,048 loss tokens (the tiny preset's rows): a few draws a bin a fit
        sigma = warp(torch.rand(20_480, generator=generator))
        warp.observe(sigma, 5 * (1 - torch.exp(-(sigma - 1) / 3)), torch.ones_like(sigma))
        warp.fit()
    sigmas, means, _ = warp.fitted_loss()
    assert means[0] < 1.0, means[:4]  # the lowest bin, sigma 1.03: its true loss is 0.03
    assert float((warp(torch.rand(100_000, generator=generator)) < 3).float().mean()) > 0.2


def test_a_flat_loss_leaves_the_spacing_unwarped():
    warp = TimeWarp(1.0, 10.0, 1.0)
    sigma = torch.linspace(1, 10, 500)
    warp.observe(sigma, torch.full_like(sigma, 3.0), torch.ones_like(sigma))
    warp.fit()
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(warp(u), rho_schedule(1 - u, 1.0, 10.0, 1.0), rtol=1e-3, atol=0)


def test_the_warped_sampling_grid_follows_the_warp():
    warp = TimeWarp(1.0, 10.0, 1.0)
    sigma = torch.linspace(1, 10, 1000)
    warp.observe(sigma, (sigma - 1) ** 0.5, torch.ones_like(sigma))
    warp.fit()
    cond = torch.zeros(1, 3, dtype=torch.bool)
    levels = schedule_sigmas(uniform_schedule, cond, 5, 1.0, 10.0, 7.0, warp=warp)[:, 0, 0]
    expected = warp(1 - torch.linspace(0, 1, 5, dtype=torch.float64)).float()
    torch.testing.assert_close(levels[:5], expected)
    assert levels[-1] == 0 and levels[0] == pytest.approx(10.0) and levels[4] == pytest.approx(1.0)
    unwarped = schedule_sigmas(uniform_schedule, cond, 5, 1.0, 10.0, 7.0)[:, 0, 0]
    assert not torch.allclose(levels, unwarped, atol=0.1)


def test_a_warped_self_conditioned_run_trains_samples_on_its_grid_and_plots_its_warp(tmp_path, corpus_file,
                                                                                   spm_path, capsys):
    run = tmp_path / "run"
    checkpoint = run_train(corpus_file, spm_path, run, "--max_steps", "20", "--time_warp", "--self_cond", "0.5")
    assert checkpoint["config"]["self_cond"] and checkpoint["time_warp"]["counts"].sum() > 0
    warp = checkpoint["time_warp"]
    unfitted = TimeWarp(warp["sigma_min"], warp["sigma_max"], warp["rho"], warp["bins"]).cdf_knots
    assert not torch.allclose(warp["cdf_knots"], unfitted, atol=1e-3)  # fitted
    sample.main(["-mdir", str(run), "-n", "2", "--steps", "4", "--grid", "warped", "--jsonl"])
    assert len(capsys.readouterr().out.splitlines()) == 2
    with pytest.raises(SystemExit):
        sample.parse_args(["-mdir", str(run), "--grid", "warped", "--rho", "3"])
    assert "--rho applies to --grid rho" in capsys.readouterr().err
    pytest.importorskip("matplotlib")
    plot.main(["-mdir", str(run)])
    assert (run / "time_warp.png").stat().st_size > 0
    plot.main(["-mdir", str(run), "-o", str(tmp_path / "run1.svg")])  # beside -o, named after it
    assert (tmp_path / "run1_time_warp.svg").stat().st_size > 0
    (tmp_path / "blocked_time_warp.png").mkdir()
    with pytest.raises(UsageError, match="cannot write the plot"):
        plot.main(["-mdir", str(run), "-o", str(tmp_path / "blocked.png")])


def test_the_warped_grid_needs_a_run_trained_with_a_warp(tmp_path, corpus_file, spm_path):
    run = tmp_path / "run"
    run_train(corpus_file, spm_path, run, "--max_steps", "2", "--no-time_warp")
    with pytest.raises(UsageError, match="trained without --time_warp"):
        sample.main(["-mdir", str(run), "-n", "1", "--steps", "2", "--grid", "warped"])
    valid = tmp_path / "valid.txt"
    valid.write_text("a line\n")
    with pytest.raises(UsageError, match="trained without --time_warp"):
        evaluate.main(["-mdir", str(run), "--valid", str(valid), "--sweep", "grid=rho,warped"])
    with pytest.raises(UsageError, match="trained without --time_warp"):  # also without samples: a flag not taken
        evaluate.main(["-mdir", str(run), "--valid", str(valid), "--grid", "warped"])


def test_resuming_with_other_noise_levels_says_how_to_keep_them_and_refits_the_warp(tmp_path, corpus_file,
                                                                                    spm_path, capsys):
    old = tmp_path / "old"
    run_train(corpus_file, spm_path, old, "--max_steps", "2", "-smax", "10", "--no-time_warp")
    capsys.readouterr()
    resumed = run_train(corpus_file, spm_path, old, "--max_steps", "3", "-smax", "50", "--time_warp")
    err = capsys.readouterr().err
    assert "to continue with the checkpoint's noise levels, add: --sigma_max 10.0 --no-time_warp" in err
    assert "--time_warp is new in this run" in err and resumed["time_warp"] is not None
    warped = tmp_path / "warped"
    first = run_train(corpus_file, spm_path, warped, "--max_steps", "20")
    assert first["time_warp"]["sigma_max"] == 50.0
    second = run_train(corpus_file, spm_path, warped, "--max_steps", "21", "-smax", "20")
    assert "the checkpoint's time warp is dropped and fitted afresh" in capsys.readouterr().err
    assert second["time_warp"]["sigma_max"] == 20.0 and second["time_warp"]["counts"].sum() == 0
    with pytest.raises(UsageError, match=r"--self_cond > 0 \(now 0\)"):  # self-conditioned by default
        run_train(corpus_file, spm_path, warped, "--max_steps", "22", "--self_cond", "0")
    with pytest.raises(SystemExit):
        run_train(corpus_file, spm_path, warped, "--max_steps", "22", "--objective", "ar")
    assert (f"--objective ar: {warped} holds a run of --objective diffusion; each objective needs a -mdir of its own"
            in capsys.readouterr().err)


@pytest.mark.parametrize("flags", [["--self_cond", "0.5"], ["--time_warp"], ["--self_cond", "1.5"]])
def test_the_autoregressive_baseline_refuses_self_conditioning_and_the_warp(flags, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["-d", "c", "-spm", "s", "-mdir", "m", "--objective", "ar", *flags])
    assert f"{flags[0]}: only for the diffusion objective, not --objective ar" in capsys.readouterr().err
    args = train.parse_args(["-d", "c", "-spm", "s", "-mdir", "m", "--objective", "ar"])
    assert args.self_cond == 0 and not args.time_warp


def test_the_bound_of_a_self_conditioned_model_is_finite_and_uses_two_passes():
    model = small_model(vocab_size=50, self_cond=True).eval()
    calls = count_calls(model)
    ids = torch.randint(4, 50, (2, 6))
    cond = torch.zeros(2, 6, dtype=torch.bool)
    cond[:, 0] = True
    terms = nll_bound(model, ids, cond, 1.0, 10.0, 2)
    assert len(calls) == 2 * 2 * 2 and calls[1][1] is not None  # (diffusion + reconstruction) x draws x 2 passes
    assert all(math.isfinite(float(v.sum())) for v in terms.values())
    assert calls[0][1] is None
