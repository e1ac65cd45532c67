"""Joint hyperparameter search with Optuna: `run_study`, what `scripts/tune.py` does. Each trial is a fit run built by
`mlp.cli.build_cli` from the user's fit flags plus its suggestions: what `scripts/fit.py` would train with the same
flags. What is searched lives in `mlp.search`, the rules workers share in `mlp.study`, a trial's life in
`mlp.trials`, the final models in `mlp.final` and the report in `mlp.report`."""

import itertools
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from lightning.pytorch.callbacks import (
    BatchSizeFinder, DeviceStatsMonitor, EarlyStopping, GradientAccumulationScheduler, LearningRateFinder,
    LearningRateMonitor, ProgressBar, StochasticWeightAveraging, Timer, WeightAveraging,
)
from optuna.trial import TrialState

from mlp.budget import FINISH_SECONDS, Budget
from mlp.cli import MLPCLI, DivergenceGuard, build_cli, check_keeps_a_checkpoint, validates_within
from mlp.data import TRAIN_IMAGES, locate_fashion_mnist
from mlp.devices import OtherDevices, one_device_args
from mlp.errors import UserError, check
from mlp.final import FINAL_CHOICES, refitted
from mlp.fused import hooks_a_stack_skips, probe_step
from mlp.gpu_sizing import auto_fuse, check_fusable, free_gpu_bytes, pads_widths
from mlp.progress import LIGHTNING_LOGGERS
from mlp.records import TrialRecord
from mlp.report import report
from mlp.search import FIT_FLAGS, SearchSpace, pinned_by
from mlp.study import (
    connect, finished_numbers, fit_defaults, open_study, run_trials, stored_trials, worker_name, writes_report,
)
from mlp.trials import Trials

# The callbacks of --trainer.callbacks no trial can take (by kind, or a tuple of kinds), and why. A trial's Trainer,
# shared by a stack, has no logger: each trial writes its own run.
REFUSED_CALLBACKS = {
    EarlyStopping: "the pruner stops trials early, and a trial trains the epochs it was given (fit.py takes it)",
    LearningRateFinder: "the search chooses each trial's learning rate (fit.py takes it)",
    BatchSizeFinder: "stacked trials share the batch size their learning-rate schedules were sized by",
    (LearningRateMonitor, DeviceStatsMonitor): "each trial writes its own run, with no Trainer logger for it (fit.py "
    "takes it)",
    Timer: "a trial trains the epochs it was given, and --timeout bounds the whole study (fit.py takes it)",
    (StochasticWeightAveraging, WeightAveraging): "it averages the Trainer's one model, where a stack trains several "
    "(fit.py takes it)",
    GradientAccumulationScheduler: "a stack steps each trial's optimiser itself, and accumulates no gradients",
    ProgressBar: "tune.py shows the study's progress, and a trial draws no bar of its own (fit.py takes it)",
}
# A study's name is also its folder's in the log folder's tune/: one path segment, nothing that climbs out of it,
# well within the 255 bytes a file system allows a name.
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class StudyConfig:
    """A study as tune.py's flags describe it (`scripts/tune.py --help` says what each does)."""

    fit_args: list[str] = field(default_factory=list)  # the flags tune.py does not know: fit flags for every trial
    space: SearchSpace = field(default_factory=SearchSpace)
    ranges_given: frozenset[str] = frozenset()  # the ranges of `space` the user gave, which no fit flag may pin
    study_name: str = "mlp"
    storage: str | None = None  # None: `default_storage`
    n_trials: int = 30
    timeout: float | None = None  # seconds the whole command may take (see mlp.budget)
    pruner: str = "median"
    sampler_seed: int = 0
    fuse: int | str = "auto"  # trials trained at once, stacked (`mlp.trials`); auto: `mlp.gpu_sizing.auto_fuse`
    final: str = FINAL_CHOICES[0]  # the final model the report answers with (`mlp.final`)

    def validate(self) -> None:
        check(STUDY_NAME.fullmatch(self.study_name) is not None and not self.study_name.startswith("optuna."),
              f"--study-name {self.study_name!r} must be one folder name of letters, digits, '.', '_' and '-' (not "
              "first), at most 100 characters, not beginning 'optuna.': it names the study's folder in the log "
              "folder's tune/, beside the default storage's optuna.db and optuna.journal")
        check(self.n_trials >= 1, f"--n-trials must be >= 1, got {self.n_trials}")
        if self.timeout is not None:
            check(math.isfinite(self.timeout), f"--timeout is a number of seconds, got {self.timeout:g}")
            check(self.timeout > FINISH_SECONDS,
                  f"--timeout {self.timeout:g} leaves no time for trials: it bounds the whole command, and the final "
                  f"model's test and the plots alone take about {FINISH_SECONDS:g} s after them; give more seconds, "
                  "or drop --timeout")
        check(self.sampler_seed >= 0, f"--sampler-seed must be >= 0, got {self.sampler_seed}")
        check(self.fuse == "auto" or self.fuse >= 1,
              f"--fuse must be >= 1 (1 trains one trial at a time, K > 1 trains K at once) or auto, got {self.fuse}")
        check(self.final in FINAL_CHOICES, f"--final must be one of {', '.join(FINAL_CHOICES)}, got {self.final!r}")


