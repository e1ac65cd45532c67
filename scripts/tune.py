"""Search learning rate, epochs, depth, width, weight decay, dropout and label smoothing jointly with Optuna
(TPE + pruning).

    python scripts/tune.py                                  # the default study, resumable
    python scripts/tune.py --n-trials 40 --timeout 600 --pruner hyperband
    python scripts/tune.py --fuse 8                         # 8 trials at a time, as stacked networks
    python scripts/tune.py --trainer.accelerator gpu        # as many trials at a time as the GPU holds, up to 128
    python scripts/tune.py --lr 0.01 1 --depth 1 4 --data.data_dir PATH --trainer.accelerator gpu
    python scripts/tune.py @search.txt                      # flags read from a file, as a shell reads them
    python scripts/tune.py --storage postgresql+psycopg://USER:PASS@HOST/DB   # on each of several machines
    python scripts/tune.py --storage study.journal          # each of several workers on one machine
    python scripts/tune.py --quiet                          # print only the answer, in a few lines

In a terminal a progress bar counts the study's finished trials (every worker's), with pruned and failed
counts and the best val/acc so far; Optuna's one line per finished trial is written above it.

Flags this script does not know are fit flags (see `python scripts/fit.py --help`) and apply to every trial.
Choices are made on the validation split. At the end, the worker that finishes the study's last trial tests each
final model once (an ensemble of the best checkpoints, the same configurations refit on all training images and
averaged, a refit of the best configuration, the best checkpoint) and reports the one --final names.
"""

import argparse
import json
import shlex
import sys
from dataclasses import fields, replace
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlp.errors import exit_saying, run_script  # noqa: E402

try:  # torch and Lightning take seconds to import, before run_script says what Ctrl-C did
    from mlp.final import FINAL_CHOICES
    from mlp.progress import study_output
    from mlp.search import CHOICES, FIT_FLAGS, SPACES, SearchSpace
    from mlp.tune import StudyConfig, run_study
except KeyboardInterrupt:
    exit_saying("interrupted: nothing was started yet; run the same command again")


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    defaults = StudyConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     fromfile_prefix_chars="@")
    # @FILE's lines as a shell reads them ("--n-trials 40", quotes, # comments), not each line one argument.
    parser.convert_arg_line_to_args = partial(shlex.split, comments=True)
    study = parser.add_argument_group("study")
    study.add_argument("--n-trials", type=int, default=defaults.n_trials,
                       help=f"finished trials the study should hold (default {defaults.n_trials})")
    study.add_argument("--timeout", type=float, default=defaults.timeout, metavar="SECONDS",
                       help="the whole command ends within this many seconds after start-up, the final model's refits, "
                       "its test and the plots included: trials stop in time to leave the final model what it needs, "
                       "estimated from the trials' own times, and the refits that do not fit are not trained (the "
                       "report says so)")
    study.add_argument("--study-name", default=defaults.study_name,
                       help=f"name of the study in the storage (default {defaults.study_name})")
    study.add_argument("--storage", default=defaults.storage, metavar="URL_OR_PATH",
                       help="an Optuna RDB URL (postgresql+psycopg://USER@HOST/DB for several machines), or a path "
                       "without :// for a journal file (several workers on one machine). Default: the study already in "
                       "lightning_logs/tune/, else optuna.journal there for several workers (--trainer.devices N), "
                       "sqlite:///.../optuna.db for one")
    study.add_argument("--pruner", choices=["median", "hyperband", "none"], default=defaults.pruner,
                       help=f"early stopping of trials (default {defaults.pruner})")
    study.add_argument("--sampler-seed", type=int, default=defaults.sampler_seed,
                       help=f"seed of the TPE sampler (default {defaults.sampler_seed})")
    study.add_argument("--quiet", action="store_true", help="no bar, no line per trial: print only the answer, its "
                       "test figure, the best trial and where the whole report (report.json) is")
    study.add_argument("--fuse", type=fuse_count, default=defaults.fuse, metavar="K",
                       help="train up to K trials at once in one Trainer as stacked networks (per depth on a GPU, per "
                       "depth and width on the CPU), each freed place taken by the next trial; 1 trains one at a "
                       "time. Default auto: on the CPU 8 when every trial has the same width, else 1; on a GPU as "
                       "many as fit, up to 128; either way at most a quarter of --n-trials, so that TPE learns from "
                       "finished trials")
    study.add_argument("--final", choices=FINAL_CHOICES, default=defaults.final,
                       help="the answer the report tests and gives: the k best checkpoints averaged (k chosen on val) "
                       "with their configurations refit on train + val (refit_ensemble, the default), or not refit "
                       "(ensemble); the best configuration refit; or the best checkpoint. All four are in report.json")
    space = parser.add_argument_group("search space (inclusive ranges, or the values tried)")
    space.add_argument("--space", choices=SPACES, default="default",
                       help="the ranges searched, before the flags below change them: default, or wide (--epochs 5 "
                       "200, --width 128 2048, --augment-shift 0 3, --augment-flip 0 0.5, --batch-norm false true): "
                       "what the best published MLPs train with, for budgets of hours (docs/tuning.md)")
    wide = SearchSpace.preset("wide")
    for field in fields(SearchSpace):
        default, low = getattr(defaults.space, field.name), getattr(wide, field.name)[0]
        ranged = field.name not in CHOICES
        shape = {"nargs": 2, "metavar": ("LOW", "HIGH")} if ranged else {"nargs": "+", "metavar": "VALUE"}
        kind = true_or_false if isinstance(low, bool) else type(low)
        space.add_argument(f"--{field.name.replace('_', '-')}", type=kind, **shape,
                           help=f"default {' '.join(map(str, default)) if default else 'not searched'}; a fit flag "
                           f"setting it (--{FIT_FLAGS[field.name]}) pins it instead")
    try:
        return parser.parse_known_args(argv)
    except ValueError as error:  # an @FILE that is no text (UnicodeDecodeError), or a quote left open in it
        parser.error(f"cannot read the flags of an @FILE: {error}")


