"""The training and sampling mechanisms of the recipe: output prior, conditioning share, optimiser groups, stratified
noise levels, score temperature and clamping, word-level sample figures, the time budget."""
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import eval as evaluate
import flags
import scoring
import train
import training
from checkpoint import load_model
from conftest import run_train, small_model
from data import conditioning_mask
from diffusion import Denoising, draw_training_sigma, network_logits, output_prior_offset, stratified_uniform
from model import ModelConfig
from test_sampling import ExactDenoiser
from utils import UsageError


def test_with_a_silent_network_the_output_prior_is_the_exact_single_token_posterior():
    model = small_model(vocab_size=30, output_prior=True).eval()
    assert float(model.head.weight.detach().abs().sum()) == 0  # the network starts as the single-token denoiser
    table = model.embedding_table()
    ids = torch.randint(0, 30, (2, 5))
    sigma = torch.tensor([[0.5, 1.0, 2.0, 4.0, 8.0], [1.5, 1.5, 3.0, 3.0, 20.0]])
    z = table[ids] + sigma[..., None] * torch.randn(2, 5, 16)
    with torch.no_grad():
        logits = network_logits(model, z, sigma)
    # brute force: p(v | z) proportional to N(z; e_v, sigma^2 I)
    log_likelihood = -((z[:, :, None] - table) ** 2).sum(-1) / (2 * sigma[..., None] ** 2)  # (B, L, V)
    torch.testing.assert_close(logits.log_softmax(-1), log_likelihood.log_softmax(-1), atol=1e-4, rtol=1e-4)
    assert (output_prior_offset(z, torch.zeros(2, 5)) == 0).all()  # held positions get nothing


class ContextOnly(ExactDenoiser):
    """The exact denoiser of the toy data written as a network with an output prior: it outputs the exact
    posterior's logits minus each token's own posterior, its own computation of z . e / sigma^2, and adds the
    offset network_logits passes, through the embeddings as ScoreLM's tied head does."""

    def __init__(self, rows):
        super().__init__(rows)
        self.cfg.output_prior, self.cfg.output_prior_scale = True, 1.0

    def forward(self, x_in, c_noise, segment_ids=None, self_cond=None, output_offset=None):
        sigma = torch.exp(4 * c_noise)
        z = x_in * torch.sqrt(sigma ** 2 + 1)[..., None]
        own = (z @ self.table.T) / sigma[..., None] ** 2
        return super().forward(x_in, c_noise, segment_ids) - own + output_offset @ self.table.T


def test_the_toy_bound_is_still_ln_4_with_the_output_prior():
    from test_eval import toy_bound
    rows = torch.randint(4, 50, (4, 6), generator=torch.Generator().manual_seed(1))
    bound, stderr, _ = toy_bound(ContextOnly(rows), rows)
    assert abs(bound - math.log(4)) < 3 * stderr + 0.02, (bound, stderr)


def test_a_prior_run_trains_resumes_and_refuses_the_baseline(tmp_path, corpus_file, spm_path):
    checkpoint = run_train(corpus_file, spm_path, tmp_path / "run", "--max_steps", "4", "--output_prior",
                           "--prior_ramp", "10")
    assert checkpoint["config"]["output_prior"]
    with pytest.raises(UsageError, match=r"--output_prior on \(now off\)"):
        run_train(corpus_file, spm_path, tmp_path / "run", "--max_steps", "6", "--no-output_prior")
    assert run_train(corpus_file, spm_path, tmp_path / "run", "--max_steps", "6")["config"]["output_prior"]
    with pytest.raises(SystemExit):
        flags.parse_args(["-d", "c", "-spm", "s", "-mdir", "m", "--objective", "ar", "--output_prior"])


def test_the_prior_ramp_weights_the_prior_by_the_step():
    model = small_model(vocab_size=30, output_prior=True).eval()
    x, sigma = torch.randn(1, 4, 16), torch.full((1, 4), 2.0)
    with torch.no_grad():
        full, half, none = (network_logits(model, x, sigma, prior_scale=s) for s in (1.0, 0.5, 0.0))
    torch.testing.assert_close(half, (full + none) / 2)
    assert torch.allclose(none, torch.zeros_like(none))  # zero head, zero bias: nothing but the prior


