import math

import torch

from conftest import denoise, small_model
from diffusion import (draw_training_sigma, edm_preconditioning, network_logits, rho_schedule,
                       score_interpolation_loss)


def test_rho_schedule_endpoints():
    assert math.isclose(rho_schedule(0.0, 1.0, 10.0, 7.0), 10.0)
    assert math.isclose(rho_schedule(1.0, 1.0, 10.0, 7.0), 1.0)
    assert math.isclose(rho_schedule(0.5, 1.0, 10.0, 1.0), 5.5)  # rho = 1 is linear


def test_edm_preconditioning_matches_its_formulas():
    sigma = torch.tensor([[0.0, 0.5, 1.0, 10.0]])
    c_in, c_noise = edm_preconditioning(sigma, sigma_data=1.0)
    torch.testing.assert_close(c_in, torch.tensor([[1.0, 1 / math.sqrt(1.25), 1 / math.sqrt(2), 1 / math.sqrt(101)]]))
    torch.testing.assert_close(c_noise[0, 1:], torch.log(sigma[0, 1:]) / 4)
    assert torch.isfinite(c_noise).all()  # sigma = 0 is floored, not -inf
    c_in, _ = edm_preconditioning(torch.tensor([2.0]), sigma_data=0.5)
    torch.testing.assert_close(c_in, torch.tensor([1 / math.sqrt(4.25)]))


def test_denoiser_is_identity_at_sigma_zero_and_score_interpolation_elsewhere():
    model = small_model(vocab_size=50).eval()
    x = torch.randn(2, 6, 16)
    sigma = torch.tensor([[0.0, 0.0, 1.0, 2.0, 5.0, 10.0]]).expand(2, 6)
    with torch.no_grad():
        denoised = denoise(model, x, sigma)
        logits = network_logits(model, x, sigma)
    assert torch.equal(denoised[:, :2], x[:, :2])
    expected = logits.softmax(-1) @ model.embedding_table()
    torch.testing.assert_close(denoised[:, 2:], expected[:, 2:])


def test_per_sequence_sigma_equals_the_same_sigma_per_token():
    model = small_model(vocab_size=50)
    ids = torch.randint(0, 50, (3, 8))
    noise = torch.randn(3, 8, 16)
    sigma = torch.tensor([1.0, 4.0, 9.0])
    cond = torch.rand(3, 8) < 0.3
    _, per_sequence, _ = score_interpolation_loss(model, ids, sigma, noise, cond_mask=cond)
    _, per_token, _ = score_interpolation_loss(model, ids, sigma[:, None].expand(3, 8).clone(), noise, cond_mask=cond)
    torch.testing.assert_close(per_sequence, per_token)
    _, other, _ = score_interpolation_loss(model, ids, sigma.flip(0), noise, cond_mask=cond)
    assert not torch.allclose(per_sequence, other)


def test_training_sigma_per_sequence_and_per_token():
    segment_ids = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    torch.manual_seed(0)
    sigma = draw_training_sigma(segment_ids, 1.0, 10.0, 1.0, per_token=False)
    assert sigma.shape == (2, 6) and ((sigma >= 1.0) & (sigma <= 10.0)).all()
    assert (sigma[0, :3] == sigma[0, 0]).all() and (sigma[0, 3:5] == sigma[0, 3]).all()
    assert sigma[0, 0] != sigma[0, 3]
    assert (sigma[1] == sigma[1, 0]).all()
    sigma = draw_training_sigma(segment_ids, 1.0, 10.0, 1.0, per_token=True)
    assert sigma[1].unique().numel() == 6


def test_fully_conditioned_batch_gives_a_finite_loss_and_gradient():
    model = small_model(vocab_size=50)
    ids = torch.randint(0, 50, (2, 5))
    cond = torch.ones(2, 5, dtype=torch.bool)
    weight = (~cond).float() / (~cond).sum().clamp_min(1)  # as training.optimizer_step weighs it: no 0 / 0
    loss, _, _ = score_interpolation_loss(model, ids, torch.full((2,), 3.0), torch.randn(2, 5, 16), cond_mask=cond,
                                          weight=weight)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
