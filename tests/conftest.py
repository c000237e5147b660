import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
WORDNET = os.path.join(ROOT, "..", "shared", "data", "wordnet")

from data import Tokenizer  # noqa: E402
from model import ModelConfig, ScoreLM  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def token_cache_home(tmp_path_factory):
    """Corpus caches go to a temporary folder, never to the user's ~/.cache."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))


@pytest.fixture(scope="session")
def spm_path():
    path = os.path.join(WORDNET, "bpe.model")
    if not os.path.isfile(path):
        pytest.skip(f"shared corpus missing: {path}")
    return path


@pytest.fixture(scope="session")
def tokenizer(spm_path):
    return Tokenizer(spm_path)


@pytest.fixture(scope="session")
def wordnet_lines():
    """The first 400 lines of the shared WordNet training corpus."""
    path = os.path.join(WORDNET, "train.txt")
    if not os.path.isfile(path):
        pytest.skip(f"shared corpus missing: {path}")
    with open(path, encoding="utf-8") as f:
        return [next(f).strip() for _ in range(400)]


@pytest.fixture
def corpus_file(tmp_path, wordnet_lines):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(wordnet_lines) + "\n", encoding="utf-8")
    return str(path)


def small_model(vocab_size=8000, seed=0, **kwargs):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, embedding_dim=16, model_dim=32, num_layers=2, num_heads=2,
               fourier_dim=16, time_dim=32)
    cfg.update(kwargs)
    return ScoreLM(ModelConfig(**cfg))


TINY = ["-dim", "32", "-nl", "2", "-nh", "2", "-emb", "16", "-bsz", "4", "-slen", "32", "-lr", "3e-3", "-wus", "2",
        "--log_interval", "2", "--sample_interval", "0", "--no-progress", "--seed", "1"]


def run_train(corpus, spm, model_dir, *extra):
    """train.py on `corpus` with the TINY flags and `extra`; returns the final checkpoint."""
    import train
    train.main(["-d", corpus, "-spm", spm, "-mdir", str(model_dir), *TINY, *extra])
    return torch.load(os.path.join(model_dir, "ckpt.pt"), weights_only=True)


def train_on_four_lines(tmp_path_factory, wordnet_lines, spm_path, name, *flags):
    """A run of train.py on the first four WordNet lines with `flags`: (run folder, the four lines)."""
    lines = wordnet_lines[:4]
    folder = tmp_path_factory.mktemp(name)
    corpus = folder / "four.txt"
    corpus.write_text("\n".join(lines) + "\n")
    run_train(str(corpus), spm_path, folder / "run", "-dim", "64", "-lr", "5e-3", "--log_interval", "20", "-ema", "",
              *flags)
    return folder / "run", lines


@pytest.fixture(scope="session")
def memorised_run(tmp_path_factory, wordnet_lines, spm_path):
    """A tiny model trained to memorise four WordNet lines (about 8 s): (run folder, the four lines)."""
    return train_on_four_lines(tmp_path_factory, wordnet_lines, spm_path, "memorised", "--max_steps", "400", "-smax",
                               "5", "--expand_prob", "0.5")


@pytest.fixture(scope="session")
def memorised_ar_run(tmp_path_factory, wordnet_lines, spm_path):
    """The autoregressive baseline trained on the same four lines (about 5 s): (run folder, the four lines)."""
    return train_on_four_lines(tmp_path_factory, wordnet_lines, spm_path, "memorised_ar", "--objective", "ar",
                               "--max_steps", "200")
