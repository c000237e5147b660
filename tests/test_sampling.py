"""Samplers, per-token schedules, early exit and generate(), against hand-computed steps and an exact denoiser."""
import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import schedule_sigmas, small_model
from diffusion import (SAMPLERS, SCHEDULES, EarlyExit, Grid, ScheduleState, ancestral_step, ar_schedule,
                       confidence_schedule, euler_step, generate, heun_step, iterative_step, stochastic_step,
                       uniform_schedule)

ALL_SCHEDULES = {"uniform": uniform_schedule, "ar": partial(ar_schedule, skew=2.0),
                 "confidence": partial(confidence_schedule, threshold=0.5, patience=0.5)}
ALL_SAMPLERS = {**SAMPLERS, "stochastic": partial(stochastic_step, steps=12, S_churn=20.0)}


class ExactDenoiser(torch.nn.Module):
    """The Bayes-optimal network for data that is uniform over K fixed rows: the logits at each position are the
    log of the token marginal under the exact posterior over rows given x (Gaussian likelihood at each sigma).
    Reads sigma back from EDM's c_noise = ln(sigma) / 4 and x from c_in x."""

    def __init__(self, rows, vocab_size=50, embedding_dim=16):
        super().__init__()
        table = torch.randn(vocab_size, embedding_dim, generator=torch.Generator().manual_seed(0))
        self.table = F.normalize(table, dim=-1) * math.sqrt(embedding_dim)  # (V, E)
        self.rows, self.vocab_size = rows, vocab_size  # (K, L)
        self.cfg = SimpleNamespace(embedding_dim=embedding_dim, self_cond=False, output_prior=False)

    def embedding_table(self):
        return self.table

    def embed(self, ids):
        return self.table[ids]

    def forward(self, x_in, c_noise, segment_ids=None):
        sigma = torch.exp(4 * c_noise)  # (B, L)
        x = x_in * torch.sqrt(sigma ** 2 + 1)[..., None]  # undo c_in with sigma_data = 1
        clean = self.table[self.rows]  # (K, L, E)
        log_likelihood = -(((x[:, None] - clean) ** 2).sum(-1) / (2 * sigma[:, None] ** 2)).sum(-1)  # (B, K)
        posterior = log_likelihood.softmax(dim=-1)
        marginals = torch.einsum("bk,klv->blv", posterior, F.one_hot(self.rows, self.vocab_size).float())
        return torch.log(marginals + 1e-30)  # (B, L, V)


def exact_model():
    rows = torch.randint(4, 50, (4, 12), generator=torch.Generator().manual_seed(1))
    return ExactDenoiser(rows), rows


def run(model, step, schedule, ids, cond, seeds, steps=12, **kwargs):
    return generate(model, step, schedule, Grid(0.5, 10.0, 7.0), ids, cond, seeds, steps, **kwargs)


@pytest.mark.parametrize("name", ALL_SCHEDULES)
def test_each_schedule_gives_monotone_levels_from_sigma_max_to_sigma_min_then_zero(name):
    cond = torch.zeros(3, 10, dtype=torch.bool)
    cond[1, :4] = True  # a prompt
    cond[2, 3:6] = True  # a held span inside
    sigmas = schedule_sigmas(ALL_SCHEDULES[name], cond, 16, 1.0, 10.0, 7.0)
    assert sigmas.shape == (17, 3, 10) and sigmas.dtype == torch.float32
    free = ~cond
    assert (sigmas[:, cond] == 0).all()
    torch.testing.assert_close(sigmas[0][free], torch.full((int(free.sum()),), 10.0))
    torch.testing.assert_close(sigmas[15][free], torch.full((int(free.sum()),), 1.0))
    assert (sigmas[16] == 0).all()
    assert (sigmas[1:] <= sigmas[:-1]).all()  # every position monotone


