"""Every flag of a training run in one place: the presets, the table of defaults, the parser with each flag's help,
`resolve`, which fills the flags not given (from a resumed run's args.json first), and the checks of their values.
train.py and bench.py parse with it; training.py builds the run from the result."""
import argparse
import json
import os

from corpus import ENCODING_ERRORS
from model import CONDITIONINGS
from objectives import OBJECTIVES
from timewarp import WARP_SHAPES
from utils import PRECISION_CHOICES, ArgumentParser

FIT_STEPS = 20  # steps timed before --time_budget fits the schedule's end (after a first, which starts workers)
DEMO_DIR = "demo"
# Architecture, batch and optimiser of each --preset; "base" is the original project's size
PRESETS = {
    "tiny": dict(model_dim=128, num_layers=4, num_heads=4, embedding_dim=64, batch_size=32, learning_rate=1e-3,
                 warmup_steps=100),
    # the tiny preset's shape at twice its batch: in 20 and 60 minutes on two CPU cores it learns more than width 256,
    # the preset before, did in the same time (RESULTS.md, "The small preset's shape for the budget")
    "small": dict(model_dim=128, num_layers=4, num_heads=4, embedding_dim=64, batch_size=64, learning_rate=1e-3,
                  warmup_steps=500),
    "base": dict(model_dim=512, num_layers=8, num_heads=8, embedding_dim=128, batch_size=256, learning_rate=1e-4,
                 warmup_steps=10000),
    "large": dict(model_dim=768, num_layers=14, num_heads=12, embedding_dim=128, batch_size=128, learning_rate=1e-4,
                  warmup_steps=10000),  # about 106M parameters with 8,000 tokens: a GPU preset
}
# Where an objective learns faster with another value than its preset's (RESULTS.md, "Paired lever runs"): at the
# tiny preset the continuous model wants the network at 1e-3, the autoregressive baseline at 3e-3
OBJECTIVE_PRESETS = {
    ("ar", "tiny"): dict(learning_rate=3e-3),
}
# Every default of train.py's flags. A flag not given takes its value from the first row that has it: the run's
# own args.json when it resumes (then "legacy" for a flag added since it was written), "demo" (with --demo), the
# objective's row at the run's preset (OBJECTIVE_PRESETS), "ar" (with --objective ar: no pads after eos to predict,
# no noise levels) or "mdlm", the run's preset, "every". The measurements behind the values are in RESULTS.md.
DEFAULTS = {
    "demo": dict(data_path=os.path.join(DEMO_DIR, "data", "train.txt"),
                 spm_model=os.path.join(DEMO_DIR, "data", "bpe.model"), model_dir=os.path.join(DEMO_DIR, "model"),
                 preset="tiny", max_steps=1000, sample_interval=0),
    "ar": dict(expand_prob=0.0, self_cond=0.0, time_warp=False, output_prior=False, embedding_lr_scale=1.0),
    # masked diffusion (MDLM): one time t per sequence, no embedding-space machinery
    "mdlm": dict(multilevel_prob=0.0, self_cond=0.0, time_warp=False, output_prior=False, embedding_lr_scale=1.0),
    # what a run resumed from an args.json without these flags trained with: the behaviour before they existed
    "legacy": dict(output_prior=False, prior_ramp=0, cond_prob=1.0, embedding_lr_scale=1.0, beta2=0.99,
                   stratified_sigma=False, time_budget=None, mask_weight="elbo", anchor_prob=0.0,
                   warp_shape="monotone", elbo_weight=0.0, conditioning="film", adam_eps=1e-8,
                   output_prior_scale=1.0),
    **PRESETS,
    "every": dict(encoding_errors="strict", num_workers=2, preset="base", objective="diffusion", dropout_prob=0.0,
                  accumulation_steps=1, weight_decay=0.01, gradient_clipping=1.0, ema_rate="0.999,0.9999",
                  max_steps=100_000, precision="auto", compile=False, max_bad_steps=10, sequence_length=64,
                  sigma_min=1.0, sigma_max=50.0, rho=1.0, multilevel_prob=1.0, self_cond=0.5, time_warp=True,
                  expand_prob=0.1, seed=0, device="auto", log_interval=50, save_interval=1000, keep=0,
                  sample_interval=1000, sample_steps=100, progress=True, tensorboard=False, output_prior=True,
                  prior_ramp=0, cond_prob=0.5, embedding_lr_scale=60.0, beta2=0.99, stratified_sigma=False,
                  mask_weight="elbo", probe_interval=0, probe_lines=64, probe_draws=4, anchor_prob=0.0,
                  warp_shape="monotone", elbo_weight=0.0, conditioning="film", adam_eps=1e-8, fsdp=False,
                  output_prior_scale=0.5),
}


