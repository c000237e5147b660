"""The training diagnostics (diagnostics.py): the noise-level buckets, the loss by level in the log lines, the
gradient split by level, the shuffle gap's common draws, and a probed run training exactly as an unprobed one."""
import json
import math

import pytest
import torch

import plot
from conftest import run_train, small_model
from diagnostics import gradient_by_level, level_buckets, level_edges, level_figures, level_sums
from masked import masked_loss
from objectives import Autoregressive, Continuous, Masked
from scoring import line_estimates, line_seeds, shuffle_gap


def test_level_edges_span_each_objectives_levels():
    edges = level_edges(Continuous(1.0, 50.0), 8)
    assert len(edges) == 9 and edges[0] == pytest.approx(1.0) and edges[-1] == pytest.approx(50.0)
    ratios = [b / a for a, b in zip(edges, edges[1:])]
    assert ratios == pytest.approx([50 ** (1 / 8)] * 8)  # geometric: equal steps in log sigma
    assert level_edges(Masked(), 4) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert level_edges(Autoregressive()) is None


def test_level_sums_put_each_counted_position_in_its_bucket():
    edges = torch.tensor([1.0, 2.0, 4.0, 8.0])
    level = torch.tensor([[0.5, 1.5, 2.0, 3.9], [4.0, 7.9, 9.0, 1.0]])  # below the range, edges, above it
    ce = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    counted = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assert level_buckets(level, edges).tolist() == [[0, 0, 1, 1], [2, 2, 2, 0]]  # an edge starts its bucket
    sums = level_sums(level, ce, counted, edges)
    assert sums.tolist() == [[1.0 + 2.0 + 8.0, 3.0, 5.0 + 6.0 + 7.0], [3.0, 1.0, 3.0]]  # 4.0 at level 3.9 not counted
    figures = level_figures(torch.tensor([[6.0, 0.0, 9.0], [3.0, 0.0, 1.0]]), [1.0, 2.0, 4.0, 8.0], "sigma")
    assert figures["loss_by_level"] == [2.0, None, 9.0] and figures["level_share"] == [0.75, 0.0, 0.25]


