"""Joint hyperparameter search with Optuna: the objective that trains one trial, and the study that runs them.

Each trial is an ordinary fit run built by `mlp.cli.build_cli` from the user's fit flags plus the trial's
suggestions, so a trial trains exactly what `scripts/fit.py` with the same flags would train. What is searched
lives in `mlp.search`, the rules workers share in `mlp.study`, the final report in `mlp.report`.
"""

import math
import os
import socket
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import optuna
from lightning import LightningModule, Trainer
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from mlp.cli import build_cli, divergence_message, fit
from mlp.data import locate_fashion_mnist
from mlp.errors import check
from mlp.fused_trials import FusedTrials, auto_fuse, check_fusable, free_gpu_bytes
from mlp.net import multiply_adds
from mlp.report import report
from mlp.search import FIT_FLAGS, SearchSpace, pinned_by, report_schedule_fraction, suggest, trial_args
from mlp.study import (
    finished_numbers,
    fit_defaults,
    gives_way,
    is_surplus,
    mark_surplus,
    open_study,
    run_trials,
    writes_report,
)


class SurplusTrial(Exception):
    """The study has no place left for the running trial (see mlp.study.surplus_trials)."""


class ScheduleFractionPruning(PyTorchLightningPruningCallback):
    """Optuna's Lightning pruning callback, reporting at percent of the trial's schedule instead of at epochs;
    it also stops a trial that the study of n_trials no longer has a place for."""

    def __init__(self, trial: optuna.Trial, monitor: str, n_trials: int) -> None:
        super().__init__(trial, monitor)
        self.previous: float | None = None
        self.n_trials = n_trials

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if is_surplus(self._trial, self.n_trials):
            gives_way(self._trial, pl_module.current_epoch + 1)
            raise SurplusTrial
        value = trainer.callback_metrics[self.monitor].item()
        epoch = pl_module.current_epoch
        prune = report_schedule_fraction(self._trial, epoch, trainer.max_epochs, value, self.previous)
        self.previous = value
        if prune:
            raise optuna.TrialPruned(f"Trial was pruned at epoch {epoch}.")


class Objective:
    """Trains one trial and returns its best val/acc; the test set is never touched here."""

    def __init__(self, space: SearchSpace, fit_args: list[str], study_name: str, n_trials: int) -> None:
        self.space, self.fit_args, self.study_name, self.n_trials = space, fit_args, study_name, n_trials
        self.interrupted = False
        self.ran: list[int] = []  # numbers of the trials this worker trained

    def start_trials(self, study: optuna.Study, may_refill: Callable[[], bool]) -> None:
        """Run one trial (run_trials calls this while the study may start one); one at a time, so there is no
        place to refill while it trains."""
        study.optimize(self, n_trials=1, gc_after_trial=True)

    def __call__(self, trial: optuna.Trial) -> float:
        if is_surplus(trial, self.n_trials):
            # Another worker took the last place at the same moment; NaN fails the trial, so it never counts.
            return surplus(trial)
        self.ran.append(trial.number)
        args = trial_args(self.fit_args, suggest(trial, self.space), self.study_name, f"trial_{trial.number}")
        cli = build_cli(args)
        trainer = cli.trainer
        trainer.callbacks.append(ScheduleFractionPruning(trial, "val/acc", self.n_trials))
        trial.set_user_attr("log_dir", trainer.log_dir)
        trial.set_user_attr("multiply_adds", multiply_adds(cli.model.hparams.depth, cli.model.hparams.width))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            fit(cli)
        except optuna.TrialPruned:
            if not divergence_message(trainer):
                raise
        except SurplusTrial:
            return surplus(trial)
        except KeyboardInterrupt:
            # NaN makes Optuna record the trial as failed (without a traceback); run_trials stops after it.
            self.interrupted = True
            trial.set_user_attr("interrupted", True)
            return math.nan
        if reason := divergence_message(trainer):
            trial.set_user_attr("diverged", reason)
            raise optuna.TrialPruned(f"diverged in {reason}")
        # The CLI's own val/acc checkpoint: trainer.checkpoint_callback is whichever ModelCheckpoint comes first.
        checkpoint = cli.config_init["checkpoint"]
        trial.set_user_attr("best_checkpoint", checkpoint.best_model_path)
        return checkpoint.best_model_score.item()


