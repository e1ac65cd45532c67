"""A study's trials, from ask to tell: up to K at once (--fuse K), stacked in one Trainer; one alone is a stack of one.

Each trains what `scripts/fit.py` would with the user's fit flags plus its suggestions. Trial n is seeded with fit's
--seed_everything + n: trials of one shape would otherwise start alike and repeat one model's mistakes in an ensemble;
trial 0, fit's own configuration, is fit's own run."""

import gc
import os
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import optuna
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from optuna.trial import TrialState

from mlp.budget import Budget
from mlp.cli import MLPCLI, SEEDS, build_cli, fit
from mlp.data import FashionMNISTDataModule
from mlp.errors import check
from mlp.fused import FusedClassifier, ModelInStackCheckpoint
from mlp.gpu_sizing import pads_widths
from mlp.records import Ending, record
from mlp.search import SearchSpace, record_intermediate_values, suggest, trial_args
from mlp.study import (
    Heartbeats, best_first, best_first_if_bounded, gives_way, is_surplus, log, mark_surplus, may_start_trial,
    retry_interrupted, surplus_trials, worker_name,
)


class RunEnd(NamedTuple):
    """How a run ended (`detail`: when, why), its checkpoint (best by val/acc, else its last) and that one's val/acc."""

    how: Ending
    detail: str
    checkpoint: str
    score: float | None


