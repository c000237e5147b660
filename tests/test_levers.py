"""The continuous model's optional levers: clean anchors (diffusion.draw_anchors, --anchor_prob), the Gumbel shape of
the time warp (timewarp.gumbel_levels, --warp_shape gumbel), the ELBO term in the loss (diffusion.mixed_elbo_loss,
--elbo_weight), the shared noise conditioning (--conditioning shared), AdamW's epsilon and frozen embeddings."""
import math

import pytest
import torch

from conftest import small_model
from diffusion import (denoising_error, draw_anchors, draw_training_sigma, elbo_integrand, training_density,
                       training_features)
from flags import parse_args
from training import build_optimizer
from objectives import Continuous
from timewarp import TimeWarp, gumbel_levels


def test_anchors_follow_one_minus_the_level_and_spare_held_positions():
    segment_ids = torch.ones(4000, 8, dtype=torch.long)
    free = torch.ones(4000, 8, dtype=torch.bool)
    free[:, 0] = False  # bos: held, never an anchor
    generator = torch.Generator().manual_seed(0)
    for sigma, expected in ((1.0, 1.0), (50.0, 0.0), (math.sqrt(50.0), 0.5), (50 ** 0.25, 0.75)):
        anchors = draw_anchors(torch.full((4000, 8), sigma), free, segment_ids, 1.0, 1.0, 50.0, generator)
        assert not anchors[:, 0].any()
        assert float(anchors[:, 1:].float().mean()) == pytest.approx(expected, abs=0.01), sigma
    # in a share of the sequences only, all or none of a sequence's positions at the lowest level
    segment_ids[:, 4:] = 2
    anchors = draw_anchors(torch.ones(4000, 8), free, segment_ids, 0.3, 1.0, 50.0, generator)
    per_sequence = torch.stack([anchors[:, 1:4].all(1) | ~anchors[:, 1:4].any(1), anchors[:, 4:].all(1) |
                                ~anchors[:, 4:].any(1)])
    assert per_sequence.all()
    assert float(anchors[:, 4:].all(1).float().mean()) == pytest.approx(0.3, abs=0.03)
    assert not draw_anchors(torch.ones(4000, 8), free, segment_ids, 0.0, 1.0, 50.0).any()


def test_anchored_positions_are_read_clean_and_carry_no_loss():
    """The anchored objective's loss equals the plain loss with the anchors held (sigma 0, as a prompt is) and
    weighted 0; its reported ce is 0 there, and the anchors are left out of what is scored and observed."""
    model = small_model(vocab_size=40)
    ids = torch.randint(4, 40, (2, 10), generator=torch.Generator().manual_seed(0))
    segment_ids, cond_mask = torch.ones_like(ids), torch.zeros(2, 10, dtype=torch.bool)
    cond_mask[:, 0] = True
    objective = Continuous(1.0, 10.0, anchor_prob=1.0)
    torch.manual_seed(3)
    noise = objective.draw(model, ids, segment_ids, cond_mask, 0)
    anchors = noise["anchors"]
    assert anchors.any() and not (anchors & cond_mask).any()
    weight = torch.ones(2, 10) / 18
    loss, ce, _ = objective.loss(model, ids, segment_ids, cond_mask, weight, noise)
    plain = Continuous(1.0, 10.0)
    held = {k: v for k, v in noise.items() if k != "anchors"}
    expected, expected_ce, _ = plain.loss(model, ids, segment_ids, cond_mask | anchors, weight * ~anchors, held)
    torch.testing.assert_close(loss, expected)
    assert (ce[anchors] == 0).all() and torch.equal(ce[~anchors], expected_ce[~anchors])
    targets = objective.targets(segment_ids, cond_mask)
    assert torch.equal(objective.scored(noise, targets), targets & ~anchors)
    assert torch.equal(objective.observed(noise, ce, targets)[2], targets & ~anchors)
    # the anchors change the loss: the model reads them clean
    unheld, _, _ = plain.loss(model, ids, segment_ids, cond_mask, weight * ~anchors, held)
    assert not torch.allclose(loss, unheld)


def test_without_anchors_the_draw_is_what_it_always_was():
    model = small_model(vocab_size=40)
    ids = torch.randint(4, 40, (2, 10))
    segment_ids, cond_mask = torch.ones_like(ids), torch.zeros(2, 10, dtype=torch.bool)
    torch.manual_seed(5)
    plain = Continuous(1.0, 10.0).draw(model, ids, segment_ids, cond_mask, 0)
    after = torch.rand(())
    torch.manual_seed(5)
    anchored = Continuous(1.0, 10.0, anchor_prob=0.5).draw(model, ids, segment_ids, cond_mask, 0)
    assert "anchors" not in plain and "anchors" in anchored
    assert torch.equal(plain["sigma"], anchored["sigma"]) and torch.equal(plain["noise"], anchored["noise"])
    torch.manual_seed(5)
    Continuous(1.0, 10.0, anchor_prob=0.0).draw(model, ids, segment_ids, cond_mask, 0)
    assert torch.rand(()) == after  # no extra draw from the global generator


