"""The study's final report: what was chosen, on what, at what cost, and one test figure for the answer."""

import json
import time
import warnings
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from optuna.trial import FrozenTrial, TrialState

from mlp.budget import Budget
from mlp.data import TRAIN_IMAGES, FashionMNISTDataModule
from mlp.errors import UserError
from mlp.final import all_refits, final_models, refit_recipe
from mlp.module import MLPClassifier
from mlp.records import TrialRecord
from mlp.study import FINISHED


@cache
def default_net_multiply_adds() -> int:
    """Multiply-adds per example of fit.py's default net, the unit of cost; on the meta device, drawing no weights."""
    with torch.device("meta"):
        return MLPClassifier().net.multiply_adds()


DEFAULT_TRAIN_IMAGES = TRAIN_IMAGES - FashionMNISTDataModule().hparams.val_size


def cost(study: optuna.Study) -> dict[str, float]:
    """The study's training cost in epochs of fit.py's default net (each trial's epochs weighted by its net's
    multiply-adds per example), so studies on different machines compare; and in busy wall seconds."""
    records = [TrialRecord.of(t) for t in study.get_trials(deepcopy=False)]
    model_epochs = sum(r.epochs_trained * r.multiply_adds for r in records) / default_net_multiply_adds()
    return {"default_net_epochs": round(model_epochs, 3), "busy_wall_seconds": round(busy_wall_seconds(study), 1)}


def busy_wall_seconds(study: optuna.Study) -> float:
    """Wall seconds during which a trial of the study ran, the union of the finished trials' intervals: trials trained
    together (--fuse, several workers) count once, where a sum of durations would count K stacked trials K times."""
    intervals = sorted((t.datetime_start, t.datetime_complete) for t in study.get_trials(deepcopy=False)
                       if t.datetime_start and t.datetime_complete)
    seconds, covered_to = 0.0, intervals[0][0] if intervals else None
    for start, end in intervals:
        seconds += max((end - max(start, covered_to)).total_seconds(), 0.0)
        covered_to = max(covered_to, end)
    return seconds


OUTCOMES = ("running", "waiting", "complete", "pruned", "fail", "skipped (budget)", "surplus")  # see outcome


def outcome(trial: FrozenTrial) -> str:
    """The trial's state, or why a failed one was none: it would not have fitted the --timeout budget (it is failed,
    not pruned, so that the sampler learns nothing from it), or the study had no place left for it."""
    record = TrialRecord.of(trial)
    if trial.state == TrialState.FAIL and not record.counts_as_failure:
        return "skipped (budget)" if record.skipped else "surplus"
    return trial.state.name.lower()


def write_plots(study: optuna.Study, log_dir: Path) -> list[str]:
    """The study's plots as TensorBoard images (tag study/<name>) and PNG files; returns the names written."""
    import matplotlib.image
    from matplotlib import pyplot
    from optuna.visualization import matplotlib as plots
    from torch.utils.tensorboard import SummaryWriter

    written = []
    # Without a complete trial only the pruned ones' curves have something to show, and without a curve nothing does
    # (the others plot empty axes, and Optuna and matplotlib warn about each).
    of_complete = (plots.plot_optimization_history, plots.plot_param_importances, plots.plot_parallel_coordinate)
    trials = study.get_trials(deepcopy=False)
    complete = any(t.state == TrialState.COMPLETE for t in trials)
    curves = any(t.intermediate_values for t in trials)
    with warnings.catch_warnings(), SummaryWriter(str(log_dir / "study")) as writer:
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # A range of one value (--epochs 5 5) is one axis of no height, which matplotlib widens saying so.
        warnings.filterwarnings("ignore", message="Attempting to set identical low and high ylims")
        for plot in (*(of_complete if complete else ()), *[plots.plot_intermediate_values][:curves]):
            name = plot.__name__.removeprefix("plot_")
            try:
                axes = plot(study)
            except (ValueError, RuntimeError):  # e.g. importances need two finished trials
                continue
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.set_size_inches(10, 6)
            png = log_dir / f"{name}.png"
            figure.savefig(png, bbox_inches="tight")
            pyplot.close(figure)
            # The PNG, not the figure: drawing a figure costs more than reading its PNG back (add_figure draws again).
            image = matplotlib.image.imread(png)[..., :3]
            writer.add_image(f"study/{name}", image, global_step=len(study.trials), dataformats="HWC")
            written.append(name)
    return written


def refits_cost(study: optuna.Study) -> float:
    """The final models' refits, in epochs of fit.py's default net on its default training split."""
    work = sum(r["epochs"] * r["multiply_adds"] * r["train_images"] for r in all_refits(study))
    return work / (default_net_multiply_adds() * DEFAULT_TRAIN_IMAGES)


def write_recipe(trial: FrozenTrial, study_name: str, log_dir: Path) -> str | None:
    """best_config.yaml: the best trial's configuration refit on all training images, as a `fit.py --config` file
    (the final model `refit`); None where the trial's config is on another machine."""
    try:
        recipe = yaml.safe_dump(refit_recipe(trial), sort_keys=False)
    except UserError:
        return None
    path = log_dir / "best_config.yaml"
    header = f"# Trial {trial.number} of study {study_name}, chosen on validation, refit on all training images:\n"
    path.write_text(f"{header}#   python scripts/fit.py --config {path.name}\n{recipe}")
    return str(path)


def report(study: optuna.Study, log_dir: Path, started: float, answer: str, budget: Budget, n_trials: int
           ) -> dict[str, Any]:
    """Summarise the study, pick and test its final model once, write report.json and the plots; `started`: the
    command's start, by time.time()."""
    log_dir.mkdir(parents=True, exist_ok=True)  # for best_config.yaml, the plots and report.json
    trials = study.get_trials(deepcopy=False)
    counts = Counter(outcome(t) for t in trials)
    summary: dict[str, Any] = {
        "study": study.study_name,
        "trials": {name: counts[name] for name in OUTCOMES if counts[name]},
        "epochs_trained": sum(TrialRecord.of(t).epochs_trained for t in trials),  # pruned and failed ones too
        "cost": cost(study),
        "fuse_this_run": budget.fuse,
        # Places of --n-trials with no finished trial: only where --timeout ended the study (else run_trials goes on).
        "unfinished": max(0, n_trials - sum(t.state in FINISHED for t in trials)),
        # Trials that ended early, and why: diverged or cut (pruned), or skipped (failed) for the --timeout budget.
        **{how: {str(t.number): why for t in trials if (why := getattr(TrialRecord.of(t), how))}
           for how in ("diverged", "cut", "skipped")},
    }
    if counts["complete"]:
        best = study.best_trial
        summary.update(best_trial=best.number, best_params=best.params, best_val_acc=best.value,
                       best_checkpoint=TrialRecord.of(best).best_checkpoint,
                       best_config=write_recipe(best, study.study_name, log_dir))
        summary["final"] = final_models(study, answer, budget)
        summary["test_acc"] = summary["final"]["test_acc"]
        summary["cost"]["refits_default_net_epochs"] = round(refits_cost(study), 3)
    summary["plots"] = write_plots(study, log_dir)
    summary["report_json"] = str(log_dir / "report.json")
    summary["wall_seconds_this_run"] = round(time.time() - started, 1)
    (log_dir / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
