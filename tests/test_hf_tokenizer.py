"""A Hugging Face tokenizer.json in place of a SentencePiece model (corpus.HFTokenizer): its special tokens found by
name or added by a fixed rule, and a run that trains, samples, evaluates and resumes with it."""
import json

import pytest

import eval as evaluate
import sample
from conftest import run_train
from corpus import SPECIAL_TOKENS, Tokenizer
from utils import UsageError

tokenizers = pytest.importorskip("tokenizers")  # requirements-extra.txt


def byte_level_bpe(lines, path, special):
    """A byte-level BPE of about 300 pieces trained on `lines`, with the `special` tokens, saved to `path`."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(lines, trainer)
    hf.save(str(path))
    return str(path)


def test_special_tokens_are_found_by_name_or_added_at_the_end(tmp_path, corpus_lines):
    named = Tokenizer.open(byte_level_bpe(corpus_lines, tmp_path / "named.json", ["<s>", "</s>", "<pad>", "<unk>"]))
    assert (named.bos_id, named.eos_id, named.pad_id, named.unk_id) == (0, 1, 2, 3) and named.vocab_size == 300
    gpt2 = byte_level_bpe(corpus_lines, tmp_path / "gpt2.json", ["<|endoftext|>"])  # GPT-2's only special token
    tokenizer = Tokenizer.open(gpt2)
    assert tokenizer.eos_id == 0 and tokenizer.vocab_size == 303  # <|bos|>, <|pad|>, <|unk|> added, in that order
    assert (tokenizer.bos_id, tokenizer.pad_id, tokenizer.unk_id) == (300, 301, 302)
    assert tokenizer.added == [SPECIAL_TOKENS[k][-1] for k in ("bos", "pad", "unk")]
    again = Tokenizer.open(gpt2)
    assert (again.bos_id, again.pad_id, again.unk_id, again.vocab_size) == (300, 301, 302, 303)
    text = corpus_lines[0]
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id and tokenizer.decode(ids) == text
    assert tokenizer.encode_batch([text, text]) == [ids[1:-1]] * 2
    inside = named.encode("<s> and </s>", bos=False, eos=False)  # special tokens' text in a line is text
    assert not {named.bos_id, named.eos_id} & set(inside) and named.decode(inside) == "<s> and </s>"


def test_a_bad_tokenizer_json_is_one_line(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"not": "a tokenizer"}')
    with pytest.raises(UsageError, match=f"{path}: not a readable tokenizer.json"):
        Tokenizer.open(str(path))


def test_a_run_trains_samples_evaluates_and_resumes_with_a_tokenizer_json(tmp_path, corpus_file, corpus_lines,
                                                                        spm_path, capsys):
    path = byte_level_bpe(corpus_lines, tmp_path / "tokenizer.json", ["<s>", "</s>", "<pad>", "<unk>"])
    run = tmp_path / "run"
    run_train(corpus_file, path, run, "--max_steps", "4")
    assert (run / "tokenizer.json").read_bytes() == open(path, "rb").read() and not (run / "tokenizer.model").exists()
    checkpoint = run_train(corpus_file, path, run, "--max_steps", "6")
    assert checkpoint["step"] == 6 and checkpoint["config"]["vocab_size"] == 300
    capsys.readouterr()
    sample.main(["-mdir", str(run), "-n", "2", "--steps", "4", "--prompt", corpus_lines[1][:12], "--jsonl",
                 "--no-progress"])
    samples = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(samples) == 2 and all(s["text"].startswith(corpus_lines[1][:12]) for s in samples)
    valid = tmp_path / "valid.txt"
    valid.write_text("\n".join(" ".join(line.split()[:3]) for line in corpus_lines[:8]) + "\n")  # within the rows
    evaluate.main(["-mdir", str(run), "--valid", str(valid), "--draws", "2", "--sigmas", "2", "--json",
                   "--no-progress"])
    assert json.loads(capsys.readouterr().out)["lines"] == 8
    with pytest.raises(UsageError, match="differs from the tokenizer this run .* was started with"):
        run_train(corpus_file, spm_path, run, "--max_steps", "8")
