"""Joint hyperparameter search with Optuna: search space, objective, pruning, the study and its final report.

Each trial is an ordinary fit run built by `mlp.cli.build_cli` from the user's fit flags plus the trial's
suggestions, so a trial trains exactly what `scripts/fit.py` with the same flags would train.
"""

import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from optuna_integration import PyTorchLightningPruningCallback

from mlp.cli import MLPCLI, build_cli, divergence_message, fit
from mlp.data import locate_fashion_mnist
from mlp.errors import UserError, check
from mlp.module import MLPClassifier

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# A worker that dies leaves its trial RUNNING; once its heartbeat is older than the grace period, the next
# trial to start marks it failed and enqueues its parameters again.
HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 30


@dataclass
class SearchSpace:
    """Ranges searched jointly; lr, width and weight_decay on a log scale. Bounds are inclusive."""

    lr: tuple[float, float] = (0.02, 0.5)
    epochs: tuple[int, int] = (5, 40)
    depth: tuple[int, int] = (1, 3)
    width: tuple[int, int] = (128, 1024)
    weight_decay: tuple[float, float] = (1e-5, 3e-3)
    dropout: tuple[float, float] = (0.0, 0.5)

    def validate(self) -> None:
        for name, (low, high) in asdict(self).items():
            check(low <= high, f"--{name.replace('_', '-')}: the low bound {low} is above the high bound {high}")
        check(self.lr[0] > 0, f"--lr: the range must be positive, got {self.lr}")
        check(self.weight_decay[0] > 0, f"--weight-decay: the range must be positive (log scale), got {self.weight_decay}")
        check(self.epochs[0] >= 1, f"--epochs: at least 1 epoch, got {self.epochs}")
        check(self.depth[0] >= 0, f"--depth: at least 0 hidden layers, got {self.depth}")
        check(self.width[0] >= 1, f"--width: at least 1 unit, got {self.width}")
        check(0 <= self.dropout[0] and self.dropout[1] < 1, f"--dropout: probabilities in [0, 1), got {self.dropout}")


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """The trial's hyperparameters, as fit flags."""
    return {
        "model.lr": trial.suggest_float("lr", *space.lr, log=True),
        "trainer.max_epochs": trial.suggest_int("epochs", *space.epochs),
        "model.depth": trial.suggest_int("depth", *space.depth),
        "model.width": trial.suggest_int("width", *space.width, log=True),
        "model.weight_decay": trial.suggest_float("weight_decay", *space.weight_decay, log=True),
        "model.dropout": trial.suggest_float("dropout", *space.dropout),
    }


def trial_args(fit_args: list[str], flags: dict[str, Any], study_name: str, version: str) -> list[str]:
    """The fit command line of one trial: the user's fit flags, then the trial's, then where it logs."""
    return [
        *fit_args,
        *(f"--{key}={value}" for key, value in flags.items()),
        f"--trainer.logger.init_args.name=tune/{study_name}",
        f"--trainer.logger.init_args.version={version}",
        "--trainer.enable_model_summary=false",
        "--progress_bar.refresh_rate=0",
    ]


class Objective:
    """Trains one trial and returns its best val/acc; the test set is never touched here."""

    def __init__(self, space: SearchSpace, fit_args: list[str], study_name: str) -> None:
        self.space, self.fit_args, self.study_name = space, fit_args, study_name
        self.interrupted = False

    def __call__(self, trial: optuna.Trial) -> float:
        args = trial_args(self.fit_args, suggest(trial, self.space), self.study_name, f"trial_{trial.number}")
        cli = build_cli(args)
        trainer = cli.trainer
        trainer.callbacks.append(PyTorchLightningPruningCallback(trial, monitor="val/acc"))
        trial.set_user_attr("log_dir", trainer.log_dir)
        try:
            fit(cli)
        except optuna.TrialPruned:
            if not divergence_message(trainer):
                raise
        except KeyboardInterrupt:
            # NaN makes Optuna record the trial as failed (without a traceback); the study stops after it.
            self.interrupted = True
            trial.set_user_attr("interrupted", True)
            trial.study.stop()
            return math.nan
        if reason := divergence_message(trainer):
            trial.set_user_attr("diverged", reason)
            raise optuna.TrialPruned(f"diverged in {reason}")
        trial.set_user_attr("best_checkpoint", trainer.checkpoint_callback.best_model_path)
        return trainer.checkpoint_callback.best_model_score.item()


