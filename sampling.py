"""What the commands that sample share: flag values become checked SamplerSettings (the sampler step and the
per-token schedule with their parameters bound, the sigma grid, early exit), and draw() samples a list of layouts
in batches with the sampler of the run's objective (objectives.py), one noise seed per sample, with progress on
stderr."""
import argparse
import inspect
import math
import sys
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from tqdm import tqdm

from data import MAX_SAMPLE_LENGTH, parse_template, sample_layout, sample_rows
from diffusion import SAMPLERS, SAMPLING_RHO, SCHEDULES, Denoising, EarlyExit, Grid
from objectives import run_objective
from utils import UsageError

# The parameters of one sampler or schedule (each a flag of sample.py), with their defaults
SAMPLER_PARAMETERS = {"stochastic": {"S_churn": 40.0, "S_tmin": 0.0, "S_tmax": math.inf, "S_noise": 1.0}}
SCHEDULE_PARAMETERS = {"ar": {"skew": 1.0}, "confidence": {"threshold": 0.9, "patience": 0.5}}
GRIDS = ("rho", "warped")
# The sampling flags that only some objectives read (objectives.OBJECTIVES), and what each objective's sampler does
# read, for the one-line refusal of the others (check_objective_flags)
CONTINUOUS_ONLY = ("--sampler", "--schedule", "--grid", "--rho", "--early_exit", "--exit_confidence", "--clamp",
                   "--fp64", *(f"--{k}" for table in (SAMPLER_PARAMETERS, SCHEDULE_PARAMETERS)
                               for defaults in table.values() for k in defaults))
REFUSED = {"diffusion": ("--top_p",), "mdlm": CONTINUOUS_ONLY,
           "ar": CONTINUOUS_ONLY + ("--steps", "--infill", "--suffix")}
READS = {"diffusion": "a continuous diffusion run, whose --temperature sharpens the score",
         "mdlm": "a masked diffusion run, which unmasks tokens (--steps, --temperature, --top_p, --prompt, --infill, "
                 "--suffix, --length)",
         "ar": "an autoregressive run, which continues a prompt left to right (--prompt, --length, --temperature, "
               "--top_p)"}


@dataclass(frozen=True)
class SamplerSettings:
    """How samples are drawn; build it with sampler_settings(), which checks the values. `parameters` holds the
    chosen sampler's and schedule's (SAMPLER_PARAMETERS, SCHEDULE_PARAMETERS), defaults filled in."""
    sampler: str = "iterative"
    steps: int = 200
    schedule: str = "uniform"
    grid: str = "rho"
    rho: float = SAMPLING_RHO
    parameters: dict = field(default_factory=dict)
    early_exit: int = None
    exit_confidence: float = 0.5
    precision: str = "fp32"
    fp64: bool = False
    temperature: float = 1.0
    clamp: float = 0.0
    top_p: float = 1.0

    def step(self):
        """The sampler step with its parameters bound (diffusion.SAMPLERS)."""
        own = {k: self.parameters[k] for k in SAMPLER_PARAMETERS.get(self.sampler, {})}
        if self.sampler == "stochastic":  # gamma = min(S_churn / steps, sqrt(2) - 1) needs the step count
            own["steps"] = self.steps
        return partial(SAMPLERS[self.sampler], **own) if own else SAMPLERS[self.sampler]

    def schedule_function(self):
        """The per-token schedule with its parameters bound (diffusion.SCHEDULES)."""
        own = {k: self.parameters[k] for k in SCHEDULE_PARAMETERS.get(self.schedule, {})}
        return partial(SCHEDULES[self.schedule], **own) if own else SCHEDULES[self.schedule]

    def sigma_grid(self, sampling, where):
        """The Grid for a run whose checkpoint's sampling settings are `sampling` (sigma_min, sigma_max, warp).
        Raises UsageError naming `where` (the run folder) for --grid warped on a run trained without a warp."""
        if self.grid == "warped" and sampling.get("warp") is None:
            raise UsageError(f"--grid warped: {where} was trained without --time_warp")
        warp = sampling["warp"] if self.grid == "warped" else None
        return Grid(sampling["sigma_min"], sampling["sigma_max"], self.rho, warp)

    def exit(self):
        """The EarlyExit of --early_exit, or None."""
        return None if self.early_exit is None else EarlyExit(self.early_exit, self.exit_confidence)

    def denoising(self):
        """The Denoising of --temperature and --clamp."""
        return Denoising(self.temperature, self.clamp)