def test_the_prior_scale_tempers_the_starting_posterior_and_multiplies_the_ramp():
    model = small_model(vocab_size=30, output_prior=True).eval()
    table = model.embedding_table()
    x, sigma = table[torch.randint(0, 30, (1, 4))] + 2 * torch.randn(1, 4, 16), torch.full((1, 4), 2.0)
    with torch.no_grad():
        exact = network_logits(model, x, sigma)
        model.cfg.output_prior_scale = 0.25
        quarter, ramped = network_logits(model, x, sigma), network_logits(model, x, sigma, prior_scale=0.5)
    torch.testing.assert_close(quarter, exact / 4)  # the posterior at temperature 4: a flatter start
    torch.testing.assert_close(ramped, exact / 8)
    assert (quarter.softmax(-1).max(-1).values < exact.softmax(-1).max(-1).values).all()


def test_a_prior_scale_is_part_of_the_model_and_kept_on_resume(tmp_path, corpus_file, spm_path):
    run = tmp_path / "run"  # 0.25: neither the default (0.5) nor ModelConfig's (1), so that each would show
    checkpoint = run_train(corpus_file, spm_path, run, "--max_steps", "2", "--output_prior_scale", "0.25")
    assert checkpoint["config"]["output_prior_scale"] == 0.25
    model, _, _ = load_model(str(run))
    assert model.cfg.output_prior_scale == 0.25  # what sample.py and eval.py rebuild
    assert run_train(corpus_file, spm_path, run, "--max_steps", "3")["config"]["output_prior_scale"] == 0.25
    with pytest.raises(UsageError, match=r"--output_prior_scale 0.25 \(now 1\)"):
        run_train(corpus_file, spm_path, run, "--max_steps", "4", "--output_prior_scale", "1")
    del checkpoint["config"]["output_prior_scale"]  # a checkpoint from before the flag: the exact prior, 1
    assert ModelConfig(**checkpoint["config"]).output_prior_scale == 1.0


def test_a_run_without_the_prior_keeps_the_neutral_scale_whatever_the_default(tmp_path, corpus_file, spm_path,
                                                                               monkeypatch):
    monkeypatch.setitem(flags.DEFAULTS["every"], "output_prior_scale", 0.5)
    checkpoint = run_train(corpus_file, spm_path, tmp_path / "run", "--max_steps", "2", "--no-output_prior")
    assert (checkpoint["config"]["output_prior"], checkpoint["config"]["output_prior_scale"]) == (False, 1.0)
    assert run_train(corpus_file, spm_path, tmp_path / "run", "--max_steps", "3")["step"] == 3  # resumes alike
    assert json.loads((tmp_path / "run" / "args.json").read_text())["output_prior_scale"] == 1.0
    again = run_train(corpus_file, spm_path, tmp_path / "again", "--config", str(tmp_path / "run" / "args.json"))
    assert (again["config"]["output_prior"], again["config"]["output_prior_scale"]) == (False, 1.0)


def test_cond_prob_leaves_that_share_of_examples_wholly_free_and_1_draws_as_before():
    free = sum(not any(conditioning_mask(12, 12, random.Random(i), 0.25)) for i in range(4000))
    assert 2850 <= free <= 3150, free  # 75% (binomial sd 27), and the few spans of length 0 besides
    for i in range(200):
        assert conditioning_mask(9, 7, random.Random(i), 1.0) == conditioning_mask(9, 7, random.Random(i))


def test_embeddings_get_their_own_learning_rate_without_weight_decay(tmp_path, corpus_file, spm_path):
    args = flags.parse_args(["-d", "c", "-spm", "s", "-mdir", "m", "--embedding_lr_scale", "7", "--beta2", "0.95"])
    model = small_model()
    optimizer = training.build_optimizer(model, args)
    own = [g for g in optimizer.param_groups if any(p is model.embedding.weight for p in g["params"])]
    assert len(own) == 1 and own[0]["lr_scale"] == 7 and own[0]["weight_decay"] == 0 and len(own[0]["params"]) == 1
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    plain = flags.parse_args(["-d", "c", "-spm", "s", "-mdir", "m", "--embedding_lr_scale", "1"])
    assert len(training.build_optimizer(model, plain).param_groups) == 2  # the grouping of runs before the flag
    baseline = flags.parse_args(["-d", "c", "-spm", "s", "-mdir", "m", "--objective", "ar"])
    assert len(training.build_optimizer(model, baseline).param_groups) == 2  # the baseline keeps the plain recipe
    run_train(corpus_file, spm_path, tmp_path / "run", "--max_steps", "3", "--embedding_lr_scale", "7",
              "--log_interval", "1")
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    checkpoint = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert [g["lr"] for g in checkpoint["optimizer"]["param_groups"]] == pytest.approx([lrs[-1], lrs[-1], 7 * lrs[-1]])
    with pytest.raises(UsageError, match="--embedding_lr_scale"):
        run_train(corpus_file, spm_path, tmp_path / "run", "--max_steps", "5", "--embedding_lr_scale", "1")