def run_study(config: StudyConfig,
              progress: Callable[[optuna.Study], None] = lambda study: None) -> dict[str, Any] | str:
    """Run trials until the study holds `config.n_trials` finished ones, then report, all within `config.timeout`
    seconds if given (mlp.budget); `progress` is shown the study as trials finish. A searched hyperparameter that
    the fit flags set is pinned. Returns the report, or, when another worker writes it, a line saying why."""
    config.validate()
    started = time.time()
    space, fit_args, study_name = config.space, config.fit_args, config.study_name
    n_trials, fuse = config.n_trials, config.fuse
    # Build one run from the fit flags before any trial, so a bad flag or missing data stops us here.
    cli = build_cli(fit_args)
    space.validate(cli.model.hparams)  # each range beside the fit flags' other hyperparameters
    pinned = pinned_by(fit_args, cli.config, cli.parser.get_defaults())
    for name in pinned:
        check(name not in config.ranges_given,
              f"--{name.replace('_', '-')} searches {name} but --{FIT_FLAGS[name]} pins it to {pinned[name]}: drop "
              "one of them")
    space = space.pin(pinned)
    shortest_epochs = space.epochs[0] if space.epochs else cli.trainer.max_epochs
    check_trials_can_train_as_fit(cli, shortest_epochs)
    locate_fashion_mnist(cli.datamodule.hparams.data_dir)
    if pinned:
        pins = ", ".join(f"{name}={value}" for name, value in pinned.items())
        print(f"pinned by the fit flags, not searched: {pins}")
    workers = one_device_args(fit_args, cli.trainer)
    if fuse == "auto":
        # The quarter-of-the-study rule holds for all the workers' stacks together.
        fuse, why = auto_fuse(space, cli, free_gpu_bytes(cli), -(-n_trials // len(workers)))
        print(f"--fuse auto: {fuse} ({why})")
    if fuse > 1:
        check_fusable(fuse, space, cli)
    tune_dir = Path(cli.trainer.logger.save_dir) / "tune"
    storage_url = config.storage or default_storage(tune_dir, len(workers), study_name)
    opening = (study_name, storage_url, config.pruner, shortest_epochs, config.sampler_seed, fit_defaults(cli, space),
               space.has_slow_starters)
    check_folder_is_the_studys(study_name, storage_url, tune_dir / study_name)  # before open_study creates anything
    study = open_study(*opening)
    # A refit trains on train + val, so its epochs take longer than its trial's.
    refit_scale = TRAIN_IMAGES / (TRAIN_IMAGES - cli.datamodule.hparams.val_size)
    deadline = started + config.timeout if config.timeout else math.inf
    budget = Budget(deadline, refit_scale, fuse, parallel=pads_widths(cli), refitted=refitted(study))
    seed = None if cli.config.seed_everything is False else cli.config.seed_everything  # an int once parsed
    trials = Trials(space, workers[0], study_name, n_trials, fuse, budget, seed)
    finished_before = finished_numbers(study)
    with OtherDevices(train_trials, (space, opening, n_trials, budget, fuse, seed), workers) as others:
        run_trials(study, trials, n_trials, budget, progress)
    # The workers this command started report nothing: their trials count as its own.
    started_here = {worker_name(process.pid) for process in others.processes}
    ran = trials.ran + [t.number for t in study.get_trials(deepcopy=False) if TrialRecord.of(t).worker in started_here]
    if failed := others.failed():
        print(f"{', '.join(failed)} stopped early; the other workers retried its trials")
    if not writes_report(study, ran, finished_before):
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        if running:  # run_trials returns with trials running elsewhere only at the deadline
            return (f"stopped at --timeout {config.timeout:g} s with {running} trial{'s' * (running > 1)} still "
                    "running on other workers; the worker that finishes the study's last trial writes the report")
        return "another worker finished the study's last trial and writes the report"
    return report(study, tune_dir / study_name, started, config.final, budget, n_trials)


def check_trials_can_train_as_fit(cli: MLPCLI, shortest_epochs: int) -> None:
    """Refuse, before any trial, the fit flags a trial cannot honour as fit.py's run would (fit.py takes them);
    `shortest_epochs`: the fewest epochs a trial may train."""
    check(cli.trainer.logger is not None,
          "tune.py keeps each trial's logs and checkpoints, and the report, in the logger's folder: drop "
          "--trainer.logger=false (--trainer.logger.init_args.save_dir DIR chooses the folder)")
    check_keeps_a_checkpoint(cli, "tune.py keeps each trial's best checkpoint for the final models")
    check(cli.config.ckpt_path is None, "a trial is a new run, and a study continues by the same command rerun: drop "
          "--ckpt_path (fit.py takes it)")
    model = type(cli.model).__name__
    check(not (skipped := hooks_a_stack_skips(cli.model)), f"{model} overrides {', '.join(skipped)}, which fit.py "
          "calls and tune.py's trials, trained through model_step, loss and optimizer_and_schedule (mlp/fused.py), "
          "never do: make the change in those (docs/forking.md), or train it with fit.py alone")
    if other := probe_step(cli.model).other_reads:
        raise UserError(f"{model} reads self.trainer.{other[0]} as it trains, which no trial in tune.py has a value "
                        "of its own for: read its current_epoch, global_step, max_epochs or "
                        "estimated_stepping_batches, which are the trial's own (docs/forking.md), or train it with "
                        "fit.py alone")
    net = type(cli.model.net).__name__
    check(callable(getattr(cli.model.net, "multiply_adds", None)), f"tune.py counts each trial's cost by its net's "
          f"multiply_adds(), which {net} lacks: give it one (docs/forking.md#the-cost-of-a-trial)")
    check(not cli.trainer.gradient_clip_val and cli.trainer.accumulate_grad_batches == 1,
          "tune.py steps each stacked trial's optimiser itself, where Lightning clips and accumulates no gradients: "
          "drop --trainer.gradient_clip_val and --trainer.accumulate_grad_batches (fit.py takes them)")
    check(cli.trainer.max_steps == -1 and cli.config.trainer.max_time is None and cli.trainer.max_epochs != -1,
          "a trial trains for its epochs (--epochs, or --trainer.max_epochs) and --timeout bounds the whole study: "
          "drop --trainer.max_steps and --trainer.max_time, and --trainer.max_epochs -1 (fit.py takes them)")
    val_size = cli.datamodule.hparams.val_size
    check(0 < val_size < TRAIN_IMAGES, f"tune.py chooses hyperparameters on the validation split: --data.val_size "
          f"must be > 0 and below the {TRAIN_IMAGES} training images, got {val_size} (the final models refit on "
          "train + val by themselves)")
    defaults = cli.parser.get_defaults().checkpoint
    changed = [f"--checkpoint.{key}" for key, value in cli.config.checkpoint.items() if value != defaults[key]]
    check(not changed, "a trial keeps its best checkpoint by val/acc, its score in the study, for the final models: "
          f"drop {', '.join(changed)} (fit.py takes them)")
    check(validates_within(cli, shortest_epochs),
          f"a trial is scored on the validation split, and one of {shortest_epochs} epochs would never validate: drop "
          "--trainer.limit_val_batches 0, or give --trainer.check_val_every_n_epoch at most the fewest epochs searched")
    interval = cli.config.trainer.val_check_interval  # 1.0 is once an epoch, the int 1 every batch
    check(interval is None or (isinstance(interval, float) and interval == 1.0),
          "a trial is judged at its epochs' ends, by their validation, as the pruner compares trials: drop "
          "--trainer.val_check_interval (fit.py takes it)")
    for callback, (kind, why) in itertools.product(cli.trainer.callbacks, REFUSED_CALLBACKS.items()):
        ours = isinstance(callback, DivergenceGuard) or callback is cli.config_init.progress_bar  # every run's
        check(not isinstance(callback, kind) or ours,
              f"drop the {type(callback).__name__} of --trainer.callbacks: {why}")


def check_folder_is_the_studys(study_name: str, storage_url: str, folder: Path) -> None:
    """Refuse a study folder that holds another study's runs (the same --study-name in another or a fresh
    --storage), which its trials and report would overwrite. The folder is this study's when it holds no run (new,
    or the report of a study that trained no trial, with its plots in study/), or when one of its trials, any
    worker's, logged there."""
    held = sorted(entry.name for entry in folder.iterdir()) if folder.is_dir() else []
    if not any((folder / name).is_dir() and name != "study" for name in held):
        return
    logs = [TrialRecord.of(t).log_dir for t in stored_trials(study_name, storage_url)]
    logged = {Path(log_dir).resolve().parent for log_dir in logs if log_dir}
    check(folder.resolve() in logged,
          f"{folder} holds another study's runs ({', '.join(held[:3])}{', ...' * (len(held) > 3)}): no trial of study "
          f"{study_name!r} in this storage logged there, and its trials and report would overwrite them; "
          "choose another --study-name, or another log folder with --trainer.logger.init_args.save_dir")


def default_storage(tune_dir: Path, workers: int, study_name: str) -> str:
    """The study's storage when --storage is not given: the file in the folder that holds the study, its journal
    first; a new study goes to the journal file if there is one, or when several workers share it (Optuna's FAQ:
    SQLite is for one process), else to SQLite (docs/scaling.md says why)."""
    journal, sqlite = tune_dir / "optuna.journal", tune_dir / "optuna.db"
    if sqlite.exists() and (journal.exists() or workers > 1):  # where the rule below may miss the study's file
        for url in ([str(journal)] if journal.exists() else []) + [f"sqlite:///{sqlite}"]:
            if study_name in optuna.get_all_study_names(connect(url)):
                return url
    return str(journal) if journal.exists() or workers > 1 else f"sqlite:///{sqlite}"


def train_trials(space: SearchSpace, opening: tuple, n_trials: int, budget: Budget, fuse: int, seed: int | None,
                 fit_args: list[str]) -> None:
    """One more worker on the study `run_study` opened (`opening`: `open_study`'s arguments), training on the
    device its `fit_args` name; the process that started it shows the progress and writes the report."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in LIGHTNING_LOGGERS:  # each trial's "GPU available" lines, once per worker
        logging.getLogger(name).setLevel(logging.WARNING)
    study = open_study(*opening)
    run_trials(study, Trials(space, fit_args, opening[0], n_trials, fuse, budget, seed), n_trials, budget)
