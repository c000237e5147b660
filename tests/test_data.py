import os
import random
import socket

import numpy as np
import pytest
import sentencepiece as spm

import corpus as corpus_module
from corpus import Tokenizer, load_corpus, prepare_corpus, read_lines
from data import (PackedBatches, PackedRows, collate_rows, conditioning_mask, example_window, fullest_subset,
                  minimum_bin_slack)
from utils import UsageError


def packed_rows(cache, tokenizer, seq_len=64, **kwargs):
    return PackedRows(cache, seq_len, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, **kwargs)


def write(path, raw):
    path.write_bytes(raw)
    return str(path)


def test_tokenizer_reads_special_ids_and_decodes_up_to_eos(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id) == (0, 1, 2, 3)
    ids = tokenizer.encode("a tangible entity")
    assert ids[0] == 0 and ids[-1] == 1
    assert tokenizer.decode(ids + [2, 2, 57, 1]) == "a tangible entity"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([0, tokenizer.vocab_size])


def test_tokenizer_trained_with_default_ids_or_unreadable_is_refused(tmp_path, corpus_lines):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(corpus_lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "default"), vocab_size=300,
                                   minloglevel=2)
    with pytest.raises(UsageError, match=r"default\.model: the tokenizer has no pad id"):
        Tokenizer(str(tmp_path / "default.model"))
    with pytest.raises(UsageError, match="missing.model: no SentencePiece model"):
        Tokenizer(str(tmp_path / "missing.model"))
    with pytest.raises(UsageError, match="garbage.model: not a readable SentencePiece model"):
        Tokenizer(write(tmp_path / "garbage.model", b"\x00 not a model \xff" * 10))


# Corpus cache

def test_cache_holds_exactly_what_direct_tokenisation_gives(tmp_path, corpus_file, corpus_lines, tokenizer):
    cache = load_corpus(corpus_file, tokenizer, str(tmp_path / "cache"), progress=False)
    assert len(cache) == len(corpus_lines) == cache.meta["lines"]
    assert cache.meta["dtype"] == "uint16"
    for i, line in enumerate(corpus_lines):
        assert cache.ids(i).tolist() == tokenizer.encode(line, bos=False, eos=False)
    assert sum(cache.length(i) for i in range(len(cache))) == cache.meta["tokens"]


