"""Reproduce the d2l "Multilayer Perceptrons from Scratch" exercises: choose on validation, test once.

    python scripts/exercises.py width      # hidden units 32 ... 2048
    python scripts/exercises.py depth      # hidden layers 1, 2, 4, 8
    python scripts/exercises.py lr         # learning rate 0.01, 0.1, 1, 10
    python scripts/exercises.py init       # init scheme x depth 1-8 (a comparison: nothing is tested)
    python scripts/exercises.py width --only width=1024 width=2048   # just these runs, for now

Finished runs are kept in lightning_logs/exercises/results.json, so a sweep resumes where it stopped and
a run two sweeps share is trained once. Any other flag goes to fit, e.g. --data.data_dir DIR; a run is kept
with its fit flags, and a rerun with others is refused: give runs with other fit flags their own --save_dir.
"""

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlp.errors import run_script


def main(args: list[str] | None = None) -> dict:
    from mlp.cli import LOG_DIR
    from mlp.exercises import SWEEPS, markdown_table, run_sweep

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", choices=list(SWEEPS))
    parser.add_argument("--only", nargs="+", metavar="RUN", help="train only these runs of the sweep, e.g. width=512")
    parser.add_argument("--save_dir", default=LOG_DIR, help="log folder; results.json lives in SAVE_DIR/exercises")
    options, fit_flags = parser.parse_known_args(args)
    # This script's own arguments stay in sys.argv while each run passes its fit flags to LightningCLI as `args`.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    outcome = run_sweep(options.sweep, options.save_dir, options.only, fit_flags)
    print(markdown_table(options.sweep, outcome))
    if outcome["selected"]:
        print(f"selected on validation: {outcome['selected']}; its test accuracy, measured once, is in bold")
    return outcome


if __name__ == "__main__":
    run_script(main, interrupted="finished runs are kept; run the same command again to continue",
               writes_with="--save_dir")