def test_stratified_levels_take_one_draw_from_every_slice():
    u = torch.rand(3, 9)
    drawn = torch.zeros(3, 9, dtype=torch.bool)
    drawn[:, :4] = True
    out = stratified_uniform(u, drawn, torch.Generator().manual_seed(0))
    assert torch.equal(out[~drawn], u[~drawn])
    assert sorted((out[drawn] * 12).floor().long().tolist()) == list(range(12))
    segment_ids = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 2, 2, 3, 3]])
    sigma = draw_training_sigma(segment_ids, 1.0, 10.0, 1.0, False, stratified=True)
    assert (sigma[0, :3] == sigma[0, 0]).all() and (sigma[1, 4:] == sigma[1, 4]).all()
    levels = torch.stack([sigma[0, 0], sigma[0, 3], sigma[1, 0], sigma[1, 2], sigma[1, 4]])
    assert sorted(((levels - 1) / 9 * 5).floor().long().tolist()) == [0, 1, 2, 3, 4]  # rho 1: u is linear in sigma
    per_token = draw_training_sigma(segment_ids, 1.0, 10.0, 1.0, True, stratified=True)
    assert sorted(((per_token - 1) / 9 * 12).floor().long().flatten().tolist()) == list(range(12))


def test_score_temperature_and_clamping_change_the_estimate_as_their_formulas_say():
    table = F.normalize(torch.randn(5, 4), dim=-1) * 2
    x, denoised = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    sigma, argmax = torch.tensor([[0.0, 0.5, 3.0]]), torch.tensor([[1, 2, 3]])
    out = Denoising(temperature=0.8).apply(denoised, x, sigma, argmax, table)
    torch.testing.assert_close(out[0, 1:], x[0, 1:] + (denoised[0, 1:] - x[0, 1:]) / 0.8)
    assert torch.equal(out[0, 0], denoised[0, 0])  # held
    out = Denoising(clamp_below=1.0).apply(denoised, x, sigma, argmax, table)
    assert torch.equal(out[0, 1], table[2]) and torch.equal(out[0, 2], denoised[0, 2])
    assert torch.equal(Denoising().apply(denoised, x, sigma, argmax, table), denoised)


def test_sample_py_takes_temperature_and_clamp(memorised_run, capsys):
    import sample
    model_dir, _ = memorised_run
    sample.main(["-mdir", str(model_dir), "-n", "2", "--steps", "6", "--temperature", "0.9", "--clamp", "2",
                 "--jsonl", "--no-progress"])
    assert len(capsys.readouterr().out.splitlines()) == 2
    with pytest.raises(SystemExit):
        sample.parse_args(["-mdir", "x", "--temperature", "0"])
    assert "--temperature 0.0: must be in [0.05, 20]" in capsys.readouterr().err


def test_word_figures_equal_hand_computed_values():
    m = scoring.word_metrics(["a b a", "c"])
    p = [2 / 4, 1 / 4, 1 / 4]
    assert m["word_entropy"] == pytest.approx(-sum(q * math.log(q) for q in p))
    assert m["mean_words"] == 2.0 and m["distinct_words"] == pytest.approx(3 / 4)


def test_the_judge_is_read_per_word_as_well(memorised_ar_run, tmp_path):
    from checkpoint import load_model
    model_dir, lines = memorised_ar_run
    judge, tokenizer, _ = load_model(str(model_dir))
    sequences = [tokenizer.encode(line) for line in lines]
    args = SimpleNamespace(batch_size=2)
    figures = evaluate.judge_figures(scoring.Judge(judge, tokenizer, True), sequences, lines, args, "cpu")
    nats, tokens = scoring.sequence_nll(judge, sequences, 2, tokenizer.pad_id, "cpu")
    words = sum(len(line.split()) + 1 for line in lines)
    assert figures["gen_ppl"] == pytest.approx(math.exp(nats / tokens))
    assert figures["gen_ppl_word"] == pytest.approx(math.exp(nats / words))
    # a judge of another tokenizer scores the texts encoded by its own, whatever ids the evaluated run had
    other = [[tokenizer.bos_id, 7, 7, tokenizer.eos_id]] * len(lines)
    assert evaluate.judge_figures(scoring.Judge(judge, tokenizer, False), other, lines, args, "cpu") == figures
    assert evaluate.judge_figures(scoring.Judge(judge, tokenizer, True), other, lines, args, "cpu") != figures