def test_length_counts_count_each_line_with_bos_and_eos_and_longer_ones_at_the_row_length(tmp_path, corpus_file,
                                                                                         corpus_lines, tokenizer):
    cache = load_corpus(corpus_file, tokenizer, str(tmp_path / "cache"), progress=False)
    lengths = [len(tokenizer.encode(line)) for line in corpus_lines]  # bos and eos included
    seq_len = sorted(lengths)[len(lengths) // 2]  # about half of the lines are longer than the row
    counts = cache.length_counts(seq_len)
    assert len(counts) == seq_len + 1 and sum(counts) == len(corpus_lines)
    assert counts[seq_len] == sum(n >= seq_len for n in lengths)
    assert all(counts[n] == lengths.count(n) for n in range(seq_len))


def test_cache_built_over_processes_equals_one_built_in_one(tmp_path, corpus_file, tokenizer, monkeypatch):
    one = load_corpus(corpus_file, tokenizer, str(tmp_path / "one"), progress=False, num_proc=1)
    monkeypatch.setattr(corpus_module, "SPAN_BYTES", 997)  # many ranges, most starting inside a line
    many = load_corpus(corpus_file, tokenizer, str(tmp_path / "many"), progress=False, num_proc=2)
    assert len(many) == len(one)
    assert [many.length(i) for i in range(len(many))] == [one.length(i) for i in range(len(one))]
    assert all((many.ids(i) == one.ids(i)).all() for i in range(len(one)))


def test_cache_is_reused_when_unchanged_and_rebuilt_when_corpus_or_tokenizer_change(tmp_path, corpus_file,
                                                                                   corpus_lines, tokenizer,
                                                                                   monkeypatch):
    cache_dir = str(tmp_path / "cache")
    first = load_corpus(corpus_file, tokenizer, cache_dir, progress=False)
    builds = []
    real_build = corpus_module.build_cache
    monkeypatch.setattr(corpus_module, "build_cache", lambda *a, **k: builds.append(a[0]) or real_build(*a, **k))
    assert load_corpus(corpus_file, tokenizer, cache_dir, progress=False).prefix == first.prefix
    assert builds == []
    prepare_corpus(corpus_lines, str(tmp_path / "other"), 0.0, 300)  # another tokenizer for the same corpus
    another = Tokenizer(str(tmp_path / "other" / "bpe.model"))
    other = load_corpus(corpus_file, another, cache_dir, progress=False)
    assert other.prefix != first.prefix and len(builds) == 1
    assert other.ids(0).tolist() == another.encode(corpus_lines[0], False, False) != first.ids(0).tolist()
    with open(corpus_file, "a") as f:
        f.write("one more line\n")
    changed = load_corpus(corpus_file, tokenizer, cache_dir, progress=False)
    assert changed.prefix != first.prefix and len(changed) == len(first) + 1
    assert changed.ids(len(first)).tolist() == tokenizer.encode("one more line", False, False)


def test_blank_lines_crlf_bom_and_a_last_line_without_newline(tmp_path, tokenizer):
    path = write(tmp_path / "c.txt", b"\xef\xbb\xbfone thing\r\n\r\n   \nanother thing\n\t\n\xc2\xa0\xc2\xa0\n"
                                     b"\xef\xbb\xbf\nlast thing")
    cache = load_corpus(path, tokenizer, str(tmp_path / "cache"), progress=False)
    assert cache.meta["lines"] == 8 and len(cache) == 3
    expected = [tokenizer.encode(t, False, False) for t in ("one thing", "another thing", "last thing")]
    assert [cache.ids(i).tolist() for i in range(3)] == expected
    trailing = write(tmp_path / "t.txt", b"only line\n\n \n")
    assert len(load_corpus(trailing, tokenizer, str(tmp_path / "cache"), progress=False)) == 1


def test_invalid_utf8_is_reported_with_its_line_or_replaced(tmp_path, tokenizer, monkeypatch):
    lines = [f"line number {i}".encode() for i in range(40)]
    lines[29] = b"broken \xff byte"
    path = write(tmp_path / "bad.txt", b"\n".join(lines) + b"\n")
    monkeypatch.setattr(corpus_module, "SPAN_BYTES", 64)  # the bad line is in a later range: numbering must carry over
    with pytest.raises(UsageError, match=r"bad.txt:30: not UTF-8 \(invalid start byte at byte 7 of the line\)"):
        load_corpus(path, tokenizer, str(tmp_path / "cache"), progress=False, num_proc=2)
    assert os.listdir(tmp_path / "cache") == []  # nothing half-built is left
    cache = load_corpus(path, tokenizer, str(tmp_path / "cache"), "replace", progress=False)
    assert len(cache) == 40 and cache.ids(29).tolist() == tokenizer.encode("broken \ufffd byte", False, False)


def test_carriage_return_inside_a_line_is_an_error_unless_replacing(tmp_path, tokenizer):
    path = write(tmp_path / "cr.txt", b"first\nold\rmac\rends\n")
    with pytest.raises(UsageError, match=r"cr.txt:2: carriage return inside a line"):
        load_corpus(path, tokenizer, str(tmp_path / "cache"), progress=False)
    cache = load_corpus(path, tokenizer, str(tmp_path / "cache"), "replace", progress=False)
    assert cache.ids(1).tolist() == tokenizer.encode("old mac ends", False, False)


@pytest.mark.parametrize("name, content, message", [
    ("blank.txt", b"\n  \n\xc2\xa0\n", r"blank.txt: no line with text to train on \(3 lines"),
    ("empty.txt", b"", r"empty.txt: no line with text to train on \(0 lines"),
    ("dropped.txt", "\u200b\n\x01\n".encode(), "dropped.txt: no line with text"),  # the tokenizer drops both
    ("missing.txt", None, "missing.txt: no such file"),
    ("folder", "dir", "folder: is a directory"),
    ("pipe", "fifo", "pipe: not a regular file"),
])
def test_unusable_corpora_are_refused_naming_the_path(tmp_path, tokenizer, name, content, message):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content == "fifo":
        os.mkfifo(path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        load_corpus(str(path), tokenizer, str(tmp_path / "cache"), progress=False)


def test_held_out_lines_that_are_not_a_file_are_refused_naming_the_flag(tmp_path, tokenizer):
    with pytest.raises(UsageError, match=f"--valid {tmp_path}: is a folder, not a file"):
        read_lines(str(tmp_path), tokenizer, 32, -1)
    with pytest.raises(UsageError, match="--probe_lines .*none.txt: no such file"):
        read_lines(str(tmp_path / "none.txt"), tokenizer, 32, -1, "--probe_lines")


def test_lines_the_tokenizer_drops_are_not_examples(tmp_path, tokenizer):
    path = write(tmp_path / "c.txt", "first line\n\u200b\nsecond line\n".encode())
    cache = load_corpus(path, tokenizer, str(tmp_path / "cache"), progress=False)
    assert cache.meta["lines"] == 3 and len(cache) == 2
    assert cache.ids(1).tolist() == tokenizer.encode("second line", False, False)


def test_unwritable_cache_folder_is_named(tmp_path, corpus_file, tokenizer):
    blocker = write(tmp_path / "file", b"x")
    with pytest.raises(UsageError, match=r"--cache_dir .*file/cache: Not a directory"):
        load_corpus(corpus_file, tokenizer, os.path.join(blocker, "cache"), progress=False)


@pytest.mark.parametrize("damage", ["delete ids", "cut ids", "cut offsets", "bad json", "wrong end offset"])
def test_a_damaged_cache_is_rebuilt_not_read(tmp_path, corpus_file, corpus_lines, tokenizer, damage):
    cache_dir = str(tmp_path / "cache")
    prefix = load_corpus(corpus_file, tokenizer, cache_dir, progress=False).prefix
    target = prefix + (".offsets" if "offsets" in damage else ".json" if "json" in damage else ".ids")
    if damage == "delete ids":
        os.remove(target)
    elif damage == "bad json":
        write(tmp_path / target, b"{not json")
    elif damage == "wrong end offset":
        target = prefix + ".offsets"
        offsets = np.fromfile(target, dtype=np.int64)
        offsets[-1] -= 1
        offsets.tofile(target)
    else:
        os.truncate(target, os.path.getsize(target) - 3)
    cache = load_corpus(corpus_file, tokenizer, cache_dir, progress=False)
    assert cache.prefix == prefix and len(cache) == 400
    assert cache.ids(399).tolist() == tokenizer.encode(corpus_lines[399], False, False)


def test_files_of_a_killed_build_are_removed_at_the_next_build(tmp_path, corpus_file, tokenizer):
    cache_dir = tmp_path / "cache"
    prefix = load_corpus(corpus_file, tokenizer, str(cache_dir), progress=False).prefix
    for suffix in (".json", ".ids", ".offsets"):
        os.remove(prefix + suffix)
    dead, alive, host = 2 ** 22 + 1, os.getppid(), socket.gethostname()  # pid_max is at most 2**22; our parent
    name, old = os.path.basename(prefix), "corpus.txt.0123456789abcdef"
    stale = [f"{name}.{dead}@{host}.tmp.ids", f"{old}.{dead}@{host}.tmp.offsets"]
    kept = [f"{name}.{alive}@{host}.tmp.ids", f"{old}.{dead}@other-host.tmp.ids"]
    for name in stale + kept:  # an older version of the corpus (another key) counts too; another host's do not
        write(cache_dir / name, b"half")
    load_corpus(corpus_file, tokenizer, str(cache_dir), progress=False)
    assert sorted(name for name in os.listdir(cache_dir) if ".tmp." in name) == sorted(kept)


# Examples: crops, expansion, conditioning

def test_example_windows_crop_and_expand():
    rng = random.Random(0)
    starts, lengths = set(), set()
    for _ in range(300):
        start, stop, padded = example_window(100, 10, 1.0, rng)
        assert stop - start == padded == 10 and 0 <= start <= 90
        starts.add(start)
        start, stop, padded = example_window(3, 10, 1.0, rng)
        assert (start, stop) == (0, 3) and 3 <= padded <= 10
        lengths.add(padded)
    assert len(starts) > 50 and lengths == set(range(3, 11))
    assert example_window(3, 10, 0.0, rng) == (0, 3, 3)


def test_a_giant_line_is_cropped_to_a_window_of_its_tokens(tmp_path, tokenizer):
    words = " ".join(f"word{i}" for i in range(20_000))  # about 130,000 characters
    path = write(tmp_path / "giant.txt", f"short line\n{words}\n".encode())
    cache = load_corpus(path, tokenizer, str(tmp_path / "cache"), progress=False)
    full = [tokenizer.bos_id] + tokenizer.encode(words, False, False) + [tokenizer.eos_id]
    rows = packed_rows(cache, tokenizer, 64, expand_prob=0.0)
    for epoch in range(20):
        ids, mask = rows.example(epoch, 1)
        assert len(ids) == len(mask) == 64
        start = next(s for s in range(len(full) - 63) if full[s:s + 64] == ids.tolist())
        assert (ids[0] == tokenizer.bos_id) == (start == 0)
    assert rows.example(0, 0)[0].tolist() == tokenizer.encode("short line")


def test_expanded_examples_pad_after_eos(corpus_file, tokenizer, tmp_path):
    cache = load_corpus(corpus_file, tokenizer, str(tmp_path / "cache"), progress=False)
    rows = packed_rows(cache, tokenizer, 64, expand_prob=1.0)
    expanded = 0
    for i in range(50):
        ids, mask = rows.example(0, i)
        text = [tokenizer.bos_id] + cache.ids(i).tolist() + [tokenizer.eos_id]
        assert ids[:len(text)].tolist() == text and set(ids[len(text):].tolist()) <= {tokenizer.pad_id}
        assert not mask[:len(text)].all()
        expanded += len(ids) > len(text)
    assert expanded > 30


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


# Packing

def test_fullest_subset_finds_the_best_sum_within_the_counts():
    assert sorted(fullest_subset(10, {6: 1, 3: 2, 2: 2})) == [2, 2, 6]  # greedy 6 + 3 = 9 misses 10
    assert fullest_subset(10, {4: 3, 3: 1}) == [4, 4]  # 8: no subset makes 9 or 10
    assert fullest_subset(5, {6: 3}) == []
    assert sum(fullest_subset(64, {7: 9})) == 63


def test_minimum_bin_slack_places_every_item_once_in_fewer_rows_than_best_fit():
    lengths = [6, 3, 3, 2, 2, 2, 2]  # best-fit decreasing needs 3 rows: 6+3, 3+2+2+2, 2
    rows = minimum_bin_slack(lengths, 10)
    assert sorted(sorted(lengths[i] for i in row) for row in rows) == [[2, 2, 3, 3], [2, 2, 6]]
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert len(rows) == 2 and all(sum(lengths[i] for i in row) == 10 for row in rows)
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 200))]
        rows = minimum_bin_slack(lengths, 64)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
        assert len(rows) >= max(-(-sum(lengths) // 64), sum(n > 32 for n in lengths))  # no packer beats this bound
    assert minimum_bin_slack(lengths, 64) == rows  # deterministic


def test_collate_rows_segments_and_fill():
    batch = collate_rows([[(np.array([0, 5, 1]), np.array([True, False, False])),
                           (np.array([0, 6, 1]), np.array([False, False, True]))], []], 8, 2)
    assert batch["ids"].tolist() == [[0, 5, 1, 0, 6, 1, 2, 2], [2] * 8]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 2, 0, 0], [0] * 8]
    assert batch["cond_mask"][0].tolist() == [True, False, False, False, False, True, False, False]