def sampler_settings(sampler="iterative", steps=200, schedule="uniform", grid="rho", rho=None, early_exit=None,
                     exit_confidence=None, precision="fp32", fp64=False, temperature=1.0, clamp=0.0, top_p=1.0,
                     **parameters):
    """SamplerSettings from the values of sample.py's flags, None meaning "not given" (so that the defaults of the
    chosen sampler and schedule apply). Raises UsageError naming the flag for an unknown name, a parameter of
    another sampler or schedule, or a value out of range."""
    unknown = [(flag, value, allowed) for flag, value, allowed in (("--sampler", sampler, SAMPLERS),
               ("--schedule", schedule, SCHEDULES), ("--grid", grid, GRIDS)) if value not in allowed]
    if unknown:
        flag, value, allowed = unknown[0]
        raise UsageError(f"{flag} {value}: not one of {', '.join(allowed)}")
    chosen = {}
    owners = (("--sampler", sampler, SAMPLER_PARAMETERS), ("--schedule", schedule, SCHEDULE_PARAMETERS))
    for kind, name, table in owners:
        for owner, defaults in table.items():
            for key, default in defaults.items():
                if owner != name and parameters.get(key) is not None:
                    raise UsageError(f"--{key} applies to {kind} {owner}, not {name} (continuous diffusion's "
                                     "samplers and schedules)")
                if owner == name:
                    chosen[key] = default if parameters.get(key) is None else parameters[key]
    extra = sorted(set(parameters) - {k for table in (SAMPLER_PARAMETERS, SCHEDULE_PARAMETERS)
                                      for defaults in table.values() for k in defaults})
    if extra:
        raise TypeError(f"sampler_settings() got unknown parameters {extra}")
    if grid == "warped" and rho is not None:
        raise UsageError("--rho applies to --grid rho, not warped")
    if exit_confidence is not None and early_exit is None:
        raise UsageError("--exit_confidence applies to --early_exit")
    settings = SamplerSettings(sampler, steps, schedule, grid, SAMPLING_RHO if rho is None else rho, chosen,
                               early_exit, 0.5 if exit_confidence is None else exit_confidence, precision, fp64,
                               temperature, clamp, top_p)
    check_ranges(settings)
    return settings


def check_ranges(settings):
    """Raise UsageError naming the first flag of `settings` whose value is out of its range."""
    p = settings.parameters
    problems = [
        (settings.steps < 1, f"--steps {settings.steps}: must be at least 1"),
        (settings.early_exit is not None and settings.early_exit < 1,
         f"--early_exit {settings.early_exit}: must be at least 1 (steps without a change)"),
        (not 0 <= settings.exit_confidence <= 1, f"--exit_confidence {settings.exit_confidence}: a probability in "
                                                 "[0, 1]"),
        (not 0.1 <= settings.rho <= 100, f"--rho {settings.rho}: must be in [0.1, 100] (1 is linear in sigma, 7 is "
                                         "EDM's)"),
        (not 0.05 <= settings.temperature <= 20, f"--temperature {settings.temperature}: must be in [0.05, 20]"),
        (not 0 <= settings.clamp < math.inf, f"--clamp {settings.clamp}: a noise level, 0 (never) or more"),
        (not 0 < settings.top_p <= 1, f"--top_p {settings.top_p}: a probability in (0, 1] (1: no truncation)"),
        (not 0 <= p.get("skew", 0) < math.inf, f"--skew {p.get('skew')}: must be 0 (uniform) or more, and finite"),
        (not 0 < p.get("threshold", 1) <= 1, f"--threshold {p.get('threshold')}: a probability in (0, 1]"),
        (not 0 <= p.get("patience", 0) < 1, f"--patience {p.get('patience')}: a share of the steps in [0, 1)"),
        (not p.get("S_churn", 0) >= 0, f"--S_churn {p.get('S_churn')}: must be 0 or more"),
        (not 0 <= p.get("S_noise", 1) < math.inf, f"--S_noise {p.get('S_noise')}: must be finite and 0 or more"),
        (not p.get("S_tmin", 0) <= p.get("S_tmax", math.inf),
         f"--S_tmin {p.get('S_tmin')} --S_tmax {p.get('S_tmax')}: S_tmin must be at most S_tmax"),
    ]
    for failed, message in problems:
        if failed:
            raise UsageError(message)


