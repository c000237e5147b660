"""Write a run's weights as a folder to share: model.safetensors (the chosen weights, no pickle, no optimizer state),
config.json (the model and sampling settings) and the tokenizer. sample.py, eval.py and api.load read the folder as
they read a run folder.

    python export.py -mdir out -o out-export [--ema 0.999]

Needs safetensors (pip install -r requirements-extra.txt), which training does not. The folder is written whole or
not at all, and never over an existing one.
"""
import sys

from checkpoint import export_weights
from utils import ArgumentParser, run_command


def build_parser():
    """export.py's command line."""
    p = ArgumentParser(prog="export.py", description=__doc__)
    p.add_argument("-mdir", "--model_dir", required=True, help="folder written by train.py")
    p.add_argument("-o", "--out", required=True, help="the folder to write (must not exist)")
    p.add_argument("--ema", help="export the EMA weights of this rate (e.g. 0.999) instead of the raw weights")
    return p


def main(argv=None):
    """Export the run of `argv`; raises UsageError on bad input."""
    args = build_parser().parse_args(argv)
    config = export_weights(args.model_dir, args.out, args.ema)
    print(f"{args.out}: the {config['weights']} weights of step {config['step']:,} with config.json and the "
          "tokenizer", file=sys.stderr)


if __name__ == "__main__":
    run_command(main)
