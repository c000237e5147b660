"""The Python surface (api.py): the README's snippet runs as written, samples are sample.py's, scores are eval.py's,
and a request the run cannot do is refused as on the command line."""
import json
import math
import os
import re

import pytest

import api
import eval as evaluate
import sample
from conftest import ROOT
from utils import UsageError


def readme_snippet():
    """The Python block of the README's "From Python" section, as written."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("## From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_snippet_runs_as_written(memorised_run, tmp_path, monkeypatch, capsys):
    model_dir, _ = memorised_run
    os.symlink(model_dir, tmp_path / "out")  # the snippet's run folder
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_snippet(), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 5 and printed[0].startswith("the river") and printed[1].startswith("the river")
    assert printed[2].startswith("a ") and " that" in printed[2]  # held text kept
    scores = [float(x) for x in printed[3].strip("[]").split(",")]
    assert len(scores) == 2 and all(0 < x < math.inf for x in scores)  # lines it never saw: high
    assert printed[4] == "some text"


@pytest.mark.parametrize("run", ["memorised_run", "memorised_ar_run"])
def test_samples_are_sample_pys_and_scores_are_eval_pys(run, request, tmp_path, capsys):
    model_dir, lines = request.getfixturevalue(run)
    loaded = api.load(str(model_dir), precision="fp32")
    drawn = loaded.sample(3, prompt="the", seed=5, temperature=0.8)
    sample.main(["-mdir", str(model_dir), "-n", "3", "--prompt", "the", "--seed", "5", "--temperature", "0.8",
                 "--precision", "fp32", "--jsonl", "--no-progress"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(s.text, s.ids, s.steps, s.evaluations) for s in drawn] == \
        [(p["text"], p["ids"], p["steps"], p["evaluations"]) for p in printed]
    scores = loaded.score(lines, draws=4, seed=2)
    valid = tmp_path / "valid.txt"
    valid.write_text("\n".join(lines) + "\n")
    evaluate.main(["-mdir", str(model_dir), "--valid", str(valid), "--draws", "4", "--seed", "2", "--sigmas", "2",
                   "--shuffle_lines", "0", "--json", "--no-progress"])
    result = json.loads(capsys.readouterr().out)
    assert sum(s.tokens for s in scores) == result["tokens"]
    assert sum(s.nats for s in scores) / result["tokens"] == pytest.approx(result["nll_nats_per_token"], rel=1e-9)
    errors = math.sqrt(sum(s.stderr ** 2 for s in scores)) / result["tokens"]
    assert errors == pytest.approx(result["nll_stderr"], rel=1e-9, abs=1e-12)
    assert (errors > 0) == (run == "memorised_run")  # a bound has a Monte Carlo error, the exact NLL none


def test_requests_the_run_cannot_do_are_refused_in_one_line(memorised_run, memorised_ar_run):
    diffusion, baseline = api.load(str(memorised_run[0])), api.load(str(memorised_ar_run[0]))
    with pytest.raises(UsageError, match="--top_p 0.9: not for .*a continuous diffusion run"):
        diffusion.sample(1, top_p=0.9)
    with pytest.raises(UsageError, match="--infill: not for .*an autoregressive run"):
        baseline.sample(1, infill="the [3] of")
    with pytest.raises(UsageError, match="--sampler heun: not for .*an autoregressive run"):
        baseline.sample(1, sampler="heun")
    with pytest.raises(UsageError, match="--length '1:3': lengths go from 2"):
        diffusion.sample(1, length="1:3")
    with pytest.raises(UsageError, match="--temperature 0.0: must be in"):
        diffusion.sample(1, temperature=0.0)
    with pytest.raises(UsageError, match="score: text 0 is .* tokens, longer than the 32-token rows"):
        diffusion.score(["word " * 40])
    with pytest.raises(UsageError, match="a list of texts"):
        diffusion.score("one string")
    for call, message in ((lambda: diffusion.sample(1, prompt="the", infill="a [3] b"), "prompt or infill, not both"),
                          (lambda: diffusion.sample(-1), "-n -1: must be a whole number of at least 1"),
                          (lambda: diffusion.sample(1, batch_size=0), "--batch_size 0: must be"),
                          (lambda: diffusion.sample(1, seed=-1), "--seed -1: must be"),
                          (lambda: diffusion.sample(1, steps=2.5), "--steps 2.5: must be"),
                          (lambda: diffusion.sample(1, temprature=0.5), "unknown setting 'temprature'"),
                          (lambda: diffusion.sample(1, prompt=5), "a text or a list of texts"),
                          (lambda: diffusion.sample(1, length=2.5), "--length '2.5'"),
                          (lambda: diffusion.score([None]), "score: text 0: None is not text"),
                          (lambda: diffusion.score(["a"], draws=1), "--draws 1: must be"),
                          (lambda: diffusion.decode([99999]), "decode: token ids outside the vocabulary"),
                          (lambda: diffusion.encode(5), "encode: text: 5 is not text"),
                          (lambda: baseline.sample(1, infill="the [3] of", steps=50), "--infill: not for"),
                          (lambda: api.load(str(memorised_run[0]), precision="bogus"), "precision 'bogus': one of")):
        with pytest.raises(UsageError, match=message):
            call()
    with pytest.raises(UsageError, match="run-nowhere.ckpt.pt: no checkpoint there"):
        api.load(str(memorised_run[0]) + "-nowhere")