def test_every_example_is_placed_once_per_epoch_in_rows_that_fit(corpus_file, tokenizer, tmp_path):
    cache = load_corpus(corpus_file, tokenizer, str(tmp_path / "cache"), progress=False)
    rows = packed_rows(cache, tokenizer, 32, seed=5, expand_prob=0.5, buffer_size=64)
    assert rows.chunks_per_epoch == 7  # 400 examples in chunks of 64
    for epoch in range(2):
        placed = []
        for g in range(epoch * 7, (epoch + 1) * 7):
            chunk = rows.chunk_rows(g)
            assert all(sum(len(ids) for _, ids, _ in row) <= 32 for row in chunk)
            placed += [i for row in chunk for i, _, _ in row]
            batch = rows.chunk_batch(g)
            segments = batch["segment_ids"]
            fill = segments == 0
            assert (batch["ids"][fill] == tokenizer.pad_id).all() and not batch["cond_mask"][fill].any()
            assert segments.max(dim=1).values.tolist() == [len(row) for row in chunk]
            for r, row in enumerate(chunk):  # segment k of row r holds exactly the k-th example, in order
                flat = np.concatenate([ids for _, ids, _ in row])
                assert batch["ids"][r, :len(flat)].tolist() == flat.tolist()
                assert (segments[r, :len(flat)] > 0).all() and (segments[r, len(flat):] == 0).all()
        assert sorted(placed) == list(range(400))
    assert rows.chunk_rows(0) != rows.chunk_rows(7)  # another epoch, another order


