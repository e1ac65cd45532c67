"""Joint hyperparameter search with Optuna: search space, objective, pruning, the study and its final report.

Each trial is an ordinary fit run built by `mlp.cli.build_cli` from the user's fit flags plus the trial's
suggestions, so a trial trains exactly what `scripts/fit.py` with the same flags would train.
"""

import json
import logging
import math
import os
import random
import socket
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.distributions import BaseDistribution
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from optuna_integration import PyTorchLightningPruningCallback

from mlp.cli import MLPCLI, build_cli, divergence_message, fit
from mlp.data import locate_fashion_mnist
from mlp.errors import UserError, check
from mlp.module import MLPClassifier

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Trials that are or will be counted towards --n-trials: a WAITING one is run by the next worker to ask.
LIVE = (*FINISHED, TrialState.RUNNING, TrialState.WAITING)
# A worker that dies leaves its trial RUNNING; once its heartbeat is older than the grace period, any other
# worker marks it failed and enqueues its parameters again. Idle workers look again every heartbeat.
HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 30
log = optuna.logging.get_logger("optuna.mlp")


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

    def __init__(self, space: SearchSpace, fit_args: list[str], study_name: str, n_trials: int) -> None:
        self.space, self.fit_args, self.study_name, self.n_trials = space, fit_args, study_name, n_trials
        self.interrupted = False
        self.ran: list[int] = []  # numbers of the trials this worker trained

    def __call__(self, trial: optuna.Trial) -> float:
        if is_surplus(trial, self.n_trials):
            # Another worker took the last place at the same moment; NaN fails the trial, so it never counts.
            trial.set_user_attr("surplus", True)
            return math.nan
        self.ran.append(trial.number)
        args = trial_args(self.fit_args, suggest(trial, self.space), self.study_name, f"trial_{trial.number}")
        cli = build_cli(args)
        trainer = cli.trainer
        trainer.callbacks.append(PyTorchLightningPruningCallback(trial, monitor="val/acc"))
        trial.set_user_attr("log_dir", trainer.log_dir)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            fit(cli)
        except optuna.TrialPruned:
            if not divergence_message(trainer):
                raise
        except KeyboardInterrupt:
            # NaN makes Optuna record the trial as failed (without a traceback); run_trials stops after it.
            self.interrupted = True
            trial.set_user_attr("interrupted", True)
            return math.nan
        if reason := divergence_message(trainer):
            trial.set_user_attr("diverged", reason)
            raise optuna.TrialPruned(f"diverged in {reason}")
        trial.set_user_attr("best_checkpoint", trainer.checkpoint_callback.best_model_path)
        return trainer.checkpoint_callback.best_model_score.item()


def is_surplus(trial: optuna.Trial, n_trials: int) -> bool:
    """Whether n_trials live trials were created before this one.

    Workers check the count before they ask for a trial, but two can check at the same moment. The storage
    numbers trials in the order it creates them, so counting only earlier trials settles the tie: the later
    one is surplus.
    """
    live = trial.study.get_trials(deepcopy=False, states=LIVE)
    return sum(t.number < trial.number for t in live) >= n_trials


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