def test_the_gumbel_fit_recovers_a_gumbel_loss_curve():
    gamma = torch.linspace(-1, 8, 64, dtype=torch.float64)
    truth = 6.5 * torch.exp(-torch.exp(-(gamma - 3.0) / 0.9))
    noisy = truth + 0.05 * torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counts = torch.full((64,), 100.0, dtype=torch.float64)
    counts[:5] = 0  # unobserved bins still get the curve's value
    fitted = torch.tensor(gumbel_levels(gamma, noisy, counts), dtype=torch.float64)
    torch.testing.assert_close(fitted, truth, atol=0.08, rtol=0)
    assert (fitted.diff() >= 0).all()


def test_a_gumbel_warp_draws_where_a_gumbel_loss_rises():
    """A loss that is a Gumbel CDF in gamma = 2 ln sigma: the warp draws sigma so that gamma follows that Gumbel
    (mixed with the 5% floor, uniform in ln sigma), and it survives its state_dict."""
    warp = TimeWarp(1.0, 50.0, 1.0, shape="gumbel")
    generator = torch.Generator().manual_seed(0)
    mu, beta = 2.5, 0.6

    def loss(sigma):
        return 6 * torch.exp(-torch.exp(-(2 * sigma.log() - mu) / beta))

    for _ in range(30):
        sigma = warp(torch.rand(8192, generator=generator))
        warp.observe(sigma, loss(sigma), torch.ones_like(sigma))
        warp.fit()
    gamma = 2 * warp(torch.rand(200_000, generator=generator, dtype=torch.float64)).log()
    low, high = 0.0, 2 * math.log(50.0)

    def gumbel(g):
        return math.exp(-math.exp(-(g - mu) / beta))

    for g in (1.5, 2.5, 3.5, 5.0):
        inside = (gumbel(g) - gumbel(low)) / (gumbel(high) - gumbel(low))
        expected = 0.95 * inside + 0.05 * (g - low) / (high - low)
        assert float((gamma <= g).double().mean()) == pytest.approx(expected, abs=0.02), g
    restored = TimeWarp.from_state_dict(warp.state_dict())
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert restored.shape == "gumbel"
    torch.testing.assert_close(restored(u), warp(u))
    assert TimeWarp.from_state_dict({k: v for k, v in warp.state_dict().items() if k != "shape"}).shape == "monotone"


def test_the_lever_flags_are_checked(capsys):
    base = ["-d", "c.txt", "-spm", "m.model", "-mdir", "out"]
    for extra, message in ((["--anchor_prob", "1.5"], "--anchor_prob 1.5: must be in [0, 1]"),
                           (["--warp_shape", "gumbel", "--no-time_warp"], "--warp_shape gumbel: shapes the time warp"),
                           (["--objective", "mdlm", "--anchor_prob", "0.5"], "--anchor_prob: only for the diffusion"),
                           (["--objective", "ar", "--warp_shape", "gumbel"], "--warp_shape: only for the diffusion"),
                           (["--adam_eps", "0"], "--adam_eps 0.0: must be in (0, 1)"),
                           (["--embedding_lr_scale", "-1"], "--embedding_lr_scale -1.0: must be 0 or more"),
                           (["--conditioning", "none"], "invalid choice: 'none'")):
        with pytest.raises(SystemExit):
            parse_args(base + extra)
        assert message in capsys.readouterr().err, extra


@pytest.mark.parametrize("rho, warped", [(1.0, False), (7.0, False), (1.0, True)], ids=["rho1", "rho7", "warp"])
def test_the_training_density_is_the_density_of_the_drawn_levels(rho, warped):
    warp = TimeWarp(1.0, 50.0, rho) if warped else None
    if warped:  # a fitted warp: a loss that rises between sigma 2 and 6
        sigma = torch.linspace(1, 50, 5000)
        warp.observe(sigma, 6 * torch.sigmoid(3 * (sigma.log() - math.log(3.5))), torch.ones_like(sigma))
        warp.fit()
    grid = torch.linspace(1.0, 50.0, 200_001, dtype=torch.float64)
    density = training_density(grid, 1.0, 50.0, rho, warp).double()
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=2e-3)
    drawn = draw_training_sigma(torch.ones(400_000, 1, dtype=torch.long), 1.0, 50.0, rho, False,
                                torch.Generator().manual_seed(0), warp).double().flatten()
    for low, high in ((1.0, 1.5), (2.0, 3.0), (3.0, 6.0), (10.0, 30.0)):
        inside = (grid >= low) & (grid <= high)
        expected = float(torch.trapezoid(density[inside], grid[inside]))
        assert float(((drawn >= low) & (drawn < high)).double().mean()) == pytest.approx(expected, abs=4e-3), (low, high)


def test_the_chunked_denoising_error_has_the_plain_gradient():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, 6, generator=generator, requires_grad=True)
    table = torch.randn(11, 6, generator=generator, requires_grad=True)
    bias = torch.randn(11, generator=generator, requires_grad=True)
    clean = torch.randn(2, 5, 6, generator=generator, requires_grad=True)
    weight = torch.rand(2, 5, generator=generator)
    plain = ((features @ table.t() + bias).softmax(-1) @ table - clean).square().sum(-1)
    expected = torch.autograd.grad((plain * weight).sum(), (features, table, bias, clean))
    chunked = denoising_error(features, table, bias, clean, chunk=3)  # 10 rows: chunks of 3, 3, 3 and 1
    torch.testing.assert_close(chunked, plain)
    for got, want in zip(torch.autograd.grad((chunked * weight).sum(), (features, table, bias, clean)), expected):
        torch.testing.assert_close(got, want)