def default_text(name):
    """How flag `name`'s default is decided, for its --help: every run's value, each preset's, and what --demo, an
    --objective and an objective at a preset (OBJECTIVE_PRESETS) change."""
    def shown(value):
        return ("on" if value else "off") if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) \
            else repr(value) if value == "" else str(value)
    parts = [f"default {shown(DEFAULTS['every'][name])}"] if name in DEFAULTS["every"] else []
    if name in PRESETS["tiny"]:
        parts.append("from --preset: " + ", ".join(f"{p} {shown(v[name])}" for p, v in PRESETS.items()))
    parts += [f"{shown(DEFAULTS[row][name])} with {flag}" for row, flag in (
        ("demo", "--demo"), ("ar", "--objective ar"), ("mdlm", "--objective mdlm")) if name in DEFAULTS[row]]
    parts += [f"{shown(row[name])} with --objective {objective} at --preset {preset}"
              for (objective, preset), row in OBJECTIVE_PRESETS.items() if name in row]
    return "; ".join(parts)


def defaults_of(objective, preset):
    """Every flag's default (a dict by flag name) for a new run of `objective` at `preset`, neither --demo's nor a
    resumed run's: the objective's row at the preset, the objective's own, the preset's, every run's."""
    rows = [OBJECTIVE_PRESETS.get((objective, preset), {}), DEFAULTS[objective] if objective in ("ar", "mdlm") else {},
            PRESETS[preset], DEFAULTS["every"]]
    return {name: next(row[name] for row in rows if name in row) for name in set().union(*rows)}