def test_uniform_schedule_is_the_edm_grid():
    sigmas = schedule_sigmas(uniform_schedule, torch.zeros(2, 3, dtype=torch.bool), 5, 1.0, 10.0, 7.0)
    grid = sigmas[:, 0, 0]
    assert (sigmas == grid[:, None, None]).all()
    expected = (10 ** (1 / 7) + 2 / 4 * (1 - 10 ** (1 / 7))) ** 7  # Karras et al. (2022) eq. 5, i = 2 of N = 5
    assert math.isclose(grid[2].item(), expected, rel_tol=1e-6)
    torch.testing.assert_close(grid[[0, 4, 5]], torch.tensor([10.0, 1.0, 0.0]))
    one_step = schedule_sigmas(uniform_schedule, torch.zeros(1, 1, dtype=torch.bool), 1, 1.0, 10.0, 7.0)
    torch.testing.assert_close(one_step, torch.tensor([10.0, 0.0])[:, None, None])
    with pytest.raises(ValueError):
        schedule_sigmas(uniform_schedule, torch.zeros(1, 1, dtype=torch.bool), 0, 1.0, 10.0, 7.0)


def test_ar_schedule_with_skew_zero_is_uniform_and_otherwise_runs_earlier_positions_ahead():
    cond = torch.zeros(2, 9, dtype=torch.bool)
    cond[1, :4] = True  # with a prompt, the first free position leads
    uniform = schedule_sigmas(uniform_schedule, cond, 20, 1.0, 10.0, 1.0)
    assert torch.equal(schedule_sigmas(partial(ar_schedule, skew=0.0), cond, 20, 1.0, 10.0, 1.0), uniform)
    skewed = schedule_sigmas(partial(ar_schedule, skew=1.0), cond, 20, 1.0, 10.0, 1.0)
    middle = skewed[10]  # u = 10 / 19; rank r is at progress 2u - r
    assert (middle[0, 1:] > middle[0, :-1]).all()  # strictly later positions are noisier
    torch.testing.assert_close(middle[0, 0], torch.tensor(1.0))  # the first reached sigma_min at u = 1/2
    assert middle[1, 4] == middle[0, 0] and middle[1, 8] == middle[0, 8]  # ranks among the free positions
    r, u = 3 / 8, 10 / 19
    torch.testing.assert_close(middle[0, 3], torch.tensor(10 - 9 * (2 * u - r)))  # linear in sigma at rho = 1


def test_confidence_schedule_moves_confident_stable_positions_and_holds_the_rest_until_the_deadline():
    state = ScheduleState.start(torch.zeros(1, 4, dtype=torch.bool))
    state.t = torch.tensor([[0.1, 0.1, 0.1, 0.1]], dtype=torch.float64)
    state.u = 0.2
    state.confidence = torch.tensor([[0.95, 0.95, 0.3, 0.99]])
    state.stable = torch.tensor([[True, False, True, True]])
    t = confidence_schedule(0.3, state, threshold=0.9, patience=0.5)
    # positions 0 and 3 advance by (0.3 - 0.2) / (1 - 0.5); the deadline is still at 0
    torch.testing.assert_close(t, torch.tensor([[0.3, 0.1, 0.1, 0.3]], dtype=torch.float64))
    t = confidence_schedule(0.8, state, threshold=0.9, patience=0.5)  # the deadline (0.8 - 0.5) / 0.5 carries all
    torch.testing.assert_close(t, torch.tensor([[1.3, 0.6, 0.6, 1.3]], dtype=torch.float64))  # advance() clamps
    t = confidence_schedule(0.3, state, threshold=0.9, patience=0.0)
    assert (t >= 0.3).all()  # patience 0: nobody is behind the uniform schedule


def test_euler_step_matches_a_hand_computed_one():
    denoiser = lambda x, sigma: 0.5 * x  # noqa: E731
    x = torch.ones(1, 2, 3)
    sigma, sigma_next = torch.full((1, 2), 4.0), torch.tensor([[1.0, 4.0]])
    # d = (x - x/2) / 4 = x/8; the first position moves by (1 - 4) x/8, the second waits at its level
    out = euler_step(denoiser, x, sigma, sigma_next, None)
    torch.testing.assert_close(out, torch.tensor([5 / 8, 1.0])[None, :, None].expand(1, 2, 3))


