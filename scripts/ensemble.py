"""Test the softmax average of checkpoints once: the ensemble a study reports, or several fit.py runs.

    python scripts/fit.py --seed_everything 1; python scripts/fit.py --seed_everything 2   # two models
    python scripts/ensemble.py lightning_logs/fit/version_{0,1}/checkpoints/epoch*.ckpt
    python scripts/ensemble.py CHECKPOINT ...   # a study's: report.json lists them in final.ensemble.checkpoints

The checkpoints must come from one validation split (the same --data.val_size and --data.seed); the split
and the test set are read as they were for training. Prints the ensemble's val and test accuracy.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlp.errors import UserError, run_script  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    from mlp.data import DatasetNotFoundError
    from mlp.final import test_checkpoints

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help=".ckpt files written by fit.py or tune.py")
    parser.add_argument("--data_dir", default=None, help="Fashion-MNIST folder (default: the one they trained on)")
    options = parser.parse_args(argv)
    try:
        result = test_checkpoints(options.checkpoints, options.data_dir)
    except DatasetNotFoundError as error:  # it names fit.py's flag, where this script's is --data_dir
        raise UserError(str(error).replace("--data.data_dir", "--data_dir")) from None
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run_script(main, interrupted="nothing was saved", writes_with=None)
