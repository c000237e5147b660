"""The chunked tied head against the full (B L) x V logits it avoids forming."""
import pytest
import torch
import torch.nn.functional as F

import chunked
from chunked import tied_cross_entropy, tied_expectation
from conftest import small_model
from diffusion import network_logits, score_interpolation
from objectives import Autoregressive, Continuous
from training import TrainingForward


def test_tied_cross_entropy_equals_cross_entropy_of_the_full_logits():
    torch.manual_seed(0)
    features = torch.randn(37, 16, requires_grad=True)  # 37 rows: chunks of 8 leave a ragged last one
    table = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    with torch.no_grad():  # a third of the targets the most likely token, so that the hits are not all False
        targets[::3] = (features @ table.T + bias)[::3].argmax(dim=-1)
    weight = torch.rand(37) * (torch.rand(37) > 0.3)  # some positions out of the loss
    loss, ce, hit = tied_cross_entropy(features, table, bias, targets, weight, chunk=8)
    loss.backward()
    got = [loss.detach(), ce, features.grad, table.grad, bias.grad]
    features.grad = table.grad = bias.grad = None
    logits = features @ table.T + bias
    full_ce = F.cross_entropy(logits, targets, reduction="none")
    (full_ce * weight).sum().backward()
    expected = [(full_ce * weight).sum().detach(), full_ce.detach(), features.grad, table.grad, bias.grad]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(hit, logits.argmax(dim=-1) == targets) and hit[::3].all() and not hit[1::3].all()


def test_in_bf16_the_gradients_come_back_in_each_inputs_dtype_and_near_fp32s():
    torch.manual_seed(0)
    features = torch.randn(37, 16).bfloat16().requires_grad_()
    table, bias = torch.randn(50, 16, requires_grad=True), torch.randn(50, requires_grad=True)
    targets, weight = torch.randint(0, 50, (37,)), torch.rand(37)
    loss, _, _ = tied_cross_entropy(features, table, bias, targets, weight, chunk=8)
    (1024 * loss).backward()  # as a loss scale would: scaled in float32, then cast
    assert (features.grad.dtype, table.grad.dtype) == (torch.bfloat16, torch.float32)
    f32 = features.detach().float().requires_grad_()
    t32, b32 = table.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    (1024 * (F.cross_entropy(f32 @ t32.T + b32, targets, reduction="none") * weight).sum()).backward()
    for got, expected in ((features.grad.float(), f32.grad), (table.grad, t32.grad), (bias.grad, b32.grad)):
        torch.testing.assert_close(got, expected, atol=0.05 * expected.abs().max(), rtol=0.05)


def test_in_fp16_small_gradients_do_not_underflow_before_the_loss_scale():
    torch.manual_seed(0)
    features = torch.randn(64, 16).half().requires_grad_()
    table, bias = torch.randn(50, 16, requires_grad=True), torch.randn(50, requires_grad=True)
    targets, weight = torch.randint(0, 50, (64,)), torch.full((64,), 1 / 65536)  # a large step's share per position
    loss, _, _ = tied_cross_entropy(features, table, bias, targets, weight, chunk=16)
    (65536 * loss).backward()  # GradScaler's initial scale
    t32 = table.detach().clone().requires_grad_()
    (65536 * (F.cross_entropy(features.detach().float() @ t32.T + bias.detach(), targets, reduction="none")
              * weight).sum()).backward()
    assert ((table.grad == 0) & (t32.grad != 0)).sum() == 0
    torch.testing.assert_close(table.grad, t32.grad, atol=1e-3 * t32.grad.abs().max(), rtol=1e-2)