def test_rows_of_the_demo_corpus_are_packed_almost_full(tmp_path, demo_corpus, tokenizer):
    # lines of about 22 tokens, up to 169, in rows of 64: next-fit in corpus order fills 80% of the slots, so a
    # packer that gives up on filling rows fails here (RESULTS.md has WordNet's and KJV's figures, bench.py data)
    cache = load_corpus(str(demo_corpus / "train.txt"), tokenizer, str(tmp_path / "cache"), progress=False)
    batches = PackedBatches(packed_rows(cache, tokenizer, 64, expand_prob=0.0), 128)
    real = slots = 0
    for _ in range(20):
        batch = next(batches)
        real += int(((batch["segment_ids"] > 0) & (batch["ids"] != tokenizer.pad_id)).sum())
        slots += batch["ids"].numel()
    assert real / slots >= 0.99


# Loader

def take(batches, n):
    return [next(batches) for _ in range(n)]


def same(a, b):
    return all(x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x) for x, y in zip(a, b))


def test_workers_give_the_same_batches_as_the_main_process(corpus_file, tokenizer, tmp_path):
    cache = load_corpus(corpus_file, tokenizer, str(tmp_path / "cache"), progress=False)
    streams = [PackedBatches(packed_rows(cache, tokenizer, 32, seed=2, buffer_size=64), 8, workers)
               for workers in (0, 2)]
    main, workers = take(streams[0], 40), take(streams[1], 40)  # 40 batches cross several chunks and an epoch
    assert streams[0].chunk > 7 and same(main, workers)