def test_heun_matches_a_hand_computed_step_and_equals_euler_into_zero():
    denoiser = lambda x, sigma: torch.zeros_like(x)  # noqa: E731  (d = x / sigma: the exact flow is x ~ sigma)
    x = torch.full((1, 2, 1), 4.0)
    sigma = torch.full((1, 2), 4.0)
    out = heun_step(denoiser, x, sigma, torch.tensor([[2.0, 0.0]]), None)
    torch.testing.assert_close(out, torch.tensor([[[2.0], [0.0]]]))  # exact on x = sigma; Euler into 0
    model = small_model(vocab_size=50).eval()
    x = 10 * torch.randn(2, 6, 16)
    real = lambda x, sigma: model.embedding_table()[model(x, sigma.log() / 4).argmax(-1)]  # noqa: E731
    sigma, zero = torch.full((2, 6), 10.0), torch.zeros(2, 6)
    heun, euler = heun_step(real, x, sigma, zero, None), euler_step(real, x, sigma, zero, None)
    assert torch.equal(heun, euler) and torch.isfinite(heun).all()


def test_heun_with_one_step_equals_euler_through_generate():
    model = small_model(vocab_size=50).eval()
    ids, cond = torch.zeros(3, 8, dtype=torch.long), torch.zeros(3, 8, dtype=torch.bool)
    heun = run(model, heun_step, uniform_schedule, ids, cond, [0, 1, 2], steps=1)
    euler = run(model, euler_step, uniform_schedule, ids, cond, [0, 1, 2], steps=1)
    assert torch.equal(heun[0], euler[0]) and heun[1].tolist() == [1, 1, 1]


def test_stochastic_step_adds_churn_noise_then_takes_a_heun_step():
    denoiser = lambda x, sigma: torch.zeros_like(x)  # noqa: E731  (Heun is exact on this linear flow)
    eps = torch.randn(1, 3, 2)
    x, sigma, sigma_next = torch.randn(1, 3, 2), torch.tensor([[5.0, 5.0, 0.0]]), torch.tensor([[4.0, 5.0, 0.0]])
    out = stochastic_step(denoiser, x, sigma, sigma_next, lambda: eps, steps=10, S_churn=2.0, S_noise=1.5)
    sigma_hat = 5.0 * 1.2  # gamma = min(2 / 10, sqrt(2) - 1)
    expected_first = (x[0, 0] + math.sqrt(sigma_hat ** 2 - 25.0) * 1.5 * eps[0, 0]) * 4.0 / sigma_hat
    torch.testing.assert_close(out[0, 0], expected_first)
    torch.testing.assert_close(out[0, 1:], x[0, 1:])  # a waiting and a conditioned position get no churn
    no_churn = stochastic_step(denoiser, x, sigma, sigma_next, lambda: eps, steps=10, S_churn=0.0)
    assert torch.equal(no_churn, heun_step(denoiser, x, sigma, sigma_next, None))
    outside = stochastic_step(denoiser, x, sigma, sigma_next, lambda: eps, steps=10, S_churn=2.0, S_tmax=4.0)
    assert torch.equal(outside, no_churn)


def test_iterative_step_renoises_the_estimate_at_the_next_level():
    estimate = torch.full((1, 3, 2), 0.5)
    denoiser = lambda x, sigma: estimate  # noqa: E731
    eps, x = torch.randn(1, 3, 2), torch.randn(1, 3, 2)
    out = iterative_step(denoiser, x, torch.tensor([[5.0, 5.0, 1.0]]), torch.tensor([[3.0, 5.0, 0.0]]), lambda: eps)
    torch.testing.assert_close(out[0, 0], 0.5 + 3.0 * eps[0, 0])
    assert torch.equal(out[0, 1], x[0, 1]) and torch.equal(out[0, 2], estimate[0, 2])