def test_tied_expectation_equals_the_softmax_of_the_full_logits():
    torch.manual_seed(0)
    features, table, bias = torch.randn(2, 19, 16), torch.randn(50, 16), torch.randn(50)
    expected, top, argmax = tied_expectation(features, table, bias, torch.float64, chunk=8)
    # the reference in float64 throughout; the logits are float32 (rounded as the CPU's kernels round, which differ
    # between CPUs), so the softmax after them agrees to float32's tolerances
    probs = (features.double() @ table.double().T + bias.double()).softmax(dim=-1)
    torch.testing.assert_close(expected, probs @ table.double(), atol=1e-5, rtol=1.3e-6)
    torch.testing.assert_close(top, probs.max(dim=-1).values, atol=1e-5, rtol=1.3e-6)
    assert torch.equal(argmax, probs.argmax(dim=-1)) and expected.dtype == torch.float64
    alone, no_top, no_argmax = tied_expectation(features, table, bias, torch.float64, chunk=8, with_top=False)
    assert torch.equal(alone, expected) and no_top is None and no_argmax is None


def perturbed(model):
    """The model with every parameter moved off its initialisation (zero-initialised heads and FiLM would leave
    some gradients zero whatever the loss)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def plain_loss(model, ids, sigma, noise, segment_ids, cond_mask, weight, self_cond):
    """The training loss through the full logits, as score_interpolation_loss computed it before chunking."""
    sigma = sigma.masked_fill(cond_mask, 0.0)
    x = model.embed(ids) + sigma[..., None] * noise
    estimate = None
    if self_cond:
        with torch.no_grad():
            estimate = score_interpolation(network_logits(model, x, sigma, segment_ids).softmax(dim=-1), x, sigma,
                                           model.embedding_table())
    logits = network_logits(model, x, sigma, segment_ids, self_cond=estimate)
    ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(ids.shape)
    return (ce * weight).sum(), ce, logits.argmax(dim=-1)


@pytest.mark.parametrize("output_prior, self_cond, causal", [(True, True, False), (False, False, False),
                                                              (False, False, True)])
def test_training_loss_and_every_gradient_equal_the_full_logits_path(monkeypatch, output_prior, self_cond, causal):
    monkeypatch.setattr(chunked, "CHUNK_ROWS", 16)  # 48 rows: three chunks
    model = perturbed(small_model(vocab_size=50, output_prior=output_prior, self_cond=self_cond, causal=causal))
    torch.manual_seed(1)
    ids = torch.randint(0, 50, (2, 24))
    segment_ids = torch.tensor([[1] * 9 + [2] * 11 + [0] * 4, [1] * 24])  # packed rows, with fill
    cond_mask = (torch.rand(2, 24) < 0.3) | (segment_ids == 0)
    sigma, noise = torch.rand(2, 24) * 9 + 1, torch.randn(2, 24, 16)
    objective = Autoregressive() if causal else Continuous()
    targets = objective.targets(segment_ids, cond_mask)
    weight = targets / targets.sum()
    drawn = {"sigma": sigma, "noise": noise, "self_cond": self_cond, "prior_scale": torch.ones(())}
    loss, ce, hit = TrainingForward(model, objective)(ids, segment_ids, cond_mask, weight, drawn)
    loss.backward()
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # not the rotary frequencies
    got = {name: p.grad.clone() for name, p in trained}
    model.zero_grad()
    if causal:  # position t predicts ids[t] from the tokens before it
        logits = model(model.embed(ids), torch.zeros(2, 24), segment_ids)[:, :-1]
        full_ce = F.pad(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(2, 23),
                        (1, 0))
        full_loss = (full_ce * weight).sum()
        full_hit = F.pad(logits.argmax(dim=-1) == ids[:, 1:], (1, 0), value=False)
    else:
        full_loss, full_ce, full_argmax = plain_loss(model, ids, sigma, noise, segment_ids, cond_mask, weight,
                                                     self_cond)
        full_hit = full_argmax == ids
    full_loss.backward()
    torch.testing.assert_close(loss, full_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ce, full_ce.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(hit, full_hit)
    for name, p in trained:
        torch.testing.assert_close(got[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)
    # every parameter is reached, so that each check can fail (the baseline's noise level is 0: its Fourier
    # frequencies multiply zeros)
    assert all(g.abs().sum() > 0 for name, g in got.items() if not (causal and name == "fourier.freqs"))