class Trials:
    """Runs up to `fuse` trials at once; `mlp.study.run_trials` calls `start_trials` while the study may start one."""

    def __init__(
        self, space: SearchSpace, fit_args: list[str], study_name: str, n_trials: int, fuse: int, budget: Budget,
        seed: int | None = 0,
    ) -> None:
        self.space, self.fit_args, self.study_name = space, fit_args, study_name
        self.n_trials, self.fuse, self.budget = n_trials, fuse, budget
        self.seed = seed  # the fit flags' --seed_everything; None where it is false (nothing seeded)
        self.interrupted = False  # on Ctrl-C every running trial is failed, then run_trials stops
        self.ran: list[int] = []  # numbers of the trials this worker trained
        self.most = fuse  # trials at once: halved after each stack the budget cut trials of (see `places`)

    def start_trials(self, study: optuna.Study, may_refill: Callable[[], bool]) -> None:
        """Train up to `fuse` trials at once (`places`), refilling each freed place while `may_refill()` allows."""
        asked = self.ask(study, self.places(study))
        if not asked:  # another worker took the place run_trials saw free (its trial surplus, or a retry taken)
            return
        running = [trial for trial, _ in asked]  # a trial leaves this list when the study is told its end
        with Heartbeats(study, running) as heartbeats:
            try:
                self.train(study, asked, heartbeats, may_refill)
            except BaseException as error:
                self.interrupted = isinstance(error, KeyboardInterrupt)
                for trial in running:
                    if self.interrupted:
                        record(trial, interrupted=True)
                    study.tell(trial, state=TrialState.FAIL)
                if not self.interrupted:
                    raise
                retry_interrupted(study, [trial.number for trial in running])  # once failed, not surplus beside them
        gc.collect()  # a finished Trainer's cycles hold its model and data until collected

    def places(self, study: optuna.Study) -> int:
        """`fuse` trials at once, halved after each stack the budget cut trials of; under --timeout, one until a trial
        completes: a stacked trial trains at the stack's pace (docs/results.md#eight-trials-cpu), so the first, fit's
        own run, trains at its own, and a budget that fits fit's run answers at least with fit's model."""
        return self.most if not self.budget.bounded or best_first(study) else 1

    def ask(self, study: optuna.Study, count: int) -> list[tuple[optuna.Trial, dict[str, Any]]]:
        """Up to `count` trials with their suggested fit flags, by the rules every worker follows."""
        asked = []
        while len(asked) < count and may_start_trial(study, self.n_trials):
            with warnings.catch_warnings():  # Optuna warns that only optimize beats hearts; Heartbeats does
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
                trial = study.ask()
            if is_surplus(trial, self.n_trials):  # another worker took the last place at the same moment
                mark_surplus(trial)
                study.tell(trial, state=TrialState.FAIL)
                break
            asked.append((trial, suggest(trial, self.space)))
        return asked

    def build(self, trial: optuna.Trial, flags: dict[str, Any]) -> MLPCLI:
        """The trial's own run, as fit.py would build it, with what the report and other workers need to know."""
        if self.seed is not None:
            flags = {**flags, "seed_everything": (self.seed + trial.number) % SEEDS}
        cli = build_cli(trial_args(self.fit_args, flags, self.study_name, f"trial_{trial.number}"))
        record(trial, log_dir=cli.trainer.log_dir, multiply_adds=cli.model.net.multiply_adds(), worker=worker_name())
        return cli

    def train(
        self, study: optuna.Study, asked: list[tuple[optuna.Trial, dict[str, Any]]], heartbeats: Heartbeats,
        may_refill: Callable[[], bool],
    ) -> None:
        """Train the `asked` trials (`train_runs`), told as each ends; those asked while `may_refill()` fill places."""
        judge = JudgeEachEpoch(study, {}, self.n_trials, self.budget)
        running = heartbeats.trials  # a trial leaves it when the study is told its end

        def runs(asked: list[tuple[optuna.Trial, dict[str, Any]]]) -> dict[str, MLPCLI]:  # less those too long
            built = {}
            for trial, flags in asked:
                cli = self.build(trial, flags)
                ranked = best_first_if_bounded(study, self.budget)
                if why := self.budget.no_time_for(cli.trainer.max_epochs, cli.model.net.multiply_adds(), ranked):
                    record(trial, skipped=why)
                    study.tell(trial, state=TrialState.FAIL)
                    running.remove(trial)
                    log.info(f"Trial {trial.number} skipped: {why}.")
                    continue
                self.ran.append(trial.number)
                judge.trials[str(trial.number)] = EpochEnds(trial)
                built[str(trial.number)] = cli
            return built

        def more(free: int) -> dict[str, MLPCLI]:
            refill = may_refill()  # at every epoch's end: it also fails stale trials and shows the progress
            free = 0 if judge.cut else min(free, self.places(study) - len(running))
            asked = self.ask(study, free) if refill and free > 0 else []
            heartbeats.join([trial for trial, _ in asked])
            return runs(asked)

        if first := runs(asked):
            train_runs(first, self.fit_args, self.fuse,
                       lambda name, end: self.tell(study, judge.trials[name].trial, end, running), judge, more)
        if judge.cut:
            self.most = max(1, self.most // 2)

    @staticmethod
    def tell(study: optuna.Study, trial: optuna.Trial, end: RunEnd, running: list[optuna.Trial]) -> None:
        """Finished: its value, its best val/acc; surplus: failed; else pruned. A trial another worker failed as
        stale (its heartbeat late) is told nothing more: its retry has its place."""
        if end.how == Ending.STALE or study.get_trials(deepcopy=False)[trial.number].state.is_finished():
            log.warning(f"Trial {trial.number} was failed as stale by another worker while it trained; not told again.")
        elif end.how == Ending.FINISHED:
            record(trial, best_checkpoint=end.checkpoint)
            study.tell(trial, end.score)
            log.info(f"Trial {trial.number} finished with value: {end.score} and parameters: {trial.params}.")
        elif end.how == Ending.SURPLUS:
            mark_surplus(trial)
            study.tell(trial, state=TrialState.FAIL)
        else:
            if end.how in (Ending.DIVERGED, Ending.CUT):
                record(trial, **{end.how: end.detail})
            study.tell(trial, state=TrialState.PRUNED)
            log.info(f"Trial {trial.number} pruned{f' ({end.how}, {end.detail})' if end.detail else ''}.")
        running.remove(trial)


def train_runs(
    runs: dict[str, MLPCLI], group_args: list[str], fuse: int, on_end: Callable[[str, RunEnd], None],
    judge: "JudgeEachEpoch | None" = None, more: Callable[[int], dict[str, MLPCLI]] | None = None,
) -> FashionMNISTDataModule:
    """Train `runs` (by name) as their own fits would, up to `fuse` at once in one Trainer from `group_args`, each
    with its own logger, saved config, checkpoint and divergence, calling `on_end(name, end)` as each ends; `judge`
    may stop one at an epoch's end, `more(free)` give runs for freed places. Returns the data they trained on."""
    # The group draws its batches by the first run's seed: a run alone by its own, as its own fit would.
    seed = next(iter(runs.values())).config.seed_everything
    group = group_cli([*group_args, f"--seed_everything={seed}"], max(cli.trainer.max_epochs for cli in runs.values()))
    validates = bool(group.trainer.limit_val_batches)
    # By name while the run trains; a stopped one leaves only at its epoch's end, so its checkpoint still saves
    # this epoch's weights when they are its best, as a run alone's does.
    checkpoints: dict[str, ModelInStackCheckpoint] = {}
    relative: set[str] = set()  # runs whose log folder is relative to the working folder, as by default

    def join(name: str, cli: MLPCLI) -> None:
        save_config(cli)
        checkpoints[name] = ModelInStackCheckpoint(name, str(Path(cli.trainer.log_dir) / "checkpoints"), validates)
        if not Path(cli.trainer.log_dir).is_absolute():
            relative.add(name)

    def leave(name: str, how: Ending, detail: str) -> None:
        checkpoint = checkpoints.pop(name)
        path, score = checkpoint.best_model_path, checkpoint.best_model_score
        if path and name in relative:
            # Lightning makes it absolute: kept relative, as the run's log folder is, so that a project folder
            # moved or renamed with its study in it still finds the checkpoints the study records.
            path = os.path.relpath(path)
        on_end(name, RunEnd(how, detail, path, None if score is None else score.item()))

    def refill(module: FusedClassifier) -> None:
        if not (free := fuse - len(module.names)):
            return
        # Building a run seeds the generators for its initial weights; the group's batches and masks go on as they were.
        with torch.random.fork_rng(devices=[module.device.index] if module.device.type == "cuda" else []):
            joining = more(free)
        for name, cli in joining.items():
            join(name, cli)
            checkpoints[name].setup(group.trainer, module, stage="fit")
            module.add(cli.model, cli.trainer.max_epochs, name, cli.trainer.logger)

    for name, cli in runs.items():
        join(name, cli)
    group.trainer.callbacks += [*([judge] if judge else []), TrialCheckpoints(checkpoints)]
    group.model = FusedClassifier(
        [cli.model for cli in runs.values()], [cli.trainer.max_epochs for cli in runs.values()], list(runs),
        [cli.trainer.logger for cli in runs.values()], on_leave=leave, refill=refill if more else None,
        pad_widths=pads_widths(group),
    )
    fit(group)
    # Every run leaves the stack at its own last epoch's end, or as judged; the Trainer stopped by anything else (a
    # callback's time limit, say) would leave them unended, each retried in turn once its heartbeat went stale.
    check(not group.model.members, f"training stopped before runs {', '.join(group.model.names)} ended: something "
          "stopped the Trainer they share (a --trainer.callbacks, say), where each ends at its own last epoch; drop "
          "it (fit.py takes it)")
    return group.datamodule


class EpochEnds:
    """One trial's judgement at each of its epochs' ends: surplus, stale, pruned, cut for the budget, or go on."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.previous: float | None = None  # its val/acc at its previous epoch's end
        self.started = time.monotonic()  # when it started training (see JudgeEachEpoch.on_train_start)

    def judge(
        self, epoch: int, epochs: int, value: float, surplus: set[int], cut: Callable[[float], bool]
    ) -> Ending | None:
        """How the trial stops after `epoch` (from 0) of `epochs` at val/acc `value`, or None: `surplus` holds the
        trials the study has no place for, `cut(seconds)` whether that many more would overrun the budget."""
        if self.trial.number in surplus:
            gives_way(self.trial, epoch + 1)
            return Ending.SURPLUS
        try:
            prune = record_intermediate_values(self.trial, epoch, epochs, value, self.previous)
        except optuna.exceptions.UpdateFinishedTrialError:  # failed as stale elsewhere: its retry has its place
            return Ending.STALE
        self.previous = value
        if prune:
            return Ending.PRUNED
        seconds_per_epoch = (time.monotonic() - self.started) / (epoch + 1)
        return Ending.CUT if epoch + 1 < epochs and cut((epochs - epoch - 1) * seconds_per_epoch) else None


class JudgeEachEpoch(L.Callback):
    """Judges every trial in the Trainer at each validation's end (`EpochEnds.judge`); one judged to stop trains to
    the epoch's end. Past `Budget.overdue` every trial stops at once, mid-epoch: an epoch of a big net on a loaded
    CPU can outlast what is left, and the final model still has the checkpoints."""

    def __init__(self, study: optuna.Study, trials: dict[str, EpochEnds], n_trials: int, budget: Budget) -> None:
        self.study, self.trials, self.n_trials, self.budget = study, trials, n_trials, budget
        self.overdue = False
        self.cut = False  # a trial was cut for the budget: trials joining would keep the pace that cut it

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # Seconds per epoch leave out the build, data loading and sanity check; a trial joining later starts as built.
        for trial in self.trials.values():
            trial.started = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *_: object) -> None:
        if self.overdue or not self.budget.overdue():
            return
        self.overdue = True
        trainer.should_stop = True
        for name in module.names:
            module.stop(name, Ending.CUT, "in an epoch: the --timeout budget's time for trials was over")

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.overdue:  # a trial cut mid-epoch has no epoch's end to judge
            return
        surplus = surplus_trials(self.study, self.n_trials)  # one query each for the whole stack
        cut = partial(self.budget.cuts, best_first=best_first_if_bounded(self.study, self.budget))
        for k, member in enumerate(module.members):
            value = trainer.callback_metrics[f"val/acc/{member.name}"].item()
            epoch = module.progress(k)[0]
            if how := self.trials[member.name].judge(epoch, member.epochs, value, surplus, cut):
                detail = f"after epoch {epoch + 1} of {member.epochs}: the --timeout budget left no time for the rest"
                module.stop(member.name, how, detail if how == Ending.CUT else "")
                self.cut = self.cut or how == Ending.CUT


def group_cli(fit_args: list[str], epochs: int) -> MLPCLI:
    """A stacked group's Trainer and data, with no logger, checkpoint, guard or saved config: each trial has its own."""
    cli = build_cli([
        *fit_args, f"--trainer.max_epochs={epochs}", "--trainer.logger=false",
        "--trainer.enable_model_summary=false", "--progress_bar.refresh_rate=0",
    ])
    own = (ModelCheckpoint, EarlyStopping, SaveConfigCallback)
    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, own)]
    return cli


def save_config(cli: MLPCLI) -> None:
    """The trial's config.yaml in its log folder, as its own fit would have written it."""
    for callback in cli.trainer.callbacks:
        if isinstance(callback, SaveConfigCallback):
            callback.setup(cli.trainer, cli.model, stage="fit")


class TrialCheckpoints(L.Callback):
    """The running trials' `ModelInStackCheckpoint`s, called as one at the few hooks where they act: Lightning
    calls every callback at every hook of every step, so K of them cost K calls per hook where this costs one."""

    def __init__(self, running: dict[str, ModelInStackCheckpoint]) -> None:
        self.running = running  # by trial name; a trial's entry goes when it leaves the stack

    def setup(self, trainer: L.Trainer, module: FusedClassifier, stage: str) -> None:
        for checkpoint in self.running.values():
            checkpoint.setup(trainer, module, stage)

    def on_validation_end(self, trainer: L.Trainer, module: FusedClassifier) -> None:
        for checkpoint in list(self.running.values()):
            checkpoint.on_validation_end(trainer, module)

    def on_train_epoch_end(self, trainer: L.Trainer, module: FusedClassifier) -> None:
        for checkpoint in list(self.running.values()):
            checkpoint.on_train_epoch_end(trainer, module)