def test_ancestral_step_draws_from_the_posterior_given_the_estimate():
    estimate = torch.full((1, 3, 2), 0.5)
    denoiser = lambda x, sigma: estimate  # noqa: E731
    eps, x = torch.randn(1, 3, 2), torch.randn(1, 3, 2)
    out = ancestral_step(denoiser, x, torch.tensor([[5.0, 5.0, 1.0]]), torch.tensor([[3.0, 5.0, 0.0]]), lambda: eps)
    r2 = (3.0 / 5.0) ** 2  # mean D + r^2 (x - D), spread sigma_next sqrt(1 - r^2) = 3 * 0.8
    torch.testing.assert_close(out[0, 0], 0.5 + r2 * (x[0, 0] - 0.5) + 2.4 * eps[0, 0])
    assert torch.equal(out[0, 1], x[0, 1]) and torch.equal(out[0, 2], estimate[0, 2])


def final_variance(step, steps):
    """The variance of x at sigma 0.5 after `steps` steps of `step` down a geometric grid from sigma 10, for data
    N(0, 1) and its exact denoiser D(x; sigma) = x / (1 + sigma^2). Each step is linear, x' = a x + b noise, so the
    variance goes exactly as a^2 v + b^2 (a and b read off the step at x = 1, noise 0 and x = 0, noise 1)."""
    denoiser = lambda x, sigma: x / (1 + sigma[..., None] ** 2)  # noqa: E731
    sigmas = torch.logspace(math.log10(10.0), math.log10(0.5), steps + 1, dtype=torch.float64)
    variance = 1 + 10.0 ** 2
    one, zero = torch.ones(1, 1, 1, dtype=torch.float64), torch.zeros(1, 1, 1, dtype=torch.float64)
    for sigma, sigma_next in zip(sigmas[:-1].view(-1, 1, 1), sigmas[1:].view(-1, 1, 1)):
        a = float(step(denoiser, one, sigma[0], sigma_next[0], lambda: zero))
        b = float(step(denoiser, zero, sigma[0], sigma_next[0], lambda: one))
        variance = a ** 2 * variance + b ** 2
    return variance


def test_ancestral_sampling_converges_to_the_data_marginal_as_steps_grow_and_iterative_does_not():
    # At sigma 0.5 the marginal of x is N(0, 1.25). Ancestral steps lose Var(x_0 | x) (1 - r^2)^2 each, which
    # vanishes as the steps grow; iterative re-noising keeps only 1 / (1 + sigma^2) of the data's part at every
    # step, however many (why its samples collapse, and shorten, as the steps grow).
    error = {(name, n): abs(final_variance(SAMPLERS[name], n) / 1.25 - 1)
             for name in ("ancestral", "iterative", "euler") for n in (25, 400)}
    assert error["ancestral", 400] < 0.01 and error["ancestral", 400] < error["ancestral", 25] / 4
    assert error["euler", 400] < 0.01
    assert error["iterative", 25] > 0.4 and error["iterative", 400] > 0.4  # 0.69 instead of 1.25, at any count


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
@pytest.mark.parametrize("schedule", ALL_SCHEDULES)
def test_with_the_exact_denoiser_every_sampler_and_schedule_lands_on_a_data_row(sampler, schedule):
    model, rows = exact_model()
    ids, cond = torch.zeros(8, 12, dtype=torch.long), torch.zeros(8, 12, dtype=torch.bool)
    out, _, _ = run(model, ALL_SAMPLERS[sampler], ALL_SCHEDULES[schedule], ids, cond, range(8), steps=24)
    assert (out[:, None] == rows).all(-1).any(-1).all(), out


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
@pytest.mark.parametrize("schedule", ALL_SCHEDULES)
def test_held_tokens_come_out_exactly_for_every_sampler_and_schedule(sampler, schedule):
    model = small_model(vocab_size=50).eval()
    ids = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(0))
    cond = torch.zeros(3, 10, dtype=torch.bool)
    cond[:, :3] = True  # prefix
    cond[1, 5:7] = True  # infill
    cond[2, 8:] = True  # suffix
    out, evaluations, steps = run(model, ALL_SAMPLERS[sampler], ALL_SCHEDULES[schedule], ids, cond, [0, 1, 2], steps=6)
    assert torch.equal(out[cond], ids[cond])
    assert ((out >= 0) & (out < 50)).all() and steps.tolist() == [6, 6, 6]
    again = run(model, ALL_SAMPLERS[sampler], ALL_SCHEDULES[schedule], ids[1:], cond[1:], [1, 2], steps=6)
    assert torch.equal(again[0], out[1:])  # a sample depends on its seed, not on its batch