def test_the_elbo_term_estimates_the_bounds_diffusion_term():
    """Averaged over levels drawn as training draws them (rho 7, far from uniform), the importance-weighted integrand
    equals the bound's diffusion term, int sigma^-3 E|x - D|^2 dsigma, here by quadrature on a grid of levels for the
    same model and rows; without the density's weight it would be several times off."""
    model = small_model(vocab_size=30).eval()
    ids = torch.randint(4, 30, (2, 6), generator=torch.Generator().manual_seed(0))
    cond_mask = torch.zeros(2, 6, dtype=torch.bool)
    cond_mask[:, 0] = True
    torch.manual_seed(1)

    def errors(sigma, repeat):  # per row of the batch: sum over its positions of sigma^-3 |x - D|^2 / q(sigma)
        rows, held = ids.repeat(repeat, 1), cond_mask.repeat(repeat, 1)
        with torch.no_grad():
            features, level = training_features(model, rows, sigma, torch.randn(*rows.shape, 16), cond_mask=held)
            return elbo_integrand(model, rows, features, level, training_density(sigma, 1.0, 20.0, 7.0),
                                  torch.ones(rows.shape))[1].sum(-1).view(repeat, 2)

    drawn = errors(draw_training_sigma(torch.ones(8000, 6, dtype=torch.long), 1.0, 20.0, 7.0, False), 4000)
    estimate, error = drawn.mean(0), drawn.std(0) / math.sqrt(4000)
    grid = torch.logspace(0, math.log10(20.0), 49)  # sigma from 1 to 20; the integrand times q is sigma^-3 E|x - D|^2
    at_grid = errors(grid.repeat_interleave(2 * 32)[:, None].expand(-1, 6), 49 * 32)  # 32 noises a level
    density = training_density(grid, 1.0, 20.0, 7.0)
    integrand = at_grid.view(49, 32, 2).mean(1) * density[:, None]  # (levels, rows): sigma^-3 E|x - D|^2
    exact = torch.trapezoid(integrand * grid[:, None], grid.log(), dim=0)  # d sigma = sigma d ln sigma
    for row in range(2):
        assert float(estimate[row]) == pytest.approx(float(exact[row]), abs=4 * float(error[row]) + 0.02 * float(exact[row]))
        assert 4 * float(error[row]) < 0.15 * float(exact[row])  # a test that could fail


def test_shared_conditioning_is_film_with_one_layer_and_an_offset_per_block():
    """A shared-conditioning model equals a FiLM model whose every block's layer is the shared layer with the block's
    offset added to its bias; it starts unmodulated and has a block's layer fewer per block but one."""
    shared = small_model(vocab_size=40, conditioning="shared", num_layers=3)
    film = small_model(vocab_size=40, num_layers=3)
    assert all(not p.detach().any() for n, p in shared.named_parameters() if "film" in n)  # unmodulated
    torch.manual_seed(1)
    for p in shared.parameters():  # every weight nonzero, so that each takes part in the comparison
        p.data.normal_(0, 0.1)
    state = {k: v for k, v in shared.state_dict().items() if "film" not in k}
    for i, block in enumerate(shared.blocks):
        state[f"blocks.{i}.film.weight"] = shared.film.weight.detach()
        state[f"blocks.{i}.film.bias"] = shared.film.bias.detach() + block.film_offset.detach()
    film.load_state_dict(state)
    x, c_noise = torch.randn(2, 7, 16), torch.rand(2, 7)  # a noise level per token
    torch.testing.assert_close(shared(x, c_noise), film(x, c_noise))
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    layer, offset = film.blocks[0].film.weight.numel() + film.blocks[0].film.bias.numel(), 4 * 32
    assert count(film) - count(shared) == 2 * layer - 3 * offset


def test_adam_eps_and_frozen_embeddings_reach_the_optimizer():
    args = parse_args(["-d", "c.txt", "-spm", "m.model", "-mdir", "out", "--adam_eps", "1e-6",
                       "--embedding_lr_scale", "0"])
    model = small_model(vocab_size=40)
    optimizer = build_optimizer(model, args)
    assert {group["eps"] for group in optimizer.param_groups} == {1e-6}
    start = model.embedding.weight.detach().clone()
    for group in optimizer.param_groups:
        group["lr"] = group["lr_scale"] * 1e-2  # as training.py sets it each step
    model(model.embed(torch.randint(4, 40, (2, 6))), torch.rand(2, 6)).square().mean().backward()
    optimizer.step()
    assert torch.equal(model.embedding.weight, start) and model.embedding.weight.grad.abs().sum() > 0
    assert not torch.equal(model.input_proj.weight, small_model(vocab_size=40).input_proj.weight)