def make_pruner(name: str, space: SearchSpace) -> optuna.pruners.BasePruner:
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=space.epochs[1], reduction_factor=3)
    if name == "median":
        # A trial with a long one-cycle schedule is behind a short one at the same early epoch; five epochs of
        # warm-up keep the pruner from mistaking that for a bad trial.
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=5)
    return optuna.pruners.NopPruner()


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """TPE whose random draws depend only on the seed and the trial's number.

    One seeded TPESampler per process would give every worker started with the same seed the same draws, and
    a rerun would replay the first run's. Trial numbers are unique across workers (the storage assigns them),
    so seeding each trial with seed + number gives distinct, reproducible draws.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.tpe = self.tpe_for(0)

    def tpe_for(self, number: int) -> optuna.samplers.TPESampler:
        # constant_liar: another worker's RUNNING trial counts as a bad result, so TPE does not pile onto it.
        return optuna.samplers.TPESampler(
            seed=self.seed + number, n_startup_trials=5, multivariate=True, constant_liar=True
        )

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.tpe = self.tpe_for(trial.number)
        self.tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.tpe.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self.tpe.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self.tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self.tpe.after_trial(study, trial, state, values)


def open_study(study_name: str, storage_url: str, pruner: str, space: SearchSpace, seed: int) -> optuna.Study:
    """Create the study, or load it if it exists, so that rerunning the same command continues it."""
    if storage_url.startswith("sqlite:///"):
        Path(storage_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = RDBStorage(
                storage_url,
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=GRACE_SECONDS,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
    except Exception as error:  # SQLAlchemy raises many kinds for a bad URL or an unreachable server
        raise UserError(f"cannot open the study storage {storage_url!r}: {error}") from None
    return optuna.create_study(
        study_name=study_name,
        storage=storage,
        load_if_exists=True,
        direction="maximize",
        sampler=TrialSeededTPE(seed),
        pruner=make_pruner(pruner, space),
    )


def start_from_fit_defaults(study: optuna.Study, cli: MLPCLI, space: SearchSpace) -> None:
    """Make a new study's first trial the configuration fit.py would train with the same flags.

    fit.py's defaults were chosen on the validation split, so the search starts from a known-good point
    instead of spending its first epochs rediscovering it.
    """
    hp = cli.model.hparams
    start = {"lr": hp.lr, "epochs": cli.trainer.max_epochs, "depth": hp.depth, "width": hp.width,
             "weight_decay": hp.weight_decay, "dropout": hp.dropout}
    inside = all(low <= start[name] <= high for name, (low, high) in asdict(space).items())
    if inside and not study.trials:
        study.enqueue_trial(start)


def epochs_trained(study: optuna.Study) -> int:
    """Epochs trained across every trial, pruned and failed ones included: one val/acc report per epoch."""
    return sum(len(t.intermediate_values) for t in study.get_trials(deepcopy=False))


def test_best(study: optuna.Study, fit_args: list[str]) -> float:
    """Test accuracy of the best trial's best checkpoint, measured once per best trial and kept in the study."""
    best = study.best_trial
    if study.user_attrs.get("test_trial") == best.number:
        return study.user_attrs["test_acc"]
    cli = build_cli(trial_args(fit_args, {}, study.study_name, "best_trial_test"))
    # The checkpoint carries the trial's hyperparameters, so it rebuilds the trial's net by itself.
    model = MLPClassifier.load_from_checkpoint(best.user_attrs["best_checkpoint"])
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a worker killed during the last trial left it RUNNING
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


def run_study(
    space: SearchSpace,
    fit_args: list[str],
    study_name: str,
    storage_url: str | None,
    n_trials: int,
    timeout: float | None,
    pruner: str,
    seed: int,
) -> dict[str, Any]:
    """Run trials until the study holds n_trials finished ones (or timeout passes), then report."""
    space.validate()
    check(n_trials >= 1, f"--n-trials must be >= 1, got {n_trials}")
    check(timeout is None or timeout > 0, f"--timeout must be positive seconds, got {timeout}")
    # Build one run from the fit flags before any trial, so a bad flag or missing data stops us here.
    cli = build_cli(fit_args)
    locate_fashion_mnist(cli.datamodule.hparams.data_dir)
    tune_dir = Path(cli.trainer.logger.save_dir) / "tune"
    log_dir = tune_dir / study_name
    storage_url = storage_url or f"sqlite:///{tune_dir / 'optuna.db'}"
    study = open_study(study_name, storage_url, pruner, space, seed)
    start_from_fit_defaults(study, cli, space)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one line per trial is Optuna's
    start = time.perf_counter()
    remaining = n_trials - sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
    if remaining > 0:
        objective = Objective(space, fit_args, study_name)
        study.optimize(
            objective,
            timeout=timeout,
            callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=FINISHED)],
            gc_after_trial=True,
        )
        if objective.interrupted:
            raise KeyboardInterrupt
    return report(study, fit_args, log_dir, time.perf_counter() - start)