def test_a_shorter_sample_in_a_padded_batch_equals_the_sample_alone():
    model = small_model(vocab_size=50).eval()
    ids, cond = torch.zeros(2, 12, dtype=torch.long), torch.zeros(2, 12, dtype=torch.bool)
    cond[0, 7:] = True  # row 0 is 7 tokens long; the rest is held padding in segment 0
    segment_ids = torch.ones(2, 12, dtype=torch.long)
    segment_ids[0, 7:] = 0
    batched = run(model, euler_step, partial(ar_schedule, skew=1.0), ids, cond, [5, 6], segment_ids=segment_ids)[0]
    alone = run(model, euler_step, partial(ar_schedule, skew=1.0), ids[:1, :7], cond[:1, :7], [5])[0]
    leaky = run(model, euler_step, partial(ar_schedule, skew=1.0), ids, cond, [5, 6])[0]
    assert torch.equal(batched[0, :7], alone[0])
    assert not torch.equal(leaky[0, :7], alone[0])  # without segment ids the padding is attended to


def test_float64_sampling_maths_runs_and_keeps_held_tokens():
    model = small_model(vocab_size=50).eval()
    ids, cond = torch.randint(0, 50, (2, 8)), torch.zeros(2, 8, dtype=torch.bool)
    cond[:, :2] = True
    out, _, _ = run(model, heun_step, uniform_schedule, ids, cond, [0, 1], dtype=torch.float64)
    assert torch.equal(out[cond], ids[cond])
    exact, rows = exact_model()
    out, _, _ = run(exact, euler_step, uniform_schedule, torch.zeros(4, 12, dtype=torch.long),
                    torch.zeros(4, 12, dtype=torch.bool), range(4), dtype=torch.float64)
    assert (out[:, None] == rows).all(-1).any(-1).all()


def test_early_exit_with_the_exact_denoiser_saves_evaluations_and_changes_nothing():
    model, rows = exact_model()
    ids, cond = torch.zeros(8, 12, dtype=torch.long), torch.zeros(8, 12, dtype=torch.bool)
    full, full_evals, _ = run(model, euler_step, uniform_schedule, ids, cond, range(8), steps=100)
    early, evals, steps = run(model, euler_step, uniform_schedule, ids, cond, range(8), steps=100,
                              early_exit=EarlyExit(5))
    assert torch.equal(early, full)
    assert full_evals.tolist() == [100] * 8 and evals.float().mean() < 60 and torch.equal(evals, steps)


def test_the_same_seed_gives_the_same_samples():
    model = small_model(vocab_size=50).eval()
    ids, cond = torch.zeros(4, 8, dtype=torch.long), torch.zeros(4, 8, dtype=torch.bool)
    sampler = ALL_SAMPLERS["stochastic"]
    first = run(model, sampler, uniform_schedule, ids, cond, [0, 1, 2, 3])[0]
    assert torch.equal(run(model, sampler, uniform_schedule, ids, cond, [0, 1, 2, 3])[0], first)
    assert not torch.equal(run(model, sampler, uniform_schedule, ids, cond, [4, 5, 6, 7])[0], first)


def test_schedules_and_samplers_are_registered_by_name():
    assert set(SCHEDULES) == {"uniform", "ar", "confidence"}
    assert set(SAMPLERS) == {"euler", "heun", "stochastic", "iterative", "ancestral"}