def setting_defaults():
    """Every keyword of sampler_settings with its default: the sampler's and schedule's own parameters None (not
    given), precision and steps included."""
    named = {name: p.default for name, p in inspect.signature(sampler_settings).parameters.items()
             if p.kind is p.POSITIONAL_OR_KEYWORD}
    return {**named, **{k: None for table in (SAMPLER_PARAMETERS, SCHEDULE_PARAMETERS) for d in table.values()
                        for k in d}}


def given_flags(settings, steps=None):
    """The sample.py flags that `settings` (sampler_settings' keywords, None for not given) set away from their
    defaults, as the command line reads, for check_objective_flags: "--name value" for a setting with a default
    (--sampler heun, --top_p 0.9), "--name" for a switch or one without a default (--fp64, --early_exit, a sampler's
    own parameter); "--steps N" where `steps` is given; precision never (every objective reads it)."""
    defaults, flags = setting_defaults(), []
    for name, value in settings.items():
        default = defaults.get(name)
        if value is None or name in ("precision", "steps") or (default is not None and value == default):
            continue
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        flags.append(f"--{name}" if default is None or isinstance(value, bool) else f"--{name} {shown}")
    return flags + [f"--steps {steps}"] * (steps is not None)


def check_objective_flags(objective, given, where):
    """Raise UsageError for the first of `given` (flags set to other than their defaults, each as "--name", or
    "--name value") that the sampler of `objective` (a name of objectives.OBJECTIVES) does not read, naming the flag
    and the run folder `where`."""
    for flag in given:
        if not reads_flag(objective, flag):
            raise UsageError(f"{flag}: not for {where}, {READS[objective]}")


def reads_flag(objective, flag):
    """Whether the sampler of `objective` (a name of objectives.OBJECTIVES) reads sample flag `flag` ("--name" or
    "--name value")."""
    return flag.split()[0] not in REFUSED[objective]


def sample_seed(seed, i):
    """The noise seed of sample i of a run with --seed `seed` (>= 0): 64 bits of numpy's SeedSequence of
    (seed, i), so that no two (seed, i) pairs share their noise in practice."""
    return int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0])


def parse_length(text):
    """--length: "data" (each sample draws its length from the training examples'), "N", or a range "A:B" (each
    sample draws its length uniformly from A..B) -> "data" or (A, B). Raises argparse.ArgumentTypeError."""
    if text == "data":
        return text
    lo, colon, hi = text.partition(":")
    try:
        lo, hi = int(lo), int(hi if colon else lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected data, a length such as 64 or a range such as "
                                         "16:48") from None
    if not 2 <= lo <= hi <= MAX_SAMPLE_LENGTH:
        raise argparse.ArgumentTypeError(f"{text!r}: lengths go from 2 to {MAX_SAMPLE_LENGTH:,}, and a range goes up "
                                         "(16:48)")
    return lo, hi


def length_flag(lengths):
    """--length as the user gave it, from parse_length's (A, B): "--length 64" or "--length 16:48"."""
    return f"--length {lengths[0]}" + f":{lengths[1]}" * (lengths[0] < lengths[1])


def beyond_training(where, length, row, model_dir):
    """The UsageError for a sample of `length` tokens, asked for by `where` (a flag), from the model in `model_dir`
    trained on rows of `row` tokens: positions past them were never trained."""
    return UsageError(f"{where}: a sample of {length} tokens is longer than the {row}-token rows {model_dir} was "
                      f"trained on (positions past them were never trained); ask for at most {row} tokens, or train "
                      "with a larger -slen")


