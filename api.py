"""The Python surface of a trained run, for notebooks and scripts: load a run folder, sample, score, encode and decode.
sample.py samples through it, and its scores are eval.py's (scoring.line_estimates), so each is done one way.

    import api
    run = api.load("out", ema=0.999)                  # a run folder of train.py, any objective
    for sample in run.sample(4, prompt="the river"):  # Sample records; str(sample) is its text
        print(sample)
    print(run.sample(2, infill="the [5] of the [3]", steps=100, temperature=0.9)[0].text)
    scores = run.score(["a line of text", "another one"])  # nats/token per line: a bound, or the exact NLL
    ids = run.encode("some text")
    print(run.decode(ids))

Errors are UsageError (utils.py), one line naming the setting as sample.py's flag, as on the command line.
"""
import argparse
import math
from dataclasses import dataclass

import torch

from checkpoint import load_model
from objectives import run_objective
from sampling import (check_objective_flags, draw, given_flags, parse_length, prompt_layouts, prompt_pieces,
                      sampler_settings, setting_defaults)
from scoring import line_estimates, line_seeds
from utils import PRECISION_CHOICES, UsageError, resolve_device

@dataclass
class Sample:
    """One sample: its text (generated spans cut at their first eos, held text kept), its token ids (bos first, as
    long as its layout), the prompt or template it came from ('' for none), its index, the sampler steps it took
    and the network evaluations it cost."""
    text: str
    ids: list
    prompt: str
    index: int
    steps: int
    evaluations: int

    def __str__(self):
        return self.text


@dataclass
class Score:
    """A line's negative log-likelihood under the run: `nats` in all (an upper bound for a diffusion run, exact for
    the baseline), over `tokens` scored tokens (eos included, bos held), with the Monte Carlo standard error of
    `nats` (`stderr`, 0 where exact)."""
    nats: float
    tokens: int
    stderr: float

    @property
    def nats_per_token(self):
        return self.nats / max(self.tokens, 1)