def test_resuming_mid_epoch_continues_instead_of_replaying(corpus_file, tokenizer, tmp_path):
    cache = load_corpus(corpus_file, tokenizer, str(tmp_path / "cache"), progress=False)
    make = lambda: PackedBatches(packed_rows(cache, tokenizer, 32, seed=2, expand_prob=0.0, buffer_size=64), 8, 1)
    straight = take(make(), 30)
    first = make()
    take(first, 13)
    state = first.state_dict()
    assert state["row"] > 0 and state["chunk"] < 7  # stopped inside a chunk, inside epoch 0
    resumed = make()
    resumed.load_state_dict(state)
    assert same(take(resumed, 17), straight[13:])  # a replay would start again at chunk 0, row 0


def test_resuming_on_another_corpus_or_row_length_is_refused(tmp_path, corpus_file, tokenizer):
    cache = load_corpus(corpus_file, tokenizer, str(tmp_path / "cache"), progress=False)
    batches = PackedBatches(packed_rows(cache, tokenizer, 32), 4)
    next(batches)
    smaller = load_corpus(write(tmp_path / "smaller.txt", b"one line\nanother line\n"), tokenizer,
                          str(tmp_path / "cache"), progress=False)
    with pytest.raises(UsageError, match=f"has 2 examples and 4 tokens, the run was started on 400 and "
                                         f"{cache.meta['tokens']:,}"):
        PackedBatches(packed_rows(smaller, tokenizer, 32), 4).load_state_dict(batches.state_dict())
    with pytest.raises(UsageError, match="-slen/--sequence_length 64: the run was started with 32"):
        PackedBatches(packed_rows(cache, tokenizer, 64), 4).load_state_dict(batches.state_dict())
    lines = open(corpus_file).read().splitlines()
    lines[0], lines[1] = lines[0] + " more", "the"
    same_count = load_corpus(write(tmp_path / "other.txt", "\n".join(lines).encode()), tokenizer,
                             str(tmp_path / "cache"), progress=False)
    with pytest.raises(UsageError, match="resuming needs the same corpus"):
        PackedBatches(packed_rows(same_count, tokenizer, 32), 4).load_state_dict(batches.state_dict())
    old = {k: v for k, v in batches.state_dict().items() if k != "num_tokens"}  # saved before the counts were kept
    with pytest.raises(UsageError, match="^run/ckpt.pt: its data position is from an older version"):
        PackedBatches(packed_rows(cache, tokenizer, 32), 4).load_state_dict(old, "run/ckpt.pt")