@pytest.mark.parametrize("objective", [Continuous(1.0, 20.0, multilevel_prob=1.0), Masked()], ids=["diffusion", "mdlm"])
def test_gradients_by_level_add_up_to_the_steps_gradient(objective):
    """The buckets' gradients sum to the gradient of the whole micro-batch's loss under the same noise, the shares
    sum to 1, and neither the global generator nor the parameters' .grad are touched."""
    model = small_model(vocab_size=50, masked=objective.name == "mdlm")
    ids = torch.randint(4, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    segment_ids = torch.ones_like(ids)
    segment_ids[1, 6:] = 2  # two packed sequences in one row
    cond_mask = torch.zeros_like(ids, dtype=torch.bool)
    cond_mask[:, 0] = True
    edges = torch.tensor(level_edges(objective, 4))
    torch.manual_seed(7)
    state = torch.get_rng_state()
    figures = gradient_by_level(model, objective, ids, segment_ids, cond_mask, edges, 0, None, "fp32")
    assert torch.equal(torch.get_rng_state(), state)  # the training stream is left as it was
    assert all(p.grad is None for p in model.parameters())
    noise = objective.draw(model, ids, segment_ids, cond_mask, 0)  # the probe's draw, from the same state
    targets = objective.targets(segment_ids, cond_mask)
    loss, _, _ = objective.loss(model, ids, segment_ids, cond_mask, targets.float() / targets.sum(), noise)
    loss.backward()
    full = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    norms = [n for n in figures["grad_norm_by_level"] if n is not None]
    assert len(norms) >= 2  # the levels fell in several buckets
    shares = [s for s in figures["grad_share_by_level"] if s is not None]
    assert sum(shares) == pytest.approx(1.0, abs=1e-5)
    # |g|^2 = sum_k <g_k, g>: the shares are fractions of the full gradient's squared norm
    assert math.sqrt(sum(s * float(full.square().sum()) for s in shares)) == pytest.approx(float(full.norm()), rel=1e-4)
    assert sum(s for s in figures["loss_share_by_level"] if s is not None) == pytest.approx(1.0, abs=1e-6)
    cosines = [c for c in figures["grad_cosine_by_level"] if c is not None]
    assert all(-1 - 1e-6 <= c <= 1 + 1e-6 for c in cosines)
    for share, cosine, norm in zip(shares, cosines, norms):  # share = cos * |g_k| / |g|
        assert share == pytest.approx(cosine * norm / float(full.norm()), rel=1e-4, abs=1e-7)


def test_masked_observed_cross_entropy_is_the_plain_one():
    """The loss by level of masked diffusion is the cross-entropy itself at masked positions, not its 1/t multiple."""
    model = small_model(vocab_size=30, masked=True)
    ids = torch.randint(4, 30, (2, 8), generator=torch.Generator().manual_seed(1))
    t = torch.full((2, 8), 0.25)
    masked = torch.zeros(2, 8, dtype=torch.bool)
    masked[:, 2:5] = True
    _, ce, _ = masked_loss(model, ids, t, masked)
    level, plain, counted = Masked().observed({"t": t, "masked": masked}, ce, torch.ones_like(masked))
    logits = model(model.embed(torch.where(masked, model.cfg.vocab_size, ids)), torch.zeros(2, 8))[..., :30]
    direct = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(2, 8)
    assert torch.equal(counted, masked) and torch.equal(level, t)
    assert torch.allclose(plain[masked], direct[masked], atol=1e-4)


@pytest.mark.parametrize("objective", [Continuous(1.0, 20.0), Masked()], ids=["diffusion", "mdlm"])
def test_shuffle_gap_pairs_each_line_with_its_shuffled_words(tokenizer, objective):
    """Lines whose words are all alike read the same shuffled: the gap and its error are exactly 0 because a line and
    its shuffled words draw from one generator (each part alone has a Monte Carlo error); another line beside them,
    shuffled into more tokens, moves neither the draws nor the estimates of the others."""
    masked = isinstance(objective, Masked)
    model = small_model(vocab_size=tokenizer.vocab_size, masked=masked).eval()
    alike = [(tokenizer.encode(text), len(text) + 1) for text in ("the the the the", "tree tree tree")]
    gap = shuffle_gap(model, objective, alike, tokenizer, 32, 4, 0, 8, tokenizer.pad_id, torch.device("cpu"))
    assert gap["shuffle_lines"] == 2 and gap["shuffle_gap"] == 0.0 and gap["shuffle_gap_stderr"] == 0.0
    lines = alike + [(tokenizer.encode("a tree of the sea"), 18)]
    estimates = line_estimates(model, objective, lines, 8, tokenizer.pad_id, "cpu", 4, line_seeds(0, range(3)))
    alone = line_estimates(model, objective, alike[1:], 1, tokenizer.pad_id, "cpu", 4, line_seeds(0, [1]))
    assert estimates["per_draw"].shape == (3, 4) and estimates["variance"].min() > 0
    torch.testing.assert_close(estimates["per_draw"][1:2], alone["per_draw"], rtol=1e-5, atol=1e-5)
    mixed = shuffle_gap(model, objective, lines, tokenizer, 32, 4, 0, 8, tokenizer.pad_id, torch.device("cpu"))
    assert mixed["shuffle_lines"] == 3 and mixed["shuffle_gap_stderr"] > 0


def test_a_probed_run_trains_as_an_unprobed_one_and_logs_its_levels(tmp_path, corpus_file, spm_path):
    """--probe_interval writes the gradient by level and the shuffle gap to metrics.jsonl without changing a single
    weight; every log line has the loss by level; plot.py draws them."""
    plain = run_train(corpus_file, spm_path, tmp_path / "plain", "--max_steps", "6")
    probed = run_train(corpus_file, spm_path, tmp_path / "probed", "--max_steps", "6", "--probe_interval", "3",
                       "--probe_lines", "5", "--probe_draws", "2")
    assert all(torch.equal(plain["model"][k], probed["model"][k]) for k in plain["model"])
    lines = [json.loads(line) for line in (tmp_path / "probed" / "metrics.jsonl").read_text().splitlines()]
    probes = [line for line in lines if "probe_seconds" in line]
    assert [line["step"] for line in probes] == [3, 6]
    for line in probes:
        assert sum(s for s in line["grad_share_by_level"] if s is not None) == pytest.approx(1.0, abs=1e-4)
        assert 0 < line["shuffle_lines"] <= 5 and math.isfinite(line["shuffle_gap"])
    logged = [line for line in lines if "loss" in line]
    assert logged and all(len(line["loss_by_level"]) == 8 and line["level_name"] == "sigma" for line in logged)
    assert all(sum(line["level_share"]) == pytest.approx(1.0) for line in logged)
    if _has_matplotlib():  # optional (requirements-extra.txt)
        plot.main(["-mdir", str(tmp_path / "probed")])
        assert (tmp_path / "probed" / "levels.png").stat().st_size > 0


def test_the_baselines_log_lines_have_no_levels(tmp_path, corpus_file, spm_path):
    run_train(corpus_file, spm_path, tmp_path / "ar", "--max_steps", "2", "--objective", "ar", "--probe_interval", "2",
              "--probe_lines", "3")
    lines = [json.loads(line) for line in (tmp_path / "ar" / "metrics.jsonl").read_text().splitlines()]
    assert not any("loss_by_level" in line or "grad_share_by_level" in line for line in lines)
    probes = [line for line in lines if "probe_seconds" in line]
    assert len(probes) == 1 and 0 < probes[0]["shuffle_lines"] <= 3  # the gap of its exact NLL


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
