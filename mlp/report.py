"""The study's final report: what was chosen, on what, at what cost, and one test figure for the answer."""

import json
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mlp.budget import AFTER_REFITS_SECONDS, Budget
from mlp.errors import UserError, check
from mlp.final import ensemble, refit_done, refit_ensemble, refit_trials, trial_run
from mlp.module import MLPClassifier
from mlp.net import MLP

# Also the order of fallbacks when the chosen one has no test figure.
FINAL_CHOICES = ("refit_ensemble", "ensemble", "refit", "best")


def epochs_trained(study: optuna.Study) -> int:
    """Epochs trained across every trial, pruned and failed ones included, as each trial counted them."""
    return sum(t.user_attrs.get("epochs_trained", 0) for t in study.get_trials(deepcopy=False))


DEFAULT_NET_MULTIPLY_ADDS = MLP(784, depth=2, width=512).multiply_adds()  # fit.py's 784-512-512-10
DEFAULT_TRAIN_IMAGES = 55_000  # fit.py's training split: 60,000 less the 5,000 validation images


def cost(study: optuna.Study) -> dict[str, float]:
    """The study's training cost in epochs of fit.py's default net (each trial's epochs weighted by its net's
    multiply-adds per example), so studies on different machines compare; and in busy wall seconds."""
    model_epochs = sum(
        t.user_attrs.get("epochs_trained", 0) * t.user_attrs.get("multiply_adds", 0)
        for t in study.get_trials(deepcopy=False)
    ) / DEFAULT_NET_MULTIPLY_ADDS
    return {"default_net_epochs": round(model_epochs, 3), "busy_wall_seconds": round(busy_wall_seconds(study), 1)}


def busy_wall_seconds(study: optuna.Study) -> float:
    """Wall-clock seconds during which at least one trial of the study was running: the union of the finished
    trials' intervals. Trials trained together (--fuse, or several workers) count once, so the figure compares
    across --fuse, where a sum of trial durations would count K stacked trials K times."""
    intervals = sorted(
        (t.datetime_start, t.datetime_complete)
        for t in study.get_trials(deepcopy=False) if t.datetime_start and t.datetime_complete
    )
    seconds, covered_to = 0.0, None
    for start, end in intervals:
        if covered_to is not None and start < covered_to:
            start = covered_to
        if end > start:
            seconds += (end - start).total_seconds()
        covered_to = end if covered_to is None else max(covered_to, end)
    return seconds


def test_best(study: optuna.Study) -> float:
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
    cli = trial_run(best, "best_trial_test")  # its own data settings, whatever today's flags
    # The checkpoint carries the trial's hyperparameters, so it rebuilds the trial's net by itself.
    model = MLPClassifier.load_from_checkpoint(checkpoint, weights_only=True)  # tensors and plain values only
    (results,) = cli.trainer.test(model, datamodule=cli.datamodule)
    study.set_user_attr("test_trial", best.number)
    study.set_user_attr("test_acc", results["test/acc"])
    return results["test/acc"]


def write_plots(study: optuna.Study, log_dir: Path) -> list[str]:
    """The study's plots as TensorBoard images (tag study/<name>) and PNG files; returns the names written."""
    import matplotlib.image
    from matplotlib import pyplot
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
            png = log_dir / f"{name}.png"
            figure.savefig(png, bbox_inches="tight")
            pyplot.close(figure)
            # The PNG, not the figure: drawing a figure costs more than reading its PNG back (add_figure draws again).
            image = matplotlib.image.imread(png)[..., :3]
            writer.add_image(f"study/{name}", image, global_step=len(study.trials), dataformats="HWC")
            written.append(name)
    return written


def best_checkpoint(study: optuna.Study) -> dict[str, Any]:
    result = {"what": "the best trial's best checkpoint (by val/acc)", "val_acc": study.best_value}
    try:
        return {**result, "test_acc": test_best(study)}
    except UserError as error:  # its checkpoint is missing
        return {**result, "test_acc": None, "why_no_test": str(error)}


def refit_best(study: optuna.Study, budget: Budget) -> dict[str, Any]:
    result = {"what": "the best trial's configuration refit", "test_acc": None}
    best = study.best_trial
    if not refit_done(study, best.number) and (why := over_budget(budget, [best], fuse=1)):
        return {**result, "why_no_test": why}
    try:
        return refit_trials(study, [best.number], fuse=1)[0]
    except UserError as error:  # its configuration is missing
        return {**result, "why_no_test": str(error)}


