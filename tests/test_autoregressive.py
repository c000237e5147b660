"""The autoregressive baseline's sampler: nucleus truncation, left-to-right sampling with held prompts, and sample.py
on a baseline run."""
import pytest
import torch

import sample
from autoregressive import generate_autoregressive, top_p_filter
from utils import UsageError


def test_top_p_keeps_the_smallest_nucleus_holding_p():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]])
    torch.testing.assert_close(top_p_filter(probs, 0.7), torch.tensor([[0.0, 0.5, 0.0, 0.25]]) / 0.75)
    torch.testing.assert_close(top_p_filter(probs, 0.75), torch.tensor([[0.0, 0.5, 0.0, 0.25]]) / 0.75)  # reaches p
    torch.testing.assert_close(top_p_filter(probs, 0.76), torch.tensor([[0.0, 0.5, 0.15, 0.25]]) / 0.9)
    torch.testing.assert_close(top_p_filter(probs, 0.01), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))  # the likeliest stays
    assert top_p_filter(probs, 1.0) is probs


class Counter(torch.nn.Module):
    """A causal "network" over 6 tokens whose next token is the previous one plus 1 (mod 6) with probability 0.9,
    else spread evenly over the rest: logits at position t are those of the token after ids[t]."""

    class cfg:
        causal = True

    def embed(self, ids):
        return ids.float()[..., None]

    def forward(self, x, c_noise, segment_ids=None):
        following = (x[..., 0].long() + 1) % 6
        probs = torch.full((*following.shape, 6), 0.02).scatter(-1, following[..., None], 0.9)
        return probs.log()


def test_sampling_continues_held_prompts_left_to_right_and_stops_at_eos():
    ids = torch.tensor([[0, 1, 9, 9, 9, 9, 9], [0, 3, 4, 9, 9, 9, 9]])  # 9: a pad; eos is 5
    cond = torch.zeros_like(ids, dtype=torch.bool)
    cond[0, :2] = cond[1, :3] = True
    out, evaluations, _ = generate_autoregressive(Counter(), ids.clamp(max=5), cond, [0, 1], eos_id=5, pad_id=2,
                                                  temperature=0.05)
    # near-greedy: each next token is the previous plus one; a row that reaches eos (5) is pad (2) after it
    assert out.tolist() == [[0, 1, 2, 3, 4, 5, 2], [0, 3, 4, 5, 2, 2, 2]]
    assert evaluations.tolist() == [4, 1]
    with pytest.raises(ValueError, match="after its held tokens"):
        generate_autoregressive(Counter(), ids.clamp(max=5), torch.tensor([[True, False, True] + [False] * 4] * 2),
                                [0, 1], eos_id=5, pad_id=2)


def test_a_samples_tokens_depend_on_its_seed_not_its_batch_and_follow_the_models_probabilities():
    ids, cond = torch.zeros(400, 2, dtype=torch.long), torch.tensor([[True, False]] * 400)
    out, _, _ = generate_autoregressive(Counter(), ids, cond, range(400), eos_id=5, pad_id=2)
    share = (out[:, 1] == 1).float().mean()
    assert 0.85 < share < 0.95  # the model's 0.9 for the token after 0
    alone, _, _ = generate_autoregressive(Counter(), ids[7:8], cond[7:8], [7], eos_id=5, pad_id=2)
    assert torch.equal(alone[0], out[7])
    truncated, _, _ = generate_autoregressive(Counter(), ids, cond, range(400), eos_id=5, pad_id=2, top_p=0.5)
    assert (truncated[:, 1] == 1).all()  # the nucleus of 0.5 holds the one likely token


def test_sample_py_samples_a_baseline_run_and_refuses_what_it_cannot(memorised_ar_run, capsys):
    model_dir, lines = memorised_ar_run
    words = lines[0].split()
    sample.main(["-mdir", str(model_dir), "-n", "2", "--prompt", " ".join(words[:2]), "--temperature", "0.1",
                 "--no-progress"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and all(text.startswith(" ".join(words[:2])) for text in out)
    assert lines[0] in out  # the memorised line, continued from its start
    for flags, message in [(["--infill", "a [3] b"], "--infill: not for .* an autoregressive run"),
                           (["--suffix", "end"], "--suffix: not for"),
                           (["--early_exit", "3"], "--early_exit: not for")]:
        with pytest.raises(UsageError, match=message):
            sample.main(["-mdir", str(model_dir), *flags])


def test_top_p_is_refused_for_a_diffusion_run(memorised_run):
    model_dir, _ = memorised_run
    with pytest.raises(UsageError, match="--top_p 0.9: not for .*a continuous diffusion run"):
        sample.main(["-mdir", str(model_dir), "--top_p", "0.9"])