def sample_lengths(length, sampling, where, causal=False):
    """What sample_length draws from for --length `length` (parse_length's value, or None for the default) and a
    checkpoint's `sampling` settings: a range (lo, hi), or the training examples' length counts. The default is
    "data" where the checkpoint keeps the counts and the training row length where it does not (a run saved
    before they were kept); for a `causal` model (the autoregressive baseline, which ends a sample at its own eos) the
    training row length. Raises UsageError naming `where` (the run folder) for "data" without counts."""
    counts = sampling.get("length_counts")
    if causal and length is None:
        return (sampling["sequence_length"],) * 2
    if length == "data" and counts is None:
        raise UsageError(f"--length data: {where} keeps no lengths of its training examples (saved by an earlier "
                         "version); give --length N")
    if length is None:
        return counts or (sampling["sequence_length"],) * 2
    return counts if length == "data" else length


def sample_length(lengths, seed, i, shortest=2):
    """Sample i's length in tokens, bos and eos included, drawn by a generator of its own (seed, i): `lengths` a
    range (lo, hi), fixed when lo == hi and otherwise uniform; or a list of counts (counts[n] training examples of
    n tokens, corpus.TokenCache.length_counts), in proportion to the counts of the lengths of at least `shortest`
    (`shortest` itself when no example is that long)."""
    if isinstance(lengths, tuple):
        lo, hi = lengths
        return lo if lo == hi else int(np.random.default_rng([seed, i]).integers(lo, hi + 1))
    counts = np.asarray(lengths, dtype=np.float64)
    counts[:shortest] = 0
    if not counts.sum():
        return shortest
    return int(np.random.default_rng([seed, i]).choice(len(counts), p=counts / counts.sum()))


def unconditional_layouts(tokenizer, lengths, n, seed):
    """n unprompted sample layouts (data.sample_layout: bos held, the rest free), sample i of length
    sample_length(lengths, seed, i)."""
    return [sample_layout(tokenizer, [None], sample_length(lengths, seed, i)) for i in range(n)]


def warn_unknown(tokenizer, texts, where):
    """Warn on stderr if the tokenizer has no pieces for some of the held `texts` (they become unk)."""
    if any(tokenizer.unk_id in tokenizer.encode(text, bos=False, eos=False) for text in texts):
        print(f"warning: {where}: the tokenizer has no piece for some of this text; it is held as unk (shown as "
              "\u2047) in the samples", file=sys.stderr)


def held_tokens(tokenizer, pieces, suffix):
    """How many tokens the layout of `pieces` (data.sample_layout's) and `suffix` holds, bos included."""
    _, held = sample_layout(tokenizer, [piece for piece in pieces if piece is not None] + [1], None, suffix)
    return sum(held)


def prompt_layouts(tokenizer, sampling, prompts, n, length, suffix, seed, model_dir, causal=False):
    """Every sample's (ids, held) layout and the prompt or template it came from, `n` per prompt, in order, for
    `prompts` as (text as given, pieces for data.sample_layout, where it came from: a flag or file:line), as
    prompt_pieces makes them; `length` parse_length's value or None (sample_lengths), `suffix` held text or None,
    sample i's length drawn from (seed, i). Raises UsageError if a prompt or template does not fit (the shortest
    length of a range), or if a sample would be longer than the rows the model in `model_dir` was trained on."""
    training_length = sampling["sequence_length"]
    lengths = sample_lengths(length, sampling, model_dir, causal)
    if suffix is not None:
        warn_unknown(tokenizer, [suffix], "--suffix")
    if not isinstance(lengths, list) and lengths[1] > training_length:
        raise beyond_training(length_flag(lengths), lengths[1], training_length, model_dir)
    layouts, sources = [], []
    for prompt, pieces, where in prompts:
        drawn = isinstance(lengths, list)  # from the training lines' lengths, at most the training rows
        fewest = held_tokens(tokenizer, pieces, suffix) + 1 if drawn else lengths[0]
        try:
            shortest, held = sample_layout(tokenizer, pieces, training_length if drawn else fewest, suffix, where)
        except UsageError as e:
            ranged = not drawn and lengths[0] < lengths[1]
            raise UsageError(f"{e} (the shortest of --length {lengths[0]}:{lengths[1]})" if ranged else
                             f"{e} (the training rows)" if drawn else str(e)) from None
        if len(shortest) > MAX_SAMPLE_LENGTH:
            raise UsageError(f"{where}: {len(shortest):,} tokens; samples hold at most {MAX_SAMPLE_LENGTH:,}")
        warn_unknown(tokenizer, [piece for piece in pieces if isinstance(piece, str)], where)
        for _ in range(n):
            drawn_length = sample_length(lengths, seed, len(layouts), fewest)
            layouts.append(sample_layout(tokenizer, pieces, drawn_length, suffix, where))
            sources.append(prompt)
            if len(layouts[-1][0]) > training_length:
                raise beyond_training(where, len(layouts[-1][0]), training_length, model_dir)
    return layouts, sources


