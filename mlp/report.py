"""The study's final report: what was chosen, on what, at what cost, and one test figure for the answer."""

import json
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from mlp.cli import build_cli
from mlp.errors import check
from mlp.module import MLPClassifier
from mlp.search import trial_args


def epochs_trained(study: optuna.Study) -> int:
    """Epochs trained across every trial, pruned and failed ones included, as each trial counted them."""
    return sum(t.user_attrs.get("epochs_trained", 0) for t in study.get_trials(deepcopy=False))


def test_best(study: optuna.Study, fit_args: list[str]) -> float:
    """Test accuracy of the best trial's best checkpoint, measured once per best trial and kept in the study."""
    best = study.best_trial
    if study.user_attrs.get("test_trial") == best.number:
        return study.user_attrs["test_acc"]
    checkpoint = best.user_attrs["best_checkpoint"]
    check(
        Path(checkpoint).is_file(),
        f"the best trial's checkpoint {checkpoint} is not on this machine; worker {best.user_attrs.get('worker')} "
        "trained it: run the same command on that host, or share the log folder between machines",
    )
    cli = build_cli(trial_args(fit_args, {}, study.study_name, "best_trial_test"))
    # The checkpoint carries the trial's hyperparameters, so it rebuilds the trial's net by itself.
    model = MLPClassifier.load_from_checkpoint(checkpoint)
    (results,) = cli.trainer.test(model, datamodule=cli.datamodule)
    study.set_user_attr("test_trial", best.number)
    study.set_user_attr("test_acc", results["test/acc"])
    return results["test/acc"]


def write_plots(study: optuna.Study, log_dir: Path) -> list[str]:
    """The study's plots as TensorBoard images (tag study/<name>) and PNG files; returns the names written."""
    from optuna.visualization import matplotlib as plots
    from torch.utils.tensorboard import SummaryWriter

    makers = {
        "optimization_history": plots.plot_optimization_history,
        "param_importances": plots.plot_param_importances,
        "parallel_coordinate": plots.plot_parallel_coordinate,
        "intermediate_values": plots.plot_intermediate_values,
    }
    written = []
    log_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), SummaryWriter(str(log_dir / "study")) as writer:
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, make in makers.items():
            try:
                axes = make(study)
            except (ValueError, RuntimeError):  # e.g. importances need two finished trials
                continue
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.set_size_inches(10, 6)
            figure.savefig(log_dir / f"{name}.png", bbox_inches="tight")
            writer.add_figure(f"study/{name}", figure, global_step=len(study.trials))
            written.append(name)
    return written


def report(study: optuna.Study, fit_args: list[str], log_dir: Path, wall_seconds: float) -> dict[str, Any]:
    """Summarise the study, test its best checkpoint once, write report.json and the plots."""
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    summary: dict[str, Any] = {
        "study": study.study_name,
        "trials": {name: n for name, n in counts.items() if n},
        "epochs_trained": epochs_trained(study),
        "wall_seconds_this_run": round(wall_seconds, 1),
        "diverged": {str(t.number): t.user_attrs["diverged"] for t in trials if "diverged" in t.user_attrs},
    }
    if counts["complete"]:
        best = study.best_trial
        summary.update(
            best_trial=best.number,
            best_params=best.params,
            best_val_acc=best.value,
            best_checkpoint=best.user_attrs["best_checkpoint"],
            test_acc=test_best(study, fit_args),
        )
    summary["plots"] = write_plots(study, log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