def test_a_judge_of_another_tokenizer_is_taken_with_a_note(memorised_ar_run, tmp_path, capsys):
    from checkpoint import load_model
    from corpus import Tokenizer, demo_sentences, prepare_corpus
    model_dir, lines = memorised_ar_run
    prepare_corpus(demo_sentences()[:2000], str(tmp_path / "other"), 0.0, 300)
    judge = evaluate.load_judge(str(model_dir), Tokenizer(str(tmp_path / "other" / "bpe.model")), 8, "cpu")
    assert not judge.shared and "another tokenizer" in capsys.readouterr().err
    _, tokenizer, _ = load_model(str(model_dir))
    assert evaluate.load_judge(str(model_dir), tokenizer, 8, "cpu").shared


class FakeClock:
    """A clock that moves `seconds` a reading (every step reads it once)."""

    def __init__(self, seconds):
        self.now, self.seconds = 0.0, seconds

    def __call__(self):
        self.now += self.seconds
        return self.now


def test_a_time_budget_fits_the_schedule_to_the_steps_that_fit_and_a_resume_keeps_its_end(tmp_path, corpus_file,
                                                                                         spm_path, monkeypatch,
                                                                                         capsys):
    monkeypatch.setattr(training, "clock", FakeClock(3.0))  # a step takes 3 s
    run = tmp_path / "run"
    checkpoint = run_train(corpus_file, spm_path, run, "--time_budget", "2", "--log_interval", "1",
                           "--save_interval", "1000", "-wus", "50")
    # 120 s: after the first step and 20 timed ones (63 s), 57 s fit 19 more steps; the schedule ends at step 40
    assert checkpoint["time_budget"]["end_step"] == 40 and checkpoint["step"] == 40
    err = capsys.readouterr().err
    assert "the schedule ends at step 40 (warm-up 4 steps)" in err
    lrs = [json.loads(line)["lr"] for line in open(run / "metrics.jsonl")]
    assert lrs[-1] == pytest.approx(3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 35 / 36))))  # step 39 of 40
    resumed = run_train(corpus_file, spm_path, run, "--time_budget", "2", "--max_steps", "100000")
    assert resumed["step"] == 40 and "--time_budget 2: spent, at step 40; nothing to train" in capsys.readouterr().err
    dropped = run_train(corpus_file, spm_path, run, "--time_budget", "0", "--max_steps", "42")  # 0: no budget
    assert dropped["step"] == 42 and "the run had a --time_budget and now has none" in capsys.readouterr().err
    assert json.load(open(run / "args.json"))["time_budget"] is None


def test_a_run_stops_when_its_budget_is_spent(tmp_path, corpus_file, spm_path, monkeypatch, capsys):
    clock = FakeClock(1.0)
    monkeypatch.setattr(training, "clock", clock)
    real_step = training.optimizer_step

    def slower_after_the_fit(state, args, device, step):
        clock.seconds = 1.0 if step < 25 else 4.0  # the machine slows down after the fit
        return real_step(state, args, device, step)
    monkeypatch.setattr(train, "optimizer_step", slower_after_the_fit)
    checkpoint = run_train(corpus_file, spm_path, tmp_path / "run", "--time_budget", "1", "--log_interval", "100")
    assert checkpoint["time_budget"]["end_step"] == 60  # fitted at 1 s a step
    assert checkpoint["step"] < 60 and checkpoint["time_budget"]["spent"] >= 60
    assert "--time_budget 1: spent at step" in capsys.readouterr().err
    # the steps after the last full log interval (here every step) are logged when the budget ends the run
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [line["step"] for line in lines] == [checkpoint["step"]] and math.isfinite(lines[0]["loss"])


def test_a_run_that_ends_at_its_fitted_step_with_time_left_says_so_when_started_again(tmp_path, corpus_file,
                                                                                      spm_path, monkeypatch, capsys):
    clock = FakeClock(3.0)
    monkeypatch.setattr(training, "clock", clock)
    real_step = training.optimizer_step

    def faster_after_the_fit(state, args, device, step):
        clock.seconds = 3.0 if step < 21 else 2.0  # fitted at 3 s a step (end 40), then 2 s: 19 s are left at the end
        return real_step(state, args, device, step)
    monkeypatch.setattr(train, "optimizer_step", faster_after_the_fit)
    run = tmp_path / "run"
    checkpoint = run_train(corpus_file, spm_path, run, "--time_budget", "2")
    assert checkpoint["step"] == 40 and checkpoint["time_budget"]["spent"] < 120
    capsys.readouterr()
    assert run_train(corpus_file, spm_path, run, "--time_budget", "2")["step"] == 40
    assert "--time_budget 2: the run is at step 40, where the schedule fitted to the budget ends: nothing to train" \
        in capsys.readouterr().err


