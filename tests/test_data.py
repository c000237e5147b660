import random

import pytest
import sentencepiece as spm

from data import (LineDataset, PackedBatches, Tokenizer, collate_rows, conditioning_mask, crop_or_expand,
                  first_fit_decreasing, line_offsets)
from utils import UsageError


def test_tokenizer_reads_special_ids_and_decodes_up_to_eos(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id) == (0, 1, 2, 3)
    ids = tokenizer.encode("a tangible entity")
    assert ids[0] == 0 and ids[-1] == 1
    assert tokenizer.decode(ids + [2, 2, 57, 1]) == "a tangible entity"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([0, 8000])


def test_tokenizer_trained_with_default_ids_is_refused(tmp_path, wordnet_lines):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(wordnet_lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "default"), vocab_size=300,
                                   minloglevel=2)
    with pytest.raises(UsageError, match=r"default\.model: the tokenizer has no pad id"):
        Tokenizer(str(tmp_path / "default.model"))
    with pytest.raises(UsageError, match="no SentencePiece model"):
        Tokenizer(str(tmp_path / "missing.model"))


def test_line_offsets_skip_blank_lines_and_keep_a_last_line_without_newline(tmp_path, tokenizer):
    path = tmp_path / "c.txt"
    path.write_bytes(b"\xef\xbb\xbfone thing\r\n\r\n   \nanother thing\n\nlast thing")
    assert len(line_offsets(str(path))) == 3
    dataset = LineDataset(str(path), tokenizer)
    assert [dataset.text(i) for i in range(3)] == ["one thing", "another thing", "last thing"]
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(UsageError, match="blank.txt: no non-blank line"):
        line_offsets(str(tmp_path / "blank.txt"))
    with pytest.raises(UsageError, match="is a directory"):
        line_offsets(str(tmp_path))


def test_crop_and_expand():
    rng = random.Random(0)
    ids, real = crop_or_expand(list(range(100)), 10, -1, 1.0, rng)
    assert len(ids) == 10 and real == 10 and ids == list(range(ids[0], ids[0] + 10))
    lengths = set()
    for _ in range(200):
        ids, real = crop_or_expand([5, 6, 7], 10, -1, 1.0, rng)
        assert ids[:3] == [5, 6, 7] and set(ids[3:]) <= {-1} and real == 3 and len(ids) <= 10
        lengths.add(len(ids))
    assert lengths == set(range(3, 11))
    assert crop_or_expand([5, 6, 7], 10, -1, 0.0, rng) == ([5, 6, 7], 3)


def test_conditioning_masks_never_cover_every_real_token():
    rng = random.Random(0)
    spans, scattered = 0, 0
    for _ in range(2000):
        length = rng.randint(1, 12)
        real = rng.randint(1, length)
        mask = conditioning_mask(length, real, rng)
        assert len(mask) == length and not all(mask[:real])
        held = [i for i, m in enumerate(mask) if m]
        if len(held) > 1:
            contiguous = held == list(range(held[0], held[-1] + 1))
            spans += contiguous
            scattered += not contiguous
    assert spans > 100 and scattered > 100  # both shapes are drawn


def test_first_fit_decreasing_places_every_item_once():
    lengths = [9, 3, 7, 2, 5, 5, 1, 8, 4]
    rows, leftover = first_fit_decreasing(lengths, 3, 10)
    placed = sorted(i for row in rows for i in row) + leftover
    assert sorted(placed) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert rows[0] == [0, 6]  # 9, then the 1 that fits beside it


def test_collate_rows_segments_and_fill():
    batch = collate_rows([[([0, 5, 1], [True, False, False]), ([0, 6, 1], [False, False, True])], []], 8, 2)
    assert batch["ids"].tolist() == [[0, 5, 1, 0, 6, 1, 2, 2], [2] * 8]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 2, 0, 0], [0] * 8]
    assert batch["cond_mask"][0].tolist() == [True, False, False, False, False, True, False, False]


def test_packed_batches_are_dense_and_resume_exactly(corpus_file, tokenizer):
    dataset = LineDataset(corpus_file, tokenizer)
    loader = PackedBatches(dataset, 8, 64, tokenizer.pad_id, seed=3, expand_prob=0.0)
    batches = [next(loader) for _ in range(6)]
    for batch in batches:
        assert batch["ids"].shape == (8, 64)
        assert (batch["segment_ids"] > 0).float().mean() > 0.9
        starts = batch["ids"][batch["segment_ids"] > 0]
        assert (starts == tokenizer.bos_id).sum() == batch["segment_ids"].max(dim=1).values.sum()
    loader = PackedBatches(dataset, 8, 64, tokenizer.pad_id, seed=3, expand_prob=0.0)
    for _ in range(3):
        next(loader)
    resumed = PackedBatches(dataset, 8, 64, tokenizer.pad_id, seed=3, expand_prob=0.0)
    resumed.load_state_dict(loader.state_dict())
    for expected in batches[3:]:
        got = next(resumed)
        assert all((got[k] == expected[k]).all() for k in expected)


def test_corpus_problems_are_found_before_training_with_their_line(tmp_path, tokenizer):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\n\nanother\nbroken \xff byte\n")
    with pytest.raises(UsageError, match=r"bad.txt:4: not UTF-8"):
        line_offsets(str(bad))
    old_mac = tmp_path / "cr.txt"
    old_mac.write_bytes(b"one\rtwo\rthree\r")
    with pytest.raises(UsageError, match=r"cr.txt:1: carriage return inside a line"):
        line_offsets(str(old_mac))
    invisible = tmp_path / "invisible.txt"
    invisible.write_text("\ufeff\nreal line\n\u00a0\u00a0\n \t\nlast\n", encoding="utf-8")
    dataset = LineDataset(str(invisible), tokenizer)
    assert [dataset.text(i) for i in range(len(dataset))] == ["real line", "last"]


def test_resuming_the_data_stream_on_another_corpus_is_refused(tmp_path, corpus_file, tokenizer):
    loader = PackedBatches(LineDataset(corpus_file, tokenizer), 4, 32, tokenizer.pad_id)
    next(loader)
    smaller = tmp_path / "smaller.txt"
    smaller.write_text("one line\nanother line\n")
    other = PackedBatches(LineDataset(str(smaller), tokenizer), 4, 32, tokenizer.pad_id)
    with pytest.raises(UsageError, match="has 2 examples, the run was started on 400"):
        other.load_state_dict(loader.state_dict())