def true_or_false(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"true or false, got {text!r}")
    return text.lower() == "true"


def fuse_count(text: str) -> int | str:
    try:
        return text if text == "auto" else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"K is a whole number of trials or auto, got {text!r}") from None


def main(argv: list[str] | None = None) -> dict | None:
    options, fit_args = parse(argv)
    # Ranges left unset keep the --space preset's; run_study needs to know which were given.
    given = {field.name: tuple(getattr(options, field.name)) for field in fields(SearchSpace)
             if getattr(options, field.name) is not None}
    space = replace(SearchSpace.preset(options.space), **given)
    with study_output(options.n_trials, options.quiet) as progress:
        config = StudyConfig(fit_args, space, frozenset(given), options.study_name, options.storage, options.n_trials,
                             options.timeout, options.pruner, options.sampler_seed, options.fuse, options.final)
        summary = run_study(config, progress)
    if isinstance(summary, str):  # another worker writes the report
        print(summary)
        return None
    print("\n".join(short_summary(summary)) if options.quiet else json.dumps(summary, indent=2))
    return summary


def short_summary(summary: dict) -> list[str]:
    """--quiet's lines: the answer and its test figure, the best trial, and where the whole report is."""
    counts = ", ".join(f"{n} {state}" for state, n in summary["trials"].items()) or "no trial"
    short = f"; --timeout left {summary['unfinished']} of --n-trials unfinished" if summary["unfinished"] else ""
    lines = [f"study {summary['study']}: {counts}{short}"]
    if "best_trial" in summary:
        final, answer = summary["final"], summary["final"]["answer"]
        figure = "no test figure" if answer is None else f"test accuracy {final['test_acc']:.4f}"
        lines.append(f"answer: {answer or final.get('fallback', 'none')} ({figure})")
        params = ", ".join(f"{name}={value if isinstance(value, bool) else format(value, '.4g')}"
                           for name, value in summary["best_params"].items())
        lines.append(f"best trial: {summary['best_trial']}, val accuracy {summary['best_val_acc']:.4f} ({params})")
    else:
        ran_out = len(summary["cut"]) + summary["unfinished"]  # the skipped trials among the unfinished places
        why = f": --timeout cut or skipped {ran_out} trial{'s' * (ran_out > 1)}; give it more seconds"
        lines.append(f"no trial completed, so there is no answer{why if ran_out else ''}")
    lines.append(f"report: {summary['report_json']}")
    return lines


if __name__ == "__main__":
    run_script(main, interrupted="the study is saved; run the same command again to continue it")
