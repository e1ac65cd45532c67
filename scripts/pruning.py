"""Whether a study's pruner is fair to slow starters: trials with and without augmentation (or batch norm), pruned
at the same fraction of their schedules, and how far behind early the trials that finished were.

    python scripts/pruning.py --study-name mlp                  # tune.py's default storage, lightning_logs/tune
    python scripts/pruning.py --storage sqlite:///PATH/optuna.db --study-name wide --by batch_norm

For each tenth of the trials' schedules (where they report val/acc), by group: how many trials reached it and were
pruned there, and the completed trials' mean rank there (a percentile, 100 the best) against theirs at the end. A
group that ends higher than it starts is a slow starter, and a rule that prunes early prunes it for that.
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from mlp.errors import UserError, check, run_script  # noqa: E402
from mlp.search import REPORT_EVERY, SCHEDULE_STEPS  # noqa: E402
from mlp.study import connect  # noqa: E402
from mlp.tune import default_storage  # noqa: E402

GROUPS = {  # a trial's group from its searched hyperparameters: what is pinned is the same for every trial
    "augmentation": lambda p: p.get("augment_shift", 0) >= 1 or p.get("augment_flip", 0) >= 0.1,
    "batch_norm": lambda p: bool(p.get("batch_norm", False)),
}


def percentile(value: float, values: list[float]) -> float:
    """The share of `values` below `value`, ties counted half, in percent."""
    return 100 * sum((v < value) + 0.5 * (v == value) for v in values) / len(values)


def fairness(trials: list[FrozenTrial], by: str) -> str:
    """The Markdown table of the module docstring, for the trials grouped by `by`."""
    group = {t.number: GROUPS[by](t.params) for t in trials}
    final = {t.number: t.value for t in trials if t.state == TrialState.COMPLETE}
    final_rank = {n: percentile(v, list(final.values())) for n, v in final.items()}
    rows = [f"| step (% of schedule) | with {by}: reached / pruned there | without: reached / pruned there | "
            "completed trials' mean rank there, then at the end: with | without |", "|---|---|---|---|---|"]
    for step in range(REPORT_EVERY, SCHEDULE_STEPS + 1, REPORT_EVERY):
        at = {t.number: t.intermediate_values[step] for t in trials if step in t.intermediate_values}
        pruned = {t.number for t in trials if t.state == TrialState.PRUNED and max(t.intermediate_values) == step}
        finished_there = [at[n] for n in at if n in final]
        reached = [[n for n in at if group[n] == flag] for flag in (True, False)]
        cells = [f"{len(numbers)} / {sum(n in pruned for n in numbers)}" for numbers in reached]
        for flag in (True, False):
            ranks = [(percentile(at[n], finished_there), final_rank[n]) for n in at if n in final and group[n] == flag]
            cells.append(f"{statistics.mean(r for r, _ in ranks):.0f} then {statistics.mean(f for _, f in ranks):.0f}"
                         if ranks else "none")
        rows.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study-name", default="mlp")
    parser.add_argument("--storage", help="the study's storage (default: tune.py's, in lightning_logs/tune)")
    parser.add_argument("--by", choices=sorted(GROUPS), default="augmentation", help="what groups the trials")
    parser.add_argument("--first-trial", type=int, default=0,
                        help="only trials numbered from this on (a study continued under another rule)")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = args.storage or default_storage(Path("lightning_logs/tune"), 1, args.study_name)
    local = storage.removeprefix("sqlite:///")
    check("://" in local or Path(local).exists(), f"no study storage at {local}: give the study's --storage")
    try:
        study = optuna.load_study(study_name=args.study_name, storage=connect(storage))
    except KeyError:  # Optuna's "Record does not exist"
        raise UserError(f"no study named {args.study_name!r} in {local}: give its --study-name") from None
    trials = [t for t in study.trials if t.number >= args.first_trial
              and t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.intermediate_values]
    print(fairness(trials, args.by))


if __name__ == "__main__":
    run_script(main, interrupted="nothing was written", writes_with=None)