def over_budget(budget: Budget, trials: list[FrozenTrial], fuse: int | None = None) -> str | None:
    """Why refitting `trials` does not fit in the time left, or None if it does."""
    needed, left = budget.refit_seconds(trials, fuse), budget.left() - AFTER_REFITS_SECONDS
    if needed <= left:
        return None
    return f"its refits would take about {needed:.0f} s and {max(left, 0):.0f} s of --timeout were left for them"


def affordable_ensemble(study: optuna.Study, averaged: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """The ensemble to refit: `averaged`'s, or, when its refits do not fit in the budget, the largest smaller one
    (the k best trials) whose refits do; with none, no members (and why).

    The largest, not the best on val: between ensembles of a few checkpoints val differs by a few thousandths,
    inside the noise of 5,000 images, while every refit member added averages away more of one training run's
    luck; and the reserve kept time for the refits of the best trials while they ran (`mlp.budget`)."""
    if not averaged.get("trials"):
        return averaged
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    candidates = averaged["candidates"]

    def untrained(k: int) -> list[FrozenTrial]:
        return [by_number[n] for n in candidates[:k] if not refit_done(study, n)]

    whole = over_budget(budget, untrained(averaged["k"]))
    if whole is None:
        return averaged
    for k in range(averaged["k"] - 1, 0, -1):
        if over_budget(budget, untrained(k)) is None:
            why = f"the ensemble of {averaged['k']} chosen on val: {whole}"
            return {**averaged, "k": k, "trials": candidates[:k], "smaller_than": why}
    return {**averaged, "trials": [], "why_none": over_budget(budget, untrained(1))}


def final_models(study: optuna.Study, answer: str, budget: Budget) -> dict[str, Any]:
    """Every candidate final model with its val and test figures, and the answer: `answer` if it could be
    tested, else the first of FINAL_CHOICES that could. A val figure never stands in for a test figure.
    With budget.fuse > 1 the refits train as stacks, as the trials did; a refit that would overrun the budget
    is not trained (see affordable_ensemble), and its candidate says why it has no test figure. The answer's
    refits go first."""
    averaged = ensemble(study)
    makers = {
        "refit_ensemble": lambda: refit_ensemble(study, affordable_ensemble(study, averaged, budget), budget.fuse),
        "ensemble": lambda: averaged,
        "refit": lambda: refit_best(study, budget),
        "best": lambda: best_checkpoint(study),
    }
    made = {name: makers[name]() for name in dict.fromkeys((answer, *FINAL_CHOICES))}
    candidates = {name: made[name] for name in FINAL_CHOICES}
    tested = [name for name in (answer, *FINAL_CHOICES) if candidates[name]["test_acc"] is not None]
    chosen = tested[0] if tested else None
    summary = {"answer": chosen, "test_acc": candidates[chosen]["test_acc"] if chosen else None, **candidates}
    if chosen != answer:
        summary["fallback"] = f"{answer} has no test figure ({candidates[answer]['why_no_test']}); answering with {chosen}"
    return summary


def refits_cost(study: optuna.Study) -> float:
    """The final models' refits, in epochs of fit.py's default net on its default 55,000 training images."""
    refits = [value for key, value in study.user_attrs.items() if key.startswith("refit_") and key[6:].isdigit()]
    work = sum(r["epochs"] * r["multiply_adds"] * r["train_images"] for r in refits)
    return work / (DEFAULT_NET_MULTIPLY_ADDS * DEFAULT_TRAIN_IMAGES)


def report(study: optuna.Study, log_dir: Path, wall_seconds: float, answer: str, budget: Budget) -> dict[str, Any]:
    """Summarise the study, pick and test its final model once, write report.json and the plots."""
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    summary: dict[str, Any] = {
        "study": study.study_name,
        "trials": {name: n for name, n in counts.items() if n},
        "epochs_trained": epochs_trained(study),
        "cost": cost(study),
        "wall_seconds_this_run": round(wall_seconds, 1),
        "fuse_this_run": budget.fuse,
        # Trials that ended early, and why: diverged or cut (pruned), or skipped (failed) for the --timeout budget.
        **{how: {str(t.number): t.user_attrs[how] for t in trials if how in t.user_attrs}
           for how in ("diverged", "cut", "skipped")},
    }
    if counts["complete"]:
        best = study.best_trial
        summary.update(
            best_trial=best.number,
            best_params=best.params,
            best_val_acc=best.value,
            best_checkpoint=best.user_attrs["best_checkpoint"],
        )
        summary["final"] = final_models(study, answer, budget)
        summary["test_acc"] = summary["final"]["test_acc"]
        summary["cost"]["refits_default_net_epochs"] = round(refits_cost(study), 3)
    summary["plots"] = write_plots(study, log_dir)
    summary["report_json"] = str(log_dir / "report.json")
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