def build_parser(description=None):
    """train.py's command line; every default comes from DEFAULTS (argparse's own are None: "not given")."""
    p = ArgumentParser(prog="train.py", description=description)
    d = default_text
    io = p.add_argument_group("data and output")
    io.add_argument("-d", "--data_path", help="training corpus: UTF-8 text, one example a line; blank lines are "
                                              "skipped, a line longer than -slen gives a random window of it")
    io.add_argument("-spm", "--spm_model", "--tokenizer",
                    help="SentencePiece model with bos, eos, pad and unk ids (prepare.py makes one), or a Hugging "
                         "Face tokenizer.json (the tokenizers package), whose special tokens are found by name or "
                         "added (docs/data.md)")
    io.add_argument("-mdir", "--model_dir", help="folder for the checkpoint, config, tokenizer copy and "
                                                 "metrics.jsonl; a run already there resumes, every flag not given "
                                                 "taking the value it was started with")
    io.add_argument("--cache_dir", help="folder for the tokenised corpus (default $XDG_CACHE_HOME or "
                                        "~/.cache, in score-diffusion-lm/); safe to delete")
    io.add_argument("--encoding_errors", choices=ENCODING_ERRORS,
                    help=f"invalid UTF-8 or a carriage return inside a line: strict stops before step 1 naming "
                         f"file:line, replace uses U+FFFD ({d('encoding_errors')})")
    io.add_argument("--num_workers", type=int, help=f"DataLoader processes that crop, mask and pack rows (0: in "
                                                    f"this process; batches do not depend on it; {d('num_workers')})")
    io.add_argument("--config", metavar="FILE",
                    help="read flags from a YAML (needs PyYAML) or JSON file of long flag names and values, e.g. "
                         "learning_rate: 0.001; a run folder's args.json is one, so a run is repeated with -d, -spm "
                         "and -mdir given anew; flags on the command line win over the file's")
    io.add_argument("--demo", action="store_true",
                    help=f"train on the demo corpus (built under {DEMO_DIR}/data/ if missing: English sentences "
                         "from the standard library's docstrings, no download) with the demo's defaults")
    arch = p.add_argument_group("model")
    arch.add_argument("--preset", choices=PRESETS, help=f"architecture, batch and optimiser defaults; flags given "
                                                        f"explicitly win ({d('preset')})")
    arch.add_argument("-dim", "--model_dim", type=int, help=f"transformer width D ({d('model_dim')})")
    arch.add_argument("-emb", "--embedding_dim", type=int, help=f"token embedding size E, the space the diffusion "
                                                                f"runs in ({d('embedding_dim')})")
    arch.add_argument("-nl", "--num_layers", type=int, help=f"transformer blocks ({d('num_layers')})")
    arch.add_argument("-nh", "--num_heads", type=int, help=f"attention heads ({d('num_heads')})")
    arch.add_argument("--conditioning", choices=CONDITIONINGS,
                      help=f"how each token's noise level reaches the blocks: film, a FiLM layer per block (Perez et al. "
                           f"2018); shared, one layer for all blocks and a learned offset per block (adaLN-single, "
                           f"Chen et al. 2023), a block's layer fewer ({d('conditioning')})")
    arch.add_argument("--objective", choices=OBJECTIVES,
                      help=f"diffusion (this project's model, continuous diffusion of embeddings); ar: the "
                           f"autoregressive baseline, the same backbone with causal attention, clean embeddings and a "
                           f"next-token loss, for eval.py's comparison and judge; mdlm: masked diffusion (Sahoo et al. "
                           f"2024), the same backbone reading [MASK] where tokens are masked ({d('objective')})")
    arch.add_argument("-dop", "--dropout_prob", type=float, help=f"dropout in every block ({d('dropout_prob')})")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("-bsz", "--batch_size", type=int, help=f"rows per micro-batch and process; each row packs "
                                                            f"several lines ({d('batch_size')})")
    opt.add_argument("-acc", "--accumulation_steps", type=int, help=f"micro-batches per optimiser step "
                                                                    f"({d('accumulation_steps')})")
    opt.add_argument("-lr", "--learning_rate", type=float, help=f"peak AdamW learning rate ({d('learning_rate')})")
    opt.add_argument("-wus", "--warmup_steps", type=int,
                     help=f"linear warm-up, then a cosine decay to 10%% of -lr at --max_steps; a warm-up longer than "
                          f"a tenth of --max_steps is shortened to that, with a note ({d('warmup_steps')})")
    opt.add_argument("-wd", "--weight_decay", type=float, help=f"AdamW weight decay, on matrices only "
                                                               f"({d('weight_decay')})")
    opt.add_argument("--embedding_lr_scale", type=float,
                     help=f"the token embeddings' learning rate as a multiple of -lr, without weight decay (Plaid "
                          f"trains them faster); 1 keeps them in the matrices' group; 0 leaves them at their random "
                          f"start ({d('embedding_lr_scale')})")
    opt.add_argument("--beta2", type=float, help=f"AdamW's second-moment decay ({d('beta2')})")
    opt.add_argument("--adam_eps", type=float, help=f"AdamW's epsilon, added to the root of the second moment "
                                                    f"({d('adam_eps')})")
    opt.add_argument("-gc", "--gradient_clipping", type=float, help=f"largest global gradient norm, 0: no clipping "
                                                                    f"({d('gradient_clipping')})")
    opt.add_argument("-ema", "--ema_rate", help=f"comma-separated EMA decay rates, '' for none; each warms up as "
                                                f"min(rate, (1 + step) / (10 + step)) ({d('ema_rate')})")
    opt.add_argument("--max_steps", type=int, help=f"optimiser steps; the cosine decay ends here ({d('max_steps')})")
    opt.add_argument("--time_budget", type=float, metavar="MINUTES",
                     help="train for this many minutes of wall clock in all (resumes included) and end there: after "
                          f"{FIT_STEPS} timed steps (again at 2, 4, 8 ... times that, in the schedule's first half) "
                          "the schedule is fitted to the steps that fit, and kept in the checkpoint (--max_steps "
                          "stays the upper bound; off by default; 0 drops a resumed run's budget)")
    opt.add_argument("--precision", choices=PRECISION_CHOICES,
                     help=f"autocast precision of the network: auto (bf16 where the device computes it in hardware, "
                          f"GPUs and CPUs with AVX-512 bf16 or AMX; else fp32), fp32, bf16, or fp16 on GPUs (with a "
                          f"gradient scaler, whose overflow steps are skipped); noise levels, preconditioning and the "
                          f"softmax stay fp32 ({d('precision')})")
    opt.add_argument("--compile", action=argparse.BooleanOptionalAction,
                     help=f"torch.compile the training forward (compiles once, in the first step) ({d('compile')})")
    opt.add_argument("--fsdp", action=argparse.BooleanOptionalAction,
                     help=f"under torchrun, shard the weights, gradients and optimizer state over the processes "
                          f"(torch's fully_shard, FSDP2) instead of a full copy on each (DDP); checkpoints stay one "
                          f"format, so the run resumes with or without it ({d('fsdp')})")
    opt.add_argument("--max_bad_steps", type=int, help=f"stop (exit status 3, last checkpoint intact) after this "
                                                       f"many steps in a row with a non-finite loss or gradient, "
                                                       f"each skipped ({d('max_bad_steps')})")
    diff = p.add_argument_group("diffusion")
    diff.add_argument("-slen", "--sequence_length", type=int, help=f"row length L in tokens "
                                                                   f"({d('sequence_length')})")
    diff.add_argument("-smin", "--sigma_min", type=float, help=f"lowest training noise level ({d('sigma_min')})")
    diff.add_argument("-smax", "--sigma_max", type=float, help=f"highest training noise level ({d('sigma_max')})")
    diff.add_argument("-rho", "--rho", type=float, help=f"spacing of the training levels between the ends, EDM "
                                                        f"eq. 5 (1: uniform in sigma); the time warp starts from it "
                                                        f"({d('rho')})")
    diff.add_argument("--multilevel_prob", type=float, help=f"share of batches with an independent sigma (masked "
                                                            f"diffusion: mask rate t) per token instead of one per "
                                                            f"sequence ({d('multilevel_prob')})")
    diff.add_argument("--mask_weight", choices=("elbo", "uniform"),
                      help=f"masked diffusion's loss: elbo, the masked tokens' cross-entropy weighted by 1/t (MDLM's "
                           f"bound), or uniform, unweighted ({d('mask_weight')})")
    diff.add_argument("--anchor_prob", type=float, metavar="SHARE",
                      help=f"clean anchors (after CANDI): in this share of the sequences, each token is held clean "
                           f"with probability 1 - s, s in [0, 1] its level's place between -smin and -smax in log "
                           f"sigma, and left out of the loss ({d('anchor_prob')})")
    diff.add_argument("--elbo_weight", type=float, metavar="W",
                      help=f"add W times the bound's diffusion term, sigma^-3 |x - D|^2 over the levels' training "
                           f"density, to the cross-entropy (Plaid's ELBO in embedding space; its gradient also "
                           f"reaches the clean embeddings) ({d('elbo_weight')})")
    diff.add_argument("--stratified_sigma", action=argparse.BooleanOptionalAction,
                      help=f"draw a batch's noise levels stratified (one from each of as many equal slices of the "
                           f"distribution as there are draws) rather than independently ({d('stratified_sigma')})")
    diff.add_argument("--cond_prob", type=float,
                      help=f"share of examples that get a conditioning span at all; the others are wholly free, as "
                           f"unconditional sampling starts (1: the original's mix; {d('cond_prob')})")
    diff.add_argument("--output_prior", action=argparse.BooleanOptionalAction,
                      help=f"add each token's posterior given its own noisy embedding, z . e / sigma^2, to the "
                           f"logits, so that the network learns what context adds; its head starts at zero (Plaid; "
                           f"{d('output_prior')})")
    diff.add_argument("--prior_ramp", type=int, metavar="STEPS",
                      help=f"with --output_prior, ramp its weight linearly from 0 to 1 over the first STEPS steps "
                           f"(0: full from the start; {d('prior_ramp')})")
    diff.add_argument("--output_prior_scale", type=float, metavar="S",
                      help=f"with --output_prior, the posterior's weight in the logits: below 1 the network starts "
                           f"from a flatter one and must add more itself; part of the model ({d('output_prior_scale')})")
    diff.add_argument("--self_cond", type=float, metavar="PROB",
                      help=f"self-conditioning: the model also reads its previous estimate of the clean embeddings; "
                           f"this share of batches gets one from a first pass without gradient (0: a model without "
                           f"it; {d('self_cond')})")
    diff.add_argument("--time_warp", action=argparse.BooleanOptionalAction,
                      help=f"draw training noise levels through a warp fitted online to the loss by sigma (CDCD), "
                           f"kept in the checkpoint for plot.py and sample.py --grid warped; --no-time_warp draws "
                           f"them through the -rho spacing ({d('time_warp')})")
    diff.add_argument("--warp_shape", choices=WARP_SHAPES,
                      help=f"the time warp's fit of the loss by level: monotone (isotonic, CDCD) or gumbel (a Gumbel "
                           f"CDF in log sigma, LangFlow's information-uniform density) ({d('warp_shape')})")
    diff.add_argument("--expand_prob", type=float, help=f"share of lines padded after eos to a random length, so that "
                                                        f"the model learns where text ends ({d('expand_prob')})")
    run = p.add_argument_group("run")
    run.add_argument("--seed", type=int, help=f"seed of the weights, data order and noise; fixed for a run "
                                              f"({d('seed')})")
    run.add_argument("--device", help=f"auto (cuda, then mps, else cpu), cpu, cuda, cuda:1, ... ({d('device')})")
    run.add_argument("--log_interval", type=int, help=f"steps between metrics.jsonl lines ({d('log_interval')})")
    run.add_argument("--save_interval", type=int, help=f"steps between checkpoints; one is also written at the end "
                                                       f"({d('save_interval')})")
    run.add_argument("--keep", type=int, help=f"also keep the last K checkpoints as ckpt-<step>.pt; ckpt.pt is "
                                              f"always the latest ({d('keep')})")
    run.add_argument("--sample_interval", type=int,
                     help=f"steps between the four samples printed during training (two unprompted, two continuing "
                          f"the first tokens of valid lines), also printed at the end; 0: never, but --demo prints "
                          f"them at the end ({d('sample_interval')})")
    run.add_argument("--sample_steps", type=int, help=f"sampler steps of those samples ({d('sample_steps')})")
    run.add_argument("--probe_interval", type=int, metavar="STEPS",
                     help=f"every STEPS steps, write to metrics.jsonl the gradient each noise level contributes to a "
                          f"step (a forward and backward pass per level bucket) and the shuffle gap of --probe_lines "
                          f"held-out lines; their time is left out of --time_budget (0: never; {d('probe_interval')})")
    run.add_argument("--probe_lines", type=int, help=f"lines of valid.txt beside the corpus (else of the corpus) whose "
                                                     f"shuffle gap the probe measures (0: none; {d('probe_lines')})")
    run.add_argument("--probe_draws", type=int, help=f"draws a line of the probe's bound ({d('probe_draws')})")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction,
                     help=f"show the progress bar with loss and tokens/s ({d('progress')})")
    run.add_argument("--wandb", metavar="PROJECT",
                     help="also log the metrics and the printed samples to this Weights & Biases project (needs the "
                          "wandb package; WANDB_MODE=offline keeps them in MODEL_DIR/wandb); a resumed run continues "
                          "the same W&B run")
    run.add_argument("--wandb_name", metavar="NAME", help="the W&B run's name (default: the run folder's name)")
    run.add_argument("--tensorboard", action=argparse.BooleanOptionalAction,
                     help=f"also write the metrics to MODEL_DIR/tensorboard (needs the tensorboard package) "
                          f"({d('tensorboard')})")
    return p