def prompt_pieces(prompts=None, templates=None):
    """What to sample from, as prompt_layouts reads it, (text, pieces, where) each: infill `templates` (data's
    "the [5] of the [3]"), else `prompts` (texts to continue; '' is an unprompted sample), else one unprompted sample.
    Raises UsageError for text that is not valid UTF-8 or a template without a blank."""
    if templates:
        return [(t, parse_template(checked_text(t, "--infill"), "--infill"), "--infill") for t in templates]
    return [(checked_text(t, "--prompt"), [t, None], f"--prompt {shortened(t)!r}") if t
            else ("", [None], "an unprompted sample") for t in prompts or [""]]


def checked_text(text, where):
    """`text` as given, refused (UsageError naming `where`) if it is not valid UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{where}: not valid UTF-8 text") from None
    return text


def shortened(text, width=40):
    """`text` for an error message: whole up to `width` characters, else its start and an ellipsis."""
    return text if len(text) <= width else text[:width - 3] + "..."


def draw(model, layouts, settings, grid, seed, batch_size, pad_id, device, progress=False, eos_id=None):
    """Sample every layout (ids, held), as data.sample_layout makes them, in batches of `batch_size`, samples of
    similar length together (a batch is as long as its longest row), with the sampler of the model's objective
    (objectives.py: diffusion.generate on the sigma `grid`, masked.generate_masked, or left to right,
    autoregressive.generate_autoregressive, whose rows stop at `eos_id`); sample i is drawn with the noise seed
    sample_seed(seed, i), so it depends on neither its batch nor the batch size. Yields, in order, (i, token ids as
    long as its layout, steps taken, network evaluations), each as soon as those before it are drawn. With
    `progress`, a bar on stderr counts the sampler steps of all batches (positions for the baseline). Raises
    ValueError for an autoregressive model without `eos_id`."""
    order = sorted(range(len(layouts)), key=lambda i: len(layouts[i][0]))  # stable: equal lengths keep their order
    batches = range(0, len(layouts), batch_size)
    objective = run_objective(model)
    if objective.name == "ar" and eos_id is None:
        raise ValueError("draw() needs eos_id for an autoregressive model: its rows stop there")
    lengths = [len(layouts[order[min(start + batch_size, len(layouts)) - 1]][0]) for start in batches]
    per_batch = lengths if objective.name == "ar" else [settings.steps] * len(lengths)  # the bar's steps
    bar = tqdm(total=sum(per_batch), desc="sampling", unit="step", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    context = {"grid": grid, "pad_id": pad_id, "eos_id": eos_id}
    drawn, following = {}, 0  # samples drawn but not yet yielded; the next index to yield
    for start, steps in zip(batches, per_batch):
        chosen = order[start:start + batch_size]
        batch = [layouts[i] for i in chosen]
        ids, cond_mask, segment_ids = sample_rows(batch, pad_id)
        seeds = [sample_seed(seed, i) for i in chosen]
        segment_ids = None if segment_ids is None else segment_ids.to(device)
        before = bar.n
        out, evaluations, steps_taken = objective.sample(model, ids.to(device), cond_mask.to(device), seeds,
                                                         settings, segment_ids, context,
                                                         callback=lambda *_: bar.update(1))
        bar.update(before + steps - bar.n)  # the batch's whole share, also where its rows ended early
        for b, (i, row) in enumerate(zip(chosen, out.tolist())):
            drawn[i] = (i, row[:len(batch[b][0])], int(steps_taken[b]), int(evaluations[b]))
        while following in drawn:
            yield drawn.pop(following)
            following += 1
    bar.close()
