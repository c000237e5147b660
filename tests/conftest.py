"""Fixtures shared by the tests. Every corpus and tokenizer is built here, from nothing outside the repository: the
demo corpus (English sentences from this Python's standard-library docstrings) and a tokenizer trained on it."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

from corpus import Tokenizer, demo_sentences, prepare_corpus  # noqa: E402
from diffusion import Grid, ScheduleState, advance, denoiser_logits, score_interpolation  # noqa: E402
from model import ModelConfig, ScoreLM  # noqa: E402
import utils  # noqa: E402

torch.set_num_threads(2)
VOCAB_SIZE = 2000  # the demo's tokenizer


@pytest.fixture(scope="session", autouse=True)
def token_cache_home(tmp_path_factory):
    """Corpus caches go to a temporary folder, never to the user's ~/.cache."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))


NATIVE_BF16 = utils.native_bf16  # the real check, for the tests of it


@pytest.fixture(scope="session", autouse=True)
def auto_precision_is_fp32():
    """--precision auto resolves to fp32 in every test, on every CPU: what a run computes (and so every figure the
    tests assert) does not then depend on whether this CPU has bf16 instructions. Tests of bf16 ask for it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utils, "native_bf16", lambda device: False)
        yield


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """The demo corpus split into train.txt and valid.txt, with bpe.model (2,000 pieces) trained on it, in a
    folder of its own (about 5 s, once a session)."""
    folder = tmp_path_factory.mktemp("demo_corpus")
    prepare_corpus(demo_sentences(), str(folder), valid_fraction=0.02, vocab_size=VOCAB_SIZE)
    return folder


@pytest.fixture(scope="session")
def spm_path(demo_corpus):
    return str(demo_corpus / "bpe.model")


@pytest.fixture(scope="session")
def tokenizer(spm_path):
    return Tokenizer(spm_path)


@pytest.fixture(scope="session")
def corpus_lines(demo_corpus):
    """The first 400 lines of the demo corpus's train split."""
    with open(demo_corpus / "train.txt", encoding="utf-8") as f:
        return [next(f).strip() for _ in range(400)]


@pytest.fixture(scope="session")
def four_lines(corpus_lines, tokenizer):
    """Four short lines of the corpus (6 to 14 tokens with bos and eos), distinct, for the runs that memorise them."""
    lines = list(dict.fromkeys(line for line in corpus_lines if 6 <= len(tokenizer.encode(line)) <= 14))[:4]
    assert len(lines) == 4, "the demo corpus has too few short lines"
    return lines


@pytest.fixture
def corpus_file(tmp_path, corpus_lines):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus_lines) + "\n", encoding="utf-8")
    return str(path)


def small_model(vocab_size=8000, seed=0, **kwargs):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, embedding_dim=16, model_dim=32, num_layers=2, num_heads=2,
               fourier_dim=16, time_dim=32)
    cfg.update(kwargs)
    return ScoreLM(ModelConfig(**cfg))


def denoise(model, x, sigma, segment_ids=None):
    """The denoiser D(x; sigma) by score interpolation: x (B, L, E), sigma (B, L) -> (B, L, E), x where sigma = 0."""
    probs = denoiser_logits(model, x, sigma, segment_ids).softmax(dim=-1)
    return score_interpolation(probs, x, sigma, model.embedding_table())


def schedule_sigmas(schedule, cond_mask, steps, sigma_min, sigma_max, rho, warp=None):
    """The levels (steps + 1, B, L) float32 that `schedule` gives a batch step by step, as generate() walks them:
    sigma_max on free positions at first, sigma_min at index steps - 1 (for steps >= 2), then 0; 0 throughout on
    conditioned ones. For a schedule that reads predictions (confidence), the levels when none turns confident.
    Raises ValueError if steps < 1."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    grid, state = Grid(sigma_min, sigma_max, rho, warp), ScheduleState.start(cond_mask)
    levels = [grid.sigma(state.t, state.free)]
    for i in range(1, steps):
        state.t, state.u = advance(schedule, i / (steps - 1), state), i / (steps - 1)
        levels.append(grid.sigma(state.t, state.free))
    return torch.stack(levels + [torch.zeros_like(levels[0])])


TINY = ["-dim", "32", "-nl", "2", "-nh", "2", "-emb", "16", "-bsz", "4", "-slen", "32", "-lr", "3e-3", "-wus", "2",
        "--log_interval", "2", "--sample_interval", "0", "--no-progress", "--seed", "1", "--precision", "fp32"]


def run_train(corpus, spm, model_dir, *extra):
    """train.py on `corpus` with the TINY flags and `extra`; returns the final checkpoint."""
    import train
    train.main(["-d", corpus, "-spm", spm, "-mdir", str(model_dir), *TINY, *extra])
    return torch.load(os.path.join(model_dir, "ckpt.pt"), weights_only=True)


def train_on_four_lines(tmp_path_factory, four_lines, spm_path, name, *flags):
    """A run of train.py on the four short lines with `flags`: (run folder, the four lines)."""
    folder = tmp_path_factory.mktemp(name)
    corpus = folder / "four.txt"
    corpus.write_text("\n".join(four_lines) + "\n")
    run_train(str(corpus), spm_path, folder / "run", "-dim", "64", "-lr", "5e-3", "--log_interval", "20", "-ema", "",
              *flags)
    return folder / "run", four_lines


@pytest.fixture(scope="session")
def memorised_run(tmp_path_factory, four_lines, spm_path):
    """A tiny model trained to memorise four lines (about 8 s): (run folder, the four lines)."""
    # the original recipe (every example conditioned, no output prior, per-token levels on half the batches), whose
    # losses and samples the tests know
    return train_on_four_lines(tmp_path_factory, four_lines, spm_path, "memorised", "--max_steps", "400", "-smax",
                               "5", "--expand_prob", "0.5", "--cond_prob", "1", "--no-output_prior",
                               "--embedding_lr_scale", "1", "--multilevel_prob", "0.5")


@pytest.fixture(scope="session")
def memorised_ar_run(tmp_path_factory, four_lines, spm_path):
    """The autoregressive baseline trained on the same four lines (about 5 s): (run folder, the four lines)."""
    return train_on_four_lines(tmp_path_factory, four_lines, spm_path, "memorised_ar", "--objective", "ar",
                               "--max_steps", "200")
