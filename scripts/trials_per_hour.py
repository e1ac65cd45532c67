"""Trials per hour of `scripts/tune.py`: start WORKERS copies of it on one fresh study, stop them once it holds
N finished trials (complete or pruned, the diverged among them), and print one JSON line.

    python scripts/trials_per_hour.py --workers 1 --n-trials 12 -- --trainer.accelerator gpu --pruner none \
        --model.depth 1 --model.width 256 --trainer.max_epochs 3 --fuse 128

The clock runs from launching the first worker to the last trial's finish in the storage: start-up counts, the
report (once per study, however the trials trained) does not. Each worker gets cores / WORKERS threads
(OMP_NUM_THREADS), as docs/scaling.md advises. A temporary SQLite file stands in for PostgreSQL.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402
import sqlalchemy.exc  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from mlp.errors import run_script  # noqa: E402

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--n-trials", type=int, required=True)
    parser.add_argument("--log", help="file for the workers' output (default: discarded)")
    parser.add_argument("tune_flags", nargs=argparse.REMAINDER, help="-- then the flags of every tune.py")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.n_trials < 1:
        parser.error("--workers and --n-trials must be >= 1")
    flags = args.tune_flags[1:] if args.tune_flags[:1] == ["--"] else args.tune_flags
    # The study watched is this script's: workers told to use another would seem to finish no trial.
    if own := [flag for flag in flags if flag.split("=")[0] in ("--storage", "--study-name", "--n-trials")]:
        parser.error(f"{own[0].split('=')[0]} is trials_per_hour.py's to set (it times a fresh study of --n-trials); "
                     "leave it out after --")
    with tempfile.TemporaryDirectory() as logs, open(args.log or os.devnull, "w") as log:
        # Named: tune.py on several devices (--trainer.devices 2) would take a journal file by default.
        storage = f"sqlite:///{logs}/tune/optuna.db"
        command = [sys.executable, str(Path(__file__).with_name("tune.py")), "--quiet", "--study-name", "tph",
                   "--storage", storage, "--n-trials", str(args.n_trials),
                   f"--trainer.logger.init_args.save_dir={logs}", *flags]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.workers))}
        launched = time.time()
        workers, trials = [], []
        try:
            for i in range(args.workers):
                workers.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                start_new_session=True))
                if i == 0 and args.workers > 1:
                    time.sleep(3)  # the first worker creates the SQLite tables; docs/scaling.md, "Starting at once"
            while sum(t.state in FINISHED for t in trials) < args.n_trials and any(w.poll() is None for w in workers):
                time.sleep(1)
                try:
                    trials = optuna.load_study(study_name="tph", storage=storage).get_trials(deepcopy=False)
                except (KeyError, sqlalchemy.exc.SQLAlchemyError):  # the study or its tables are not there yet
                    continue
        finally:  # also on Ctrl-C, which the workers' own sessions do not get: none is left running
            for worker in workers:
                if worker.poll() is None:
                    os.killpg(worker.pid, signal.SIGKILL)
    finished = [t for t in trials if t.state in FINISHED]
    if not finished:
        sys.exit(f"tune.py finished no trial; run it with these flags alone to see why: {' '.join(flags)}")
    last = max(t.datetime_complete.timestamp() for t in finished)
    row = {"workers": args.workers, "finished": len(finished),
           "pruned_or_diverged": sum(t.state == TrialState.PRUNED for t in finished),
           "failed": sum(t.state == TrialState.FAIL for t in trials), "seconds": round(last - launched, 2),
           "trials_per_hour": round(len(finished) / (last - launched) * 3600, 1), "tune_flags": flags}
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    run_script(main, interrupted="the workers were stopped; nothing was kept", writes_with="--log")