class Run:
    """A trained run loaded for use: model (eval mode, on `device`), tokenizer and the checkpoint's sampling
    settings (checkpoint.load_model), its objective (objectives.py) and the network's autocast `precision` for
    sampling ("auto": bf16 where the device computes it natively; scores are computed in fp32)."""

    def __init__(self, model_dir, ema=None, device="auto", precision="auto"):
        if precision not in PRECISION_CHOICES:
            raise UsageError(f"precision {precision!r}: one of {', '.join(PRECISION_CHOICES)}")
        self.model_dir, self.precision, self.device = model_dir, precision, resolve_device(device)
        self.model, self.tokenizer, self.sampling = load_model(model_dir, ema, self.device)
        self.objective = run_objective(self.model, self.sampling)

    def encode(self, text, bos=False, eos=False):
        """The token ids of `text` (list of int), bos and eos added only where asked."""
        return self.tokenizer.encode(checked_str(text, "encode: text"), bos=bos, eos=eos)

    def decode(self, ids):
        """The text of token ids, cut at the first eos, bos and pad dropped; UsageError for ids that are not token
        ids of the run's vocabulary."""
        try:
            return self.tokenizer.decode(ids)
        except (TypeError, ValueError) as e:
            raise UsageError(f"decode: {e}") from None

    def settings(self, steps=None, **given):
        """The SamplerSettings of sample.py's flags given as keywords (sampler, steps, schedule, grid, rho,
        temperature, top_p, clamp, early_exit, exit_confidence, fp64, a sampler's or schedule's own parameters;
        precision defaults to the run's). Raises UsageError for a value out of range, or one the run's objective does
        not read (top_p for a continuous run; the continuous samplers' settings for the others)."""
        given.setdefault("precision", self.precision)
        if given["precision"] not in PRECISION_CHOICES:
            raise UsageError(f"precision {given['precision']!r}: one of {', '.join(PRECISION_CHOICES)}")
        known = set(setting_defaults()) - {"steps"}
        unknown = sorted(set(given) - known)
        if unknown:
            raise UsageError(f"sample: unknown setting {unknown[0]!r}; the settings are {', '.join(sorted(known))}")
        checked_int(200 if steps is None else steps, "--steps", 1)
        settings = sampler_settings(steps=200 if steps is None else steps, **given)
        check_objective_flags(self.objective.name, given_flags(given, steps), self.model_dir)
        return settings

    def samples(self, n=1, prompt=None, infill=None, suffix=None, length=None, seed=0, batch_size=64,
                progress=False, **settings):
        """Draw `n` samples for each prompt (a text or a list; '' is unprompted) or infill template ("the [5] of the
        [3]", or a list), or `n` unprompted ones; `suffix` held at the end before eos; `length` "data" (the training
        lines' lengths), an int or "A:B" (tokens, bos and held text included; default: the run's own); the sampler
        `settings` as Run.settings takes them. Returns a generator of Sample records, in order as they are drawn;
        sample i depends on (seed, i) only. Raises UsageError, before any drawing, for a request the run cannot do."""
        prompts, templates = ([given] if isinstance(given, str) else given for given in (prompt, infill))
        if not all(isinstance(given, (list, tuple, type(None))) for given in (prompts, templates)):
            raise UsageError("sample: prompt and infill take a text or a list of texts")
        prompts, templates = (None if given is None else list(given) for given in (prompts, templates))
        if prompts and templates:
            raise UsageError("sample: give prompt or infill, not both")
        for text in (prompts or []) + (templates or []) + ([] if suffix is None else [suffix]):
            checked_str(text, "sample: a prompt, template or suffix")
        if templates or suffix is not None:  # named before any setting the objective does not read
            check_objective_flags(self.objective.name, ["--infill"] * bool(templates) +
                                  ["--suffix"] * (suffix is not None), self.model_dir)
        for value, name, low in ((n, "-n", 1), (batch_size, "--batch_size", 1), (seed, "--seed", 0)):
            checked_int(value, name, low)
        chosen = self.settings(**settings)
        if templates and length is not None:
            raise UsageError("--length does not apply to --infill: the template's text and blanks fix the length")
        try:
            length = None if length is None else parse_length(str(length))
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"--length {e}") from None
        return self.draw_prompts(prompt_pieces(prompts, templates), n, chosen, suffix, length, seed, batch_size,
                                 progress)

    def sample(self, n=1, **request):
        """Run.samples as a list of Sample records."""
        return list(self.samples(n, **request))

    def draw_prompts(self, prompts, n, settings, suffix=None, length=None, seed=0, batch_size=64, progress=False):
        """Run.samples for prompts as sampling.prompt_layouts reads them ((text, pieces, where) each), checked
        SamplerSettings and a parsed `length` (sampling.parse_length's value or None): sample.py's path. The request
        is checked here (UsageError); the returned generator then draws."""
        causal = self.objective.name == "ar"
        if causal and (suffix is not None or any(isinstance(p, int) for _, pieces, _ in prompts for p in pieces)):
            check_objective_flags("ar", ["--suffix"] if suffix is not None else ["--infill"], self.model_dir)
        layouts, sources = prompt_layouts(self.tokenizer, self.sampling, prompts, n, length, suffix, seed,
                                          self.model_dir, causal)
        grid = settings.sigma_grid(self.sampling, self.model_dir) if self.objective.name == "diffusion" else None
        drawn = draw(self.model, layouts, settings, grid, seed, batch_size, self.tokenizer.pad_id, self.device,
                     progress, self.tokenizer.eos_id)
        return (Sample(self.tokenizer.decode_sample(row, layouts[i][1]), row, sources[i], i, steps, evaluations)
                for i, row, steps, evaluations in drawn)

    def score(self, texts, draws=16, seed=0, batch_size=64):
        """Each text's negative log-likelihood under the run (Score records, in order): the exact NLL of the
        baseline, or the bound of a diffusion run with `draws` draws, text i's drawn from (seed, i) as eval.py draws
        a valid line's (scoring.line_estimates). A text is scored as eval.py scores a line: bos held, its tokens and
        eos free. Raises UsageError for a text longer than the training rows, or draws below 2."""
        if isinstance(texts, str):
            raise UsageError("score: give a list of texts, not one string")
        for value, name, low in ((draws, "--draws", 2), (batch_size, "--batch_size", 1), (seed, "--seed", 0)):
            checked_int(value, name, low)
        lines, limit = [], self.sampling["sequence_length"]
        for i, text in enumerate(texts):
            ids = self.tokenizer.encode(checked_str(text, f"score: text {i}"))
            if len(ids) > limit:
                raise UsageError(f"score: text {i} is {len(ids)} tokens, longer than the {limit}-token rows "
                                 f"{self.model_dir} was trained on")
            lines.append((ids, len(text) + 1))
        with torch.no_grad():
            estimates = line_estimates(self.model, self.objective, lines, batch_size, self.tokenizer.pad_id,
                                       self.device, draws, line_seeds(seed, range(len(lines))))
        terms = [value for key, value in estimates.items() if key not in ("tokens", "variance", "per_draw")]
        nats = sum(terms)
        return [Score(float(nats[i]), int(estimates["tokens"][i]), math.sqrt(float(estimates["variance"][i])))
                for i in range(len(lines))]


def checked_int(value, name, low):
    """`value` if it is an int of at least `low`; else UsageError naming it as sample.py's flag `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"{name} {value!r}: must be a whole number of at least {low}")
    return value


def checked_str(value, what):
    """`value` if it is a str; else UsageError naming `what`."""
    if not isinstance(value, str):
        raise UsageError(f"{what}: {value!r} is not text (a str)")
    return value


def load(model_dir, ema=None, device="auto", precision="auto"):
    """The Run of `model_dir` (a folder written by train.py) with its raw weights or those of EMA rate `ema`, on
    `device` ("auto": cuda, mps, else cpu), sampling under `precision`'s autocast. Raises UsageError if the folder,
    its checkpoint or the EMA rate is missing or does not match."""
    return Run(model_dir, ema, device, precision)