def parse_args(argv=None, required=("data_path", "spm_model", "model_dir"), description=None):
    """train.py's arguments, every default resolved (resolve); exits with a one-line error on a bad value."""
    p = build_parser(description)
    args = p.parse_args(argv)
    problem = apply_config(args, p) if args.config else None
    if not problem:
        problem = resolve(args, required)
        if problem and args.config:
            problem += f" (flags from --config {args.config} count as given)"
    if problem:
        p.error(problem)
    return args


def read_config(path):
    """The mapping of a --config file (YAML where its name ends in .yaml or .yml, else JSON), or a one-line problem
    naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        return f"--config {path}: {getattr(e, 'strerror', None) or e}"
    if path.lower().endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            return f"--config {path}: a YAML file needs PyYAML (pip install -r requirements-extra.txt); or give JSON"
        try:
            data = yaml.safe_load(text) or {}  # an empty file: no flags
        except yaml.YAMLError as e:
            return f"--config {path}: not valid YAML ({' '.join(str(e).split())})"
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            return f"--config {path}: not valid JSON ({e})"
    return data if isinstance(data, dict) else f"--config {path}: expected a mapping of flag names to values"


# The flags each objective does not read (resolve refuses them when given with other than a falsy value)
DIFFUSION_ONLY = ("self_cond", "time_warp", "output_prior", "sigma_min", "sigma_max", "rho", "stratified_sigma",
                  "prior_ramp", "anchor_prob", "warp_shape", "elbo_weight", "output_prior_scale")
NOT_READ = {"ar": DIFFUSION_ONLY + ("multilevel_prob", "mask_weight"), "mdlm": DIFFUSION_ONLY,
            "diffusion": ("mask_weight",)}
SHORT_NAMES = {"sigma_min": "-smin", "sigma_max": "-smax", "rho": "-rho"}  # as messages name them


def apply_config(args, parser):
    """Set every flag of the --config file that the command line did not give (a value of null is not given; the
    file's own "config" key is skipped, so args.json of a run started with --config reads as a config); keys are long
    flag names (any of a flag's, e.g. tokenizer for -spm); values are checked as the command line checks them. A run's
    args.json records every flag, also those its objective does not read, at the value every such run records
    (DEFAULTS): those are skipped, and so is its "demo" where -d or -spm is given, so that args.json repeats the run
    on other data (with another --objective, the values that are the file's objective's own defaults are skipped
    too, so that the run takes its objective's). A run's own args.json without -mdir is refused: it would resume and
    change that run. Returns a one-line problem naming the key and the file, or None."""
    path, data = args.config, read_config(args.config)
    if isinstance(data, str):
        return data
    actions = {name.lstrip("-").replace("-", "_"): action for action in parser._actions
               for name in action.option_strings + [action.dest] if name.startswith("--") or name == action.dest}
    objective = args.objective or data.get("objective") or DEFAULTS["every"]["objective"]
    written_for = (data.get("objective") or objective, data.get("preset") or DEFAULTS["every"]["preset"])
    run_for = (objective, args.preset or written_for[1])
    objectives = {run_for[0], written_for[0]}  # the run's, and the one the file was written for
    own = {}  # with another objective or preset: the file's defaults that the new run's defaults differ from
    if written_for != run_for and written_for[1] in PRESETS:
        recorded, new = defaults_of(*written_for), defaults_of(*run_for)
        own = {name: value for name, value in recorded.items() if new.get(name) != value}
    for key, value in data.items():
        action = actions.get(str(key).replace("-", "_"))
        if key == "config" or (action is not None and action.dest == "demo" and (args.data_path or args.spm_model)):
            continue
        if action is None or action.dest in ("help", "config"):
            return (f"--config {path}: unknown key {key!r}: the keys are train.py's long flag names (learning_rate, "
                    "not lr)")
        if action.dest == "model_dir" and args.model_dir is None and isinstance(value, str) and \
                os.path.isdir(value) and os.path.samefile(os.path.dirname(os.path.abspath(path)), value):
            return (f"--config {path}: the record of the run in {value}; give -mdir for a new run (or -mdir {value} "
                    "to resume that one)")
        if any(action.dest in NOT_READ.get(name, ()) and
               value == DEFAULTS.get(name, {}).get(action.dest, DEFAULTS["every"].get(action.dest))
               for name in objectives):
            continue  # what every run of an objective records for a flag it does not read
        if action.dest in own and value == own[action.dest]:
            continue  # the file's objective's or preset's own default (masked diffusion's self_cond 0), not a choice
        if value is None or getattr(args, action.dest) not in (None, action.default):
            continue  # not given, or the command line gave it
        boolean = action.nargs == 0  # store_true and --flag/--no-flag
        if boolean != isinstance(value, bool) or isinstance(value, (list, dict)):
            return (f"--config {path}: {key}: {value!r} is not " +
                    ("true or false" if boolean else f"a value of {action.option_strings[-1]}"))
        if not boolean:  # read as the command line reads its text; a whole number may be written 1000.0 or 1e3
            text = str(value)
            if action.type is int:
                try:
                    text = str(int(float(text))) if float(text).is_integer() else text
                except (ValueError, OverflowError):
                    pass
            try:
                value = (action.type or str)(text)
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                return f"--config {path}: {key}: {value!r} is not a valid value of {action.option_strings[-1]}"
        if action.choices is not None and value not in action.choices:
            return f"--config {path}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}"
        setattr(args, action.dest, value)
    return None


def resolve(args, required=("data_path", "spm_model", "model_dir")):
    """Fill every flag of `args` that was not given from DEFAULTS and check the values; returns the first problem as
    a message, or None."""
    if args.demo and (args.data_path or args.spm_model):
        given = " and ".join(flag for flag, value in (("-d", args.data_path), ("-spm", args.spm_model)) if value)
        return (f"--demo with {given}: --demo trains on the demo corpus; to train on your own, drop --demo (its "
                "settings are --preset tiny --max_steps 1000)")
    rows = [DEFAULTS["demo"]] if args.demo else []
    saved = saved_args(args.model_dir or (DEFAULTS["demo"]["model_dir"] if args.demo else None))
    if isinstance(saved, str):
        return saved
    if saved and args.preset and saved.get("preset", args.preset) != args.preset:
        model_dir = args.model_dir or DEFAULTS["demo"]["model_dir"]
        return (f"--preset {args.preset}: the run in {model_dir} was started with --preset {saved['preset']} and "
                f"keeps its architecture and settings; drop --preset to resume it, or give another -mdir to start the "
                f"{args.preset} preset afresh")
    rows = [saved, DEFAULTS["legacy"]] + rows if saved else rows
    if saved and args.objective and saved.get("objective", "diffusion") != args.objective:
        model_dir = args.model_dir or DEFAULTS["demo"]["model_dir"]
        return (f"--objective {args.objective}: {model_dir} holds a run of --objective "
                f"{saved.get('objective', 'diffusion')}; each objective needs a -mdir of its own")
    objective = args.objective or next(row["objective"] for row in rows + [DEFAULTS["every"]] if "objective" in row)
    if objective in ("ar", "mdlm"):  # the flags of the continuous process, which these objectives do not read
        given = [SHORT_NAMES.get(name, f"--{name}") for name in NOT_READ[objective]
                 if name != "mask_weight" and getattr(args, name)]
        if given:
            return f"{' and '.join(given)}: only for the diffusion objective, not --objective {objective}"
    if objective != "mdlm" and args.mask_weight is not None:
        return f"--mask_weight {args.mask_weight}: only for --objective mdlm"
    preset = args.preset or next(row["preset"] for row in rows + [DEFAULTS["every"]] if "preset" in row)
    rows.append(defaults_of(objective, preset))
    scale_given = args.output_prior_scale is not None
    for name, value in vars(args).items():
        if value is None:
            setattr(args, name, next((row[name] for row in rows if name in row), None))
    missing = [name for name in required if getattr(args, name) is None]
    if missing:
        again = "; a resumed run takes -d and -spm again, as it was started" if saved else ""
        return f"--{missing[0]} is required (or use --demo){again}"
    if not args.output_prior:  # a run without the prior records the neutral scale, so its args.json is a config
        if scale_given and args.output_prior_scale != 1:
            return (f"--output_prior_scale {args.output_prior_scale:g}: " +
                    (f"only for the diffusion objective, not --objective {objective}" if objective != "diffusion" else
                     "weighs the output prior, which this run trains without (--output_prior)"))
        args.output_prior_scale = 1.0
    if args.time_budget == 0:  # how a resumed run drops the budget its args.json would otherwise keep
        args.time_budget = None
    return check_args(args)


def saved_args(model_dir):
    """The flags a run in `model_dir` was last started with (its args.json, a dict), None where there is none, or
    a message naming the file if it cannot be read."""
    path = None if model_dir is None else os.path.join(model_dir, "args.json")
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        return f"{path}: not readable ({e}); move the run folder aside or remove the file to start afresh"
    # how the run is launched, not what it is: given again or not on every start (--fsdp as the processes allow)
    return {k: v for k, v in saved.items() if k not in ("data_path", "spm_model", "model_dir", "demo", "fsdp")} \
        if isinstance(saved, dict) else f"{path}: not a JSON object of flags"


def check_args(args):
    """The first flag whose value cannot work, as a message, or None."""
    at_least = {"batch_size": 1, "accumulation_steps": 1, "sequence_length": 2, "max_steps": 0, "warmup_steps": 0,
                "log_interval": 1, "save_interval": 1, "num_workers": 0, "sample_interval": 0, "sample_steps": 1,
                "model_dim": 2, "embedding_dim": 1, "max_bad_steps": 1, "keep": 0, "num_layers": 1, "num_heads": 1,
                "prior_ramp": 0, "probe_interval": 0, "probe_lines": 0, "probe_draws": 2}
    for name, low in at_least.items():
        if getattr(args, name) < low:
            return f"--{name} {getattr(args, name)}: must be at least {low}"
    for name in ("multilevel_prob", "expand_prob", "self_cond", "cond_prob", "anchor_prob"):
        if not 0 <= getattr(args, name) <= 1:
            return f"--{name} {getattr(args, name)}: must be in [0, 1]"
    if not 0 <= args.dropout_prob < 1:
        return f"-dop {args.dropout_prob:g}: must be in [0, 1) (at 1 dropout zeroes every block's output)"
    if not 1e-4 <= args.sigma_min < args.sigma_max <= 1e4:
        return f"-smin {args.sigma_min} -smax {args.sigma_max}: need 1e-4 <= sigma_min < sigma_max <= 1e4"
    if not 0.1 <= args.rho <= 100:
        return f"-rho {args.rho}: must be in [0.1, 100] (1 is uniform in sigma, 7 is EDM's)"
    if not args.learning_rate > 0:
        return f"-lr {args.learning_rate}: must be positive"
    if not 0 <= args.embedding_lr_scale < float("inf"):
        return f"--embedding_lr_scale {args.embedding_lr_scale}: must be 0 or more and finite"
    if not 0 < args.beta2 < 1:
        return f"--beta2 {args.beta2}: must be in (0, 1)"
    if not 0 < args.adam_eps < 1:
        return f"--adam_eps {args.adam_eps}: must be in (0, 1)"
    if not 0 <= args.elbo_weight < float("inf"):
        return f"--elbo_weight {args.elbo_weight}: must be 0 or more"
    if not 0 < args.output_prior_scale <= 100:  # far above, the offset's logits overflow float32
        return f"--output_prior_scale {args.output_prior_scale:g}: must be in (0, 100] (--no-output_prior for none)"
    if args.warp_shape != "monotone" and not args.time_warp:
        return f"--warp_shape {args.warp_shape}: shapes the time warp, which this run trains without (--time_warp)"
    if args.fsdp and (args.compile or args.precision == "fp16"):
        return (f"--fsdp with {'--compile' if args.compile else '--precision fp16'}: not supported together; drop "
                f"{'--compile' if args.compile else 'fp16 for --precision bf16 or fp32'}")
    if args.time_budget is not None and not 0 < args.time_budget < float("inf"):
        return f"--time_budget {args.time_budget:g}: minutes, 0 (no budget) or more"
    for flag, value in (("-wd", args.weight_decay), ("-gc", args.gradient_clipping)):
        if not value >= 0:
            return f"{flag} {value}: must be 0 or more"
    if args.model_dim % args.num_heads or (args.model_dim // args.num_heads) % 2:
        return f"-dim {args.model_dim} -nh {args.num_heads}: the width must split into heads of even size"
    try:
        rates = ema_rates(args)
    except ValueError:
        return f"-ema {args.ema_rate!r}: expected comma-separated numbers such as 0.999,0.9999"
    if any(not 0 < r < 1 for r in rates):
        return f"-ema {args.ema_rate!r}: every rate must be in (0, 1)"
    return None


def warmup_steps(args, end=None):
    """The warm-up the run trains with: -wus, shortened to a tenth of the schedule's `end` (default --max_steps)
    where it is longer, so that a short run reaches its learning rate (train.py says so)."""
    return min(args.warmup_steps, (args.max_steps if end is None else end) // 10)


def ema_rates(args):
    """The -ema rates as floats; raises ValueError for a non-number (check_args turns it into a usage error)."""
    return [float(r) for r in args.ema_rate.split(",") if r.strip()]