def connect(storage_url: str) -> RDBStorage:
    """The storage, with heartbeats on; its tables are created on first use."""
    if storage_url.startswith("sqlite:///"):
        Path(storage_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        return heartbeat_storage(storage_url)
    except Exception as error:  # SQLAlchemy raises many kinds for a bad URL or an unreachable server
        first_line = str(error).splitlines()[0]  # SQLAlchemy appends the SQL and a link to its docs
        raise UserError(f"cannot open the study storage {storage_url!r}: {first_line}") from None


def heartbeat_storage(storage_url: str, attempts: int = 3) -> RDBStorage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                storage_url,
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=GRACE_SECONDS,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
    except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
        # Workers started together on an empty database race to create the same tables and types; a loser
        # gets one of these errors and finds everything made when it tries again.
        if attempts == 1:
            raise
        time.sleep(random.uniform(0.5, 2))
        return heartbeat_storage(storage_url, attempts - 1)


def open_study(
    study_name: str, storage_url: str, pruner: str, space: SearchSpace, seed: int
) -> tuple[optuna.Study, bool]:
    """Create the study, or load it if it exists, so that rerunning the same command continues it.

    Also says whether this call created it: of workers started together, exactly one did.
    """
    settings = dict(
        study_name=study_name,
        storage=connect(storage_url),
        sampler=TrialSeededTPE(seed),
        pruner=make_pruner(pruner, space),
    )
    try:
        return optuna.create_study(direction="maximize", **settings), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(**settings), False


def start_from_fit_defaults(study: optuna.Study, cli: MLPCLI, space: SearchSpace) -> None:
    """Queue, as a new study's first trial, the configuration fit.py would train with the same flags.

    fit.py's defaults were chosen on the validation split, so the search starts from a known-good point
    instead of spending its first epochs rediscovering it.
    """
    hp = cli.model.hparams
    start = {"lr": hp.lr, "epochs": cli.trainer.max_epochs, "depth": hp.depth, "width": hp.width,
             "weight_decay": hp.weight_decay, "dropout": hp.dropout}
    inside = all(low <= start[name] <= high for name, (low, high) in asdict(space).items())
    if inside:
        study.enqueue_trial(start)


def epochs_trained(study: optuna.Study) -> int:
    """Epochs trained across every trial, pruned and failed ones included: one val/acc report per epoch."""
    return sum(len(t.intermediate_values) for t in study.get_trials(deepcopy=False))


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


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the trials of workers whose heartbeat went stale; each is enqueued again once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def run_trials(study: optuna.Study, objective: Objective, n_trials: int, timeout: float | None) -> None:
    """Run trials until the study holds n_trials finished ones and no trial is running anywhere.

    Any number of workers may do this on one study at once. A worker starts a trial while the study holds a
    WAITING one or fewer than n_trials live ones. With nothing to start it waits for the other workers'
    trials, so that if one of them dies, its trial is failed once the heartbeat is stale and rerun here.
    """
    deadline = time.monotonic() + (math.inf if timeout is None else timeout)
    waiting_logged = False
    while time.monotonic() < deadline:
        fail_stale_trials(study)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        if TrialState.WAITING in states or sum(state in LIVE for state in states) < n_trials:
            study.optimize(objective, n_trials=1, gc_after_trial=True)
            if objective.interrupted:
                raise KeyboardInterrupt
        elif TrialState.RUNNING in states:
            if not waiting_logged:
                log.info(f"No trial left to start; waiting for {states.count(TrialState.RUNNING)} running elsewhere.")
                waiting_logged = True
            time.sleep(HEARTBEAT_SECONDS)
        else:
            return


def writes_report(study: optuna.Study, ran: list[int]) -> bool:
    """Whether this worker reports: the one that finished the study's last trial, once none is running.

    Every worker agrees on which trial finished last, so exactly one reports; a worker that ran no trial
    (the command rerun on a finished study) reports too.
    """
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.RUNNING for t in trials):
        return False
    finished = [t for t in trials if t.state in FINISHED]
    if not ran or not finished:
        return True
    return max(finished, key=lambda t: (t.datetime_complete, t.number)).number in ran


def run_study(
    space: SearchSpace,
    fit_args: list[str],
    study_name: str,
    storage_url: str | None,
    n_trials: int,
    timeout: float | None,
    pruner: str,
    seed: int,
) -> dict[str, Any] | None:
    """Run trials until the study holds n_trials finished ones (or timeout passes), then report.

    Returns the report, or None when another worker writes it.
    """
    space.validate()
    check(n_trials >= 1, f"--n-trials must be >= 1, got {n_trials}")
    check(timeout is None or timeout > 0, f"--timeout must be positive seconds, got {timeout}")
    # Build one run from the fit flags before any trial, so a bad flag or missing data stops us here.
    cli = build_cli(fit_args)
    locate_fashion_mnist(cli.datamodule.hparams.data_dir)
    tune_dir = Path(cli.trainer.logger.save_dir) / "tune"
    storage_url = storage_url or f"sqlite:///{tune_dir / 'optuna.db'}"
    study, created = open_study(study_name, storage_url, pruner, space, seed)
    if created:
        start_from_fit_defaults(study, cli, space)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one line per trial is Optuna's
    start = time.perf_counter()
    objective = Objective(space, fit_args, study_name, n_trials)
    run_trials(study, objective, n_trials, timeout)
    if not writes_report(study, objective.ran):
        return None
    return report(study, fit_args, tune_dir / study_name, time.perf_counter() - start)
