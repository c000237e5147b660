import pytest
import torch
from rotary_embedding_torch import RotaryEmbedding, apply_rotary_emb

from conftest import small_model
from model import ModelConfig, rotate, segment_mask, segment_positions


def test_segment_positions_restart_in_each_sequence():
    segment_ids = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert torch.equal(segment_positions(segment_ids), expected)


def test_segment_mask_compares_identities_not_lengths():
    # two packed sequences of equal length must not see each other
    mask = segment_mask(torch.tensor([[1, 1, 2, 2]]))[0, 0]
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_packed_sequence_gives_the_output_it_gives_alone(attention):
    model = small_model(vocab_size=50).eval()
    model.attention = attention  # the FlexAttention BlockMask (CUDA's kernel) must keep the same rule
    lengths = [5, 7, 7, 3]  # two of equal length, as in the original's bug
    xs = [torch.randn(1, n, 16) for n in lengths]
    c_noises = [torch.rand(1, n) for n in lengths]
    row_x = torch.cat(xs + [torch.randn(1, 2, 16)], dim=1)  # 2 fill slots at the end
    row_c = torch.cat(c_noises + [torch.zeros(1, 2)], dim=1)
    segment_ids = torch.tensor([[1] * 5 + [2] * 7 + [3] * 7 + [4] * 3 + [0] * 2])
    with torch.no_grad():
        packed = model(row_x, row_c, segment_ids)
        start = 0
        for x, c, n in zip(xs, c_noises, lengths):
            alone = model(x, c, None)
            torch.testing.assert_close(packed[:, start:start + n], alone, atol=1e-5, rtol=1e-5)
            start += n
        # without the segment mask the neighbours do leak: the check above can fail
        unmasked = model(row_x, row_c, torch.ones_like(segment_ids))
        assert not torch.allclose(unmasked[:, 5:12], model(xs[1], c_noises[1], None), atol=1e-3)


def test_every_token_reads_its_own_noise_level():
    model = small_model(vocab_size=50).eval()
    torch.nn.init.normal_(model.blocks[0].film.weight, std=0.5)  # FiLM starts at zero; make it act
    x, c_noise = torch.randn(1, 6, 16), torch.zeros(1, 6)
    with torch.no_grad():
        base = model(x, c_noise)
        c_noise[0, 3] = 0.5
        changed = model(x, c_noise)
    assert not torch.allclose(base[0, 3], changed[0, 3])


def test_embeddings_are_normalised_to_sqrt_dim():
    model = small_model(vocab_size=50)
    norms = model.embed(torch.arange(50)[None]).norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, 4.0))
    torch.testing.assert_close(model.embedding_table().norm(dim=-1), torch.full((50,), 4.0))


def test_config_refuses_heads_that_do_not_divide_the_width():
    with pytest.raises(ValueError, match="heads"):
        ModelConfig(model_dim=30, num_heads=4)


def test_flex_attention_self_check_falls_back_to_sdpa_when_the_kernel_fails(monkeypatch):
    import model
    monkeypatch.setattr(model, "_flex_checked", {})
    assert model.flex_attention_works(torch.device("cpu"))  # agrees with SDPA where it runs
    monkeypatch.setattr(model, "_flex_checked", {})

    def broken(q, k, v, mask):
        if not isinstance(mask, torch.Tensor):
            raise RuntimeError("no kernel for this device")
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    monkeypatch.setattr(model, "packed_attention", broken)
    with pytest.warns(UserWarning, match="using SDPA"):
        assert not model.flex_attention_works(torch.device("cpu"))


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_a_causal_model_never_sees_later_tokens_nor_other_sequences(attention):
    model = small_model(vocab_size=50, causal=True).eval()
    model.attention = attention
    x, c_noise = torch.randn(1, 10, 16), torch.zeros(1, 10)
    changed = x.clone()
    changed[0, 6:] = torch.randn(4, 16)  # a different future
    with torch.no_grad():
        before, after = model(x, c_noise), model(changed, c_noise)
        torch.testing.assert_close(after[0, :6], before[0, :6])
        assert not torch.allclose(after[0, 6:], before[0, 6:])
        segment_ids = torch.tensor([[1] * 4 + [2] * 6])  # two packed sequences: the second alone is the same
        packed = model(x, c_noise, segment_ids)
        alone = model(x[:, 4:], c_noise[:, 4:])
        torch.testing.assert_close(packed[0, 4:], alone[0], atol=1e-5, rtol=1e-5)
    assert segment_mask(torch.tensor([[1, 1, 2]]), causal=True)[0, 0].tolist() == \
        [[True, False, False], [True, True, False], [False, False, True]]


def test_rotate_equals_the_rotary_librarys_own_application():
    torch.manual_seed(0)
    rotary = RotaryEmbedding(16)
    phases = rotary(segment_positions(torch.tensor([[1] * 5 + [2] * 7, [1] * 12])).float())[:, None]  # (2, 1, 12, 16)
    x = torch.randn(2, 3, 12, 16)
    expected = apply_rotary_emb(phases, x)
    torch.testing.assert_close(rotate(x, phases.cos(), phases.sin()), expected)
    assert not torch.allclose(expected, x, atol=1e-3)  # positions past 0 are turned


@pytest.mark.parametrize("kind", [dict(causal=True), dict(masked=True), dict(masked=True, conditioning="shared")])
def test_a_model_without_noise_levels_conditions_every_token_alike_from_one_embedding(kind, monkeypatch):
    model = small_model(vocab_size=50, **kind)
    for name, param in model.named_parameters():  # FiLM starts at zero, which would hide a wrong broadcast
        if "film" in name or "time_mlp" in name:
            torch.nn.init.normal_(param, std=0.5)
    ids = torch.randint(0, 50, (3, 7))
    segment_ids = torch.tensor([[1] * 7, [1] * 3 + [2] * 4, [1] * 5 + [0] * 2])
    x, c_noise = model.embed(ids).detach(), torch.zeros(3, 7)
    seen = []
    model.time_mlp.register_forward_hook(lambda module, inputs, output: seen.append(tuple(output.shape)))
    once = model(x, c_noise, segment_ids)
    once.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    monkeypatch.setattr(model, "reads_noise_level", lambda: True)  # the per-token path of a continuous model
    every = model(x, c_noise, segment_ids)
    every.square().sum().backward()
    assert seen == [(1, 1, 32), (3, 7, 32)]
    torch.testing.assert_close(once, every, rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        if param.grad is not None:
            scale = float(param.grad.abs().max())  # fp32 sums in another order, of gradients in the hundreds
            torch.testing.assert_close(grads[name], param.grad, rtol=0, atol=1e-5 * max(scale, 1.0), msg=name)