def surplus(trial: optuna.Trial) -> float:
    """Mark the trial surplus; the NaN returned fails it, so it never counts."""
    mark_surplus(trial)
    return math.nan


def run_study(
    space: SearchSpace,
    fit_args: list[str],
    study_name: str,
    storage_url: str | None,
    n_trials: int,
    timeout: float | None,
    pruner: str,
    seed: int,
    ranges_given: Collection[str] = (),
    progress: Callable[[optuna.Study], None] = lambda study: None,
    fuse: int | str = 1,
    final: str = "ensemble",
) -> dict[str, Any] | str:
    """Run trials until the study holds n_trials finished ones (or timeout passes), then report.

    A searched hyperparameter that the fit flags set is pinned, not searched; `ranges_given` names the search
    ranges the user gave explicitly, which must not be pinned as well. `progress` is shown the study as
    trials finish (see mlp.progress). fuse > 1 trains up to that many trials at once as stacked networks
    (`mlp.fused_trials`); fuse "auto" picks K for the device (`mlp.fused_trials.auto_fuse`).
    Returns the report, or, when another worker writes it, a line saying why this one does not.
    """
    space.validate()
    check(n_trials >= 1, f"--n-trials must be >= 1, got {n_trials}")
    check(timeout is None or timeout > 0, f"--timeout must be positive seconds, got {timeout}")
    check(seed >= 0, f"--sampler-seed must be >= 0, got {seed}")
    check(
        fuse == "auto" or fuse >= 1,
        f"--fuse must be >= 1 (1 trains one trial at a time, K > 1 trains K at once) or auto, got {fuse}",
    )
    # Build one run from the fit flags before any trial, so a bad flag or missing data stops us here.
    cli = build_cli(fit_args)
    check(
        cli.trainer.logger is not None,
        "tune.py keeps each trial's logs and checkpoints, and the report, in the logger's folder: drop "
        "--trainer.logger=false (--trainer.logger.init_args.save_dir DIR chooses the folder)",
    )
    check(
        cli.datamodule.hparams.val_size > 0,
        "tune.py chooses hyperparameters on the validation split: --data.val_size must be > 0 (the final models "
        "refit on train + val by themselves)",
    )
    locate_fashion_mnist(cli.datamodule.hparams.data_dir)
    pinned = pinned_by(fit_args, cli.config, cli.parser.get_defaults())
    for name in pinned:
        check(
            name not in ranges_given,
            f"--{name.replace('_', '-')} searches {name} but --{FIT_FLAGS[name]} pins it to {pinned[name]}: drop one of them",
        )
    if pinned:
        space = space.pin(pinned)
        print("pinned by the fit flags, not searched: " + ", ".join(f"{name}={value}" for name, value in pinned.items()))
    if fuse == "auto":
        fuse, why = auto_fuse(space, cli, free_gpu_bytes(cli), n_trials)
        print(f"--fuse auto: {fuse} ({why})")
    if fuse > 1:
        check_fusable(fuse, space, cli)
    tune_dir = Path(cli.trainer.logger.save_dir) / "tune"
    storage_url = storage_url or f"sqlite:///{tune_dir / 'optuna.db'}"
    shortest_epochs = space.epochs[0] if space.epochs else cli.trainer.max_epochs
    study = open_study(study_name, storage_url, pruner, shortest_epochs, seed, fit_defaults(cli, space))
    start = time.perf_counter()
    if fuse == 1:
        objective = Objective(space, fit_args, study_name, n_trials)
    else:
        objective = FusedTrials(space, fit_args, study_name, n_trials, fuse)
    finished_before = finished_numbers(study)
    run_trials(study, objective, n_trials, timeout, progress)
    if not writes_report(study, objective.ran, finished_before):
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        if running:  # run_trials returns with trials running elsewhere only at the deadline
            return (
                f"stopped at --timeout {timeout:g} s with {running} trial{'s' * (running > 1)} still running on "
                "other workers; the worker that finishes the study's last trial writes the report"
            )
        return "another worker finished the study's last trial and writes the report"
    return report(study, tune_dir / study_name, time.perf_counter() - start, final, fuse)