def test_a_time_budget_says_when_max_steps_caps_its_schedule(tmp_path, corpus_file, spm_path, monkeypatch, capsys):
    monkeypatch.setattr(training, "clock", FakeClock(1.0))  # 60 s fit 60 steps; --max_steps 30 ends the run first
    checkpoint = run_train(corpus_file, spm_path, tmp_path / "run", "--time_budget", "1", "--max_steps", "30")
    assert checkpoint["step"] == 30 and checkpoint["time_budget"]["end_step"] == 60
    assert "the schedule ends at step 30 (--max_steps; the budget fits more)" in capsys.readouterr().err


def test_a_time_budget_refits_its_end_to_a_faster_rate_only_in_the_first_half_of_the_run():
    budget, fits = training.TimeBudget(300.0), {}
    for step in range(1, 1000):  # the first 21 steps take 3 s (the machine busy), then 1 s each
        if budget.record(step, 3.0 if step <= 21 else 1.0):
            fits[step] = budget.end_step
        if step == budget.end_step:
            break
    # at 20 timed steps 237 s fit 79 more at 3 s; at 40 and 80 the latest half's 1 s a step fits the rest; at 160
    # the run is past half of its schedule (129), so its end stays
    assert fits == {21: 100, 41: 258, 81: 258}
    assert budget.spent == pytest.approx(300.0)


def test_data_lengths_are_drawn_in_proportion_to_the_counts_from_each_sample_s_own_seed():
    from sampling import sample_length
    counts = [0, 0, 0, 30, 10, 0, 0, 60]
    draws = [sample_length(counts, 3, i) for i in range(4000)]
    assert set(draws) == {3, 4, 7}
    assert [draws.count(n) / 4000 for n in (3, 4, 7)] == pytest.approx([0.3, 0.1, 0.6], abs=0.03)
    assert draws == [sample_length(counts, 3, i) for i in range(4000)]
    assert draws != [sample_length(counts, 4, i) for i in range(4000)]
    assert {sample_length(counts, 3, i, shortest=5) for i in range(200)} == {7}  # only lengths a prompt leaves room in
    assert sample_length(counts, 3, 0, shortest=9) == 9
    assert sample_length((6, 6), 3, 0) == 6 and 6 <= sample_length((6, 9), 3, 1) <= 9


def test_the_default_length_is_the_data_s_where_the_run_keeps_its_counts():
    from sampling import sample_lengths
    kept = {"sequence_length": 32, "length_counts": [0, 0, 5, 7]}
    earlier = {"sequence_length": 32, "length_counts": None}
    assert sample_lengths(None, kept, "out") == [0, 0, 5, 7] and sample_lengths("data", kept, "out") == [0, 0, 5, 7]
    assert sample_lengths(None, earlier, "out") == (32, 32) and sample_lengths((4, 9), kept, "out") == (4, 9)
    with pytest.raises(UsageError, match="--length data: old keeps no lengths"):
        sample_lengths("data", earlier, "old")


def test_a_run_keeps_its_training_lines_lengths_and_samples_draw_them(memorised_run, capsys):
    import sample
    from checkpoint import load_model
    model_dir, lines = memorised_run
    _, tokenizer, sampling = load_model(str(model_dir))
    lengths = [len(tokenizer.encode(line)) for line in lines]
    assert sampling["length_counts"] == [lengths.count(n) for n in range(sampling["sequence_length"] + 1)]
    sample.main(["-mdir", str(model_dir), "-n", "12", "--steps", "4", "--jsonl", "--no-progress"])
    drawn = [len(json.loads(line)["ids"]) for line in capsys.readouterr().out.splitlines()]
    assert set(drawn) <= set(lengths) and len(drawn) == 12
    sample.main(["-mdir", str(model_dir), "-n", "2", "--steps", "4", "--jsonl", "--no-progress", "--length", "20"])
    assert [len(json.loads(line)["ids"]) for line in capsys.readouterr().out.splitlines()] == [20, 20]