def test_a_changed_expand_prob_resumes_at_the_next_chunk(tmp_path, corpus_file, tokenizer):
    cache = load_corpus(corpus_file, tokenizer, str(tmp_path / "cache"), progress=False)
    batches = PackedBatches(packed_rows(cache, tokenizer, 32, expand_prob=0.5, buffer_size=64), 4)
    take(batches, 3)
    assert batches.state_dict()["row"] > 0
    resumed = PackedBatches(packed_rows(cache, tokenizer, 32, expand_prob=0.0, buffer_size=64), 4)
    resumed.load_state_dict(batches.state_dict())
    assert (resumed.chunk, resumed.row) == (batches.chunk + 1, 0)
    first = next(resumed)["ids"]
    assert (first == resumed.rows.chunk_batch(batches.chunk + 1)["ids"][:4]).all()


def test_workers_leave_ctrl_c_to_the_main_process(corpus_file, tokenizer, tmp_path):
    import multiprocessing
    import signal
    cache = load_corpus(corpus_file, tokenizer, str(tmp_path / "cache"), progress=False)
    batches = PackedBatches(packed_rows(cache, tokenizer, 32, buffer_size=16), 8, 2)
    before = set(multiprocessing.active_children())  # other tests' processes, if any are still ending
    take(batches, 6)  # both workers have started and served chunks
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert len(workers) == 2
    for worker in workers:  # Ctrl-C in a terminal reaches every process of the group
        os.kill(worker.pid, signal.SIGINT)
    take(batches, 60)  # many chunks later: the workers are still serving
    assert all(worker.is_alive() for worker in workers)
    batches.close()  # and stop when told, though they ignore SIGTERM
    assert not any(worker.is_alive() for worker in workers)
