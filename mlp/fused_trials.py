"""`tune.py --fuse K`: the study's trials asked K at a time and trained together as stacked networks.

Each trial is built by `mlp.cli.build_cli` from the user's fit flags plus its suggestions, exactly as an
unfused trial is (same initial weights, same TensorBoard folder, same checkpoint folder); its model then
joins a `FusedClassifier` with the other trials asked with it (all stepped together), in one Trainer built
from the same fit flags: on a GPU one stack per depth, padded to its widest trial; on the CPU one stack per
depth and width, as padding costs the CPU its arithmetic (`pads_widths`).
Every epoch each trial reports its own val/acc and is pruned on its own; it leaves the stack when pruned,
diverged or done with its own epochs, and at that epoch's end the study is asked for a trial to take its
place, so up to K trials train at every epoch while the study has trials to start. Optuna's ask-and-tell
records each trial as the unfused path does.
"""

import math
import os
import socket
import warnings
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import lightning as L
import optuna
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from optuna.trial import TrialState

from mlp.cli import MLPCLI, build_cli, fit
from mlp.data import EVAL_BATCH_SIZE, FashionMNISTDataModule
from mlp.errors import check
from mlp.fused import FusedClassifier, ModelInStackCheckpoint, save_single
from mlp.net import multiply_adds
from mlp.search import SearchSpace, report_schedule_fraction, suggest, trial_args
from mlp.study import (
    Heartbeats,
    gives_way,
    is_surplus,
    log,
    mark_surplus,
    may_start_trial,
    surplus_trials,
)


class FusedTrials:
    """Runs up to `fuse` trials at once; `run_trials` calls `start_trials` while the study may start one."""

    def __init__(self, space: SearchSpace, fit_args: list[str], study_name: str, n_trials: int, fuse: int) -> None:
        self.space, self.fit_args, self.study_name = space, fit_args, study_name
        self.n_trials, self.fuse = n_trials, fuse
        self.interrupted = False  # on Ctrl-C every running trial is failed, then run_trials stops
        self.ran: list[int] = []  # numbers of the trials this worker trained

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

    def start_trials(self, study: optuna.Study, may_refill: Callable[[], bool]) -> None:
        """Train up to `fuse` trials at once, refilling each freed place while `may_refill()` allows."""
        asked = self.ask(study, self.fuse)
        if not asked:  # another worker took the place run_trials saw free (its trial surplus, or a retry taken)
            return
        running = [trial for trial, _ in asked]  # a trial leaves this list when the study is told its end
        with Heartbeats(study, running):
            try:
                self.train(study, asked, running, may_refill)
            except BaseException as error:
                self.interrupted = isinstance(error, KeyboardInterrupt)
                for trial in running:
                    if self.interrupted:
                        trial.set_user_attr("interrupted", True)
                    study.tell(trial, state=TrialState.FAIL)
                if not self.interrupted:
                    raise

    def train(
        self,
        study: optuna.Study,
        group: list[tuple[optuna.Trial, dict[str, Any]]],
        running: list[optuna.Trial],
        may_refill: Callable[[], bool],
    ) -> None:
        """Train the trials of `group` in one Trainer. Each trial's end is told the study as it leaves its stack,
        so a trial with fewer epochs completes at its own last epoch; then, while `may_refill()` allows, trials
        asked from the study join for the next epoch in the places freed."""
        trials: dict[str, optuna.Trial] = {}
        checkpoints: dict[str, ModelInStackCheckpoint] = {}

        def prepare(trial: optuna.Trial, flags: dict[str, Any]) -> MLPCLI:
            """The trial's own run, built as an unfused trial's, and its checkpoint."""
            cli = build_cli(trial_args(self.fit_args, flags, self.study_name, f"trial_{trial.number}"))
            trial.set_user_attr("log_dir", cli.trainer.log_dir)
            trial.set_user_attr("multiply_adds", multiply_adds(cli.model.hparams.depth, cli.model.hparams.width))
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
            save_config(cli)
            name = str(trial.number)
            trials[name] = trial
            checkpoints[name] = ModelInStackCheckpoint(name, str(Path(cli.trainer.log_dir) / "checkpoints"))
            self.ran.append(trial.number)
            return cli

        def tell(name: str, how: str, detail: str) -> None:
            trial = trials[name]
            if how == "finished":
                value = checkpoints[name].best_model_score.item()
                trial.set_user_attr("best_checkpoint", checkpoints[name].best_model_path)
                study.tell(trial, value)
                log.info(f"Trial {name} finished with value: {value} and parameters: {trial.params}.")
            elif how == "surplus":
                mark_surplus(trial)
                study.tell(trial, state=TrialState.FAIL)
            else:
                if how == "diverged":
                    trial.set_user_attr("diverged", detail)
                study.tell(trial, state=TrialState.PRUNED)
                log.info(f"Trial {name} pruned{f' (diverged in {detail})' if detail else ''}.")
            running.remove(trial)
            del trial_checkpoints.running[name]

        def refill(module: FusedClassifier) -> None:
            free = self.fuse - len(module.names)
            if not free or not may_refill():
                return
            for trial, flags in self.ask(study, free):
                running.append(trial)
                # A trial's build seeds the random generators for its initial weights; the group's batch order
                # and dropout masks go on from where they were.
                with torch.random.fork_rng(devices=[module.device.index] if module.device.type == "cuda" else []):
                    cli = prepare(trial, flags)
                checkpoint = checkpoints[str(trial.number)]
                checkpoint.setup(group_run.trainer, module, stage="fit")
                trial_checkpoints.running[str(trial.number)] = checkpoint
                module.add(cli.model, cli.trainer.max_epochs, str(trial.number), cli.trainer.logger)

        clis = [prepare(trial, flags) for trial, flags in group]
        epochs = [cli.trainer.max_epochs for cli in clis]
        loggers = [cli.trainer.logger for cli in clis]
        group_run = group_cli(self.fit_args, max(epochs))
        # A trial pruned at this epoch's validation leaves the stack only at the epoch's end, so its checkpoint
        # still saves this epoch's weights when they are its best (an unfused trial's pruning stops it first).
        trial_checkpoints = TrialCheckpoints(dict(checkpoints))
        group_run.trainer.callbacks += [ReportAndPrune(study, trials, self.n_trials), trial_checkpoints]
        models = [cli.model for cli in clis]
        group_run.model = FusedClassifier(
            models, epochs, list(trials), loggers, on_leave=tell, refill=refill, pad_widths=pads_widths(group_run)
        )
        fit(group_run)


def group_cli(fit_args: list[str], epochs: int) -> MLPCLI:
    """The Trainer and data of one stacked group, from the user's fit flags, trained for `epochs`.

    Each trial keeps its own logger, checkpoint, divergence guard and saved config, so the group has none.
    """
    cli = build_cli([
        *fit_args, f"--trainer.max_epochs={epochs}", "--trainer.logger=false",
        "--trainer.enable_model_summary=false", "--progress_bar.refresh_rate=0",
    ])
    own = (ModelCheckpoint, EarlyStopping, SaveConfigCallback)
    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, own)]
    return cli


def train_refits(
    runs: dict[str, MLPCLI], fit_args: list[str]
) -> tuple[dict[str, tuple[str, bool]], FashionMNISTDataModule]:
    """Train refit runs together (stacked as `FusedTrials` stacks trials), each as its own `runs[name]` (built
    with --data.val_size=0) would train alone, and write each model's final weights as an ordinary checkpoint at
    its own last epoch.

    Returns, by name, the checkpoint's path and whether the model's last epoch ended finite (every step's
    training loss and every weight), which is what an unfused refit checks; and the data they trained on.
    """
    for cli in runs.values():
        save_config(cli)
    epochs = [cli.trainer.max_epochs for cli in runs.values()]
    group = group_cli([*fit_args, "--data.val_size=0"], max(epochs))
    saver = FinalWeights({name: str(Path(cli.trainer.log_dir) / "checkpoints") for name, cli in runs.items()})
    group.trainer.callbacks.append(saver)
    loggers = [cli.trainer.logger for cli in runs.values()]
    models = [cli.model for cli in runs.values()]
    group.model = FusedClassifier(models, epochs, list(runs), loggers, pad_widths=pads_widths(group))
    fit(group)
    return saver.saved, group.datamodule


class FinalWeights(L.Callback):
    """At the end of each model's own last epoch, before the module lets it leave the stack, writes its
    weights to `dirpaths[name]/epochNN.ckpt` (an unfused refit's file name) and notes whether it ended finite."""

    def __init__(self, dirpaths: dict[str, str]) -> None:
        self.dirpaths = dirpaths
        self.saved: dict[str, tuple[str, bool]] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, module: FusedClassifier) -> None:
        for k, (name, epochs) in enumerate(zip(module.names, module.epochs)):
            epoch = module.progress(k)[0]
            if epoch + 1 == epochs:
                path = str(Path(self.dirpaths[name]) / f"epoch{epoch:02d}.ckpt")
                single = save_single(trainer, name, path)
                losses = torch.stack([loss[k] for loss, _, _ in module.train_step_outputs])
                finite = torch.isfinite(losses).all() and all(p.isfinite().all() for p in single.parameters())
                self.saved[name] = (path, bool(finite))


def pads_widths(cli: MLPCLI) -> bool:
    """Whether trials of one depth but different widths share a stack: on a GPU, where a stack of K costs
    little more than one model, yes; on the CPU, where a step costs its multiply-adds and padding the default
    search's widths measured 1.78x the nets' own (a stack per width: 1.03x), no."""
    return cli.trainer.strategy.root_device.type != "cpu"


def save_config(cli: MLPCLI) -> None:
    """The trial's config.yaml in its log folder, as its own fit would have written it."""
    for callback in cli.trainer.callbacks:
        if isinstance(callback, SaveConfigCallback):
            callback.setup(cli.trainer, cli.model, stage="fit")


class TrialCheckpoints(L.Callback):
    """The running trials' checkpoint callbacks, called as one. Lightning calls every callback at every hook of
    every step, and a `ModelInStackCheckpoint` acts only when training starts and at validation's end, so K of
    them cost K calls per hook where this costs one: 2.5-3.3 ms less a step for 128 tiny trials, 1.2-1.7 ms for
    64, on the 2-core CPU."""

    def __init__(self, running: dict[str, ModelInStackCheckpoint]) -> None:
        self.running = running  # by trial name; a trial's entry goes when it leaves the stack

    def setup(self, trainer: L.Trainer, module: FusedClassifier, stage: str) -> None:
        for checkpoint in self.running.values():
            checkpoint.setup(trainer, module, stage)

    def on_train_start(self, trainer: L.Trainer, module: FusedClassifier) -> None:
        for checkpoint in self.running.values():
            checkpoint.on_train_start(trainer, module)

    def on_validation_end(self, trainer: L.Trainer, module: FusedClassifier) -> None:
        for checkpoint in list(self.running.values()):
            checkpoint.on_validation_end(trainer, module)


class ReportAndPrune(L.Callback):
    """Each epoch, each trial still in the stack reports its val/acc at the fraction of its own schedule done
    (as an unfused trial does) and is pruned on its own; a trial that the study of n_trials no longer has a
    place for stops."""

    def __init__(self, study: optuna.Study, trials: dict[str, optuna.Trial], n_trials: int) -> None:
        self.study, self.trials, self.n_trials = study, trials, n_trials
        self.previous: dict[str, float] = {}  # each trial's val/acc at its last epoch

    def on_validation_end(self, trainer: L.Trainer, module: FusedClassifier) -> None:
        if trainer.sanity_checking:
            return
        surplus = surplus_trials(self.study, self.n_trials)
        for k, (name, epochs) in enumerate(zip(module.names, module.epochs)):
            if self.trials[name].number in surplus:
                gives_way(self.trials[name], module.progress(k)[0] + 1)
                module.stop(name, "surplus")
                continue
            value = trainer.callback_metrics[f"val/acc/{name}"].item()
            prune = report_schedule_fraction(
                self.trials[name], module.progress(k)[0], epochs, value, self.previous.get(name)
            )
            self.previous[name] = value
            if name not in module.stopping and prune:
                module.stop(name, "pruned")


DATASET_BYTES = 70_000 * (784 * 4 + 8)  # the whole of Fashion-MNIST as float pixels and int64 labels


def stack_bytes(fuse: int, depth: int, width: int, batch_size: int, optimizer: str, bytes_per_number: int) -> int:
    """A generous estimate of the device memory a stack of `fuse` models of this shape needs to train."""
    sizes = [784] + [width] * depth + [10]
    params = sum(fan_in * fan_out + fan_out for fan_in, fan_out in pairwise(sizes)) + depth
    # Parameters, gradients, one more copy while the stack is rebuilt without a model, and the optimiser's
    # state (SGD's momentum; Adam's two moments).
    weights = (3 + {"sgd": 1, "adam": 2}[optimizer]) * params
    # Per example: the input each model reads, and per hidden unit its pre-activation, activation, mask and
    # their gradients; evaluation keeps no gradients but takes larger batches.
    training = batch_size * (784 + 6 * depth * width + 3 * 10)
    evaluation = max(batch_size, EVAL_BATCH_SIZE) * (784 + 2 * depth * width + 10)
    return fuse * (weights + max(training, evaluation)) * bytes_per_number


def free_gpu_bytes(cli: MLPCLI) -> int | None:
    """Free memory on the GPU the trials train on, or None when they train on the CPU."""
    device = cli.trainer.strategy.root_device
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def why_unfusable(cli: MLPCLI) -> tuple[str, str] | None:
    """Which fit flag keeps stacked trials from training as each would alone: why, and what to do instead; None
    when none does."""
    if cli.trainer.gradient_clip_val is not None:
        return (
            "--trainer.gradient_clip_val with --fuse: Lightning would clip the norm of all stacked trials' gradients "
            "together, not each trial's own",
            "drop the flag or use --fuse 1",
        )
    if getattr(cli.trainer.precision_plugin, "scaler", None) is not None:  # 16-mixed on a GPU
        return (
            f"--trainer.precision {cli.trainer.precision} with --fuse: its one loss scaler would skip every stacked "
            "trial's step whenever one trial's gradients overflow",
            "use --trainer.precision bf16-mixed or --fuse 1",
        )
    return None


def check_fusable(fuse: int, space: SearchSpace, cli: MLPCLI) -> None:
    """Refuse, before any trial, what a stack of `fuse` trials cannot train as the trials would alone."""
    unfusable = why_unfusable(cli)
    check(unfusable is None, "; ".join(unfusable or ()))
    check_stack_fits(fuse, space, cli, free_gpu_bytes(cli))


def stack_fits(space: SearchSpace, cli: MLPCLI, free_bytes: int) -> tuple[int, int, int, int]:
    """How many models of the search space's largest depth and width fit in `free_bytes` of GPU memory, with
    that depth and width and the bytes one model needs."""
    hp = cli.model.hparams
    depth = space.depth[1] if space.depth else hp.depth  # a pinned one is the fit flag's
    width = space.width[1] if space.width else hp.width
    per_model = stack_bytes(
        1, depth, width, cli.datamodule.hparams.batch_size, hp.optimizer, 8 if "64" in str(cli.trainer.precision) else 4
    )
    return (free_bytes - DATASET_BYTES) // per_model, depth, width, per_model


def check_stack_fits(fuse: int, space: SearchSpace, cli: MLPCLI, free_bytes: int | None) -> None:
    """Stop with a message naming a K that fits, rather than an out-of-memory error mid-study."""
    if free_bytes is None:
        return
    fits, depth, width, per_model = stack_fits(space, cli, free_bytes)
    advice = f"--fuse {fits} fits" if fits >= 1 else "even one does not fit: lower the --width or --depth range"
    check(
        fuse <= fits,
        f"--fuse {fuse}: a stack of {fuse} trials of up to depth {depth} and width {width} needs "
        f"about {(fuse * per_model + DATASET_BYTES) / 1e9:.1f} GB of GPU memory and {free_bytes / 1e9:.1f} GB is "
        f"free; {advice}",
    )


AUTO_FUSE_MAX = 128  # the most trials per stack measured on a GPU; it trained the most model-epochs per second
# On the CPU, with one width: 8 trials of 784-256-10 trained 2.0-2.2x faster at K = 8 than one at a time,
# 8 of 784-512-512-10 1.29-1.41x (the most of K = 1, 2, 4, 8) and 30 of them 1.39-1.45x (see the README).
CPU_FUSE = 8


def one_width(space: SearchSpace) -> bool:
    """Whether every trial of the search has the same width: pinned by a fit flag, or a range of one value."""
    return space.width is None or space.width[0] == space.width[1]


def auto_fuse(space: SearchSpace, cli: MLPCLI, free_bytes: int | None, n_trials: int) -> tuple[int, str]:
    """`--fuse auto` (tune.py's default): K for the device the trials train on and a study of `n_trials`, and why.

    On the CPU a stack holds trials of one depth and width (`pads_widths`). When the width is searched, few
    trials share one, so K models in a Trainer save only its per-step work, small against the default
    search's arithmetic: the fused default study took 1.98 s per default-net epoch against the unfused
    study's 1.74, and the same 8 default-space trials trained in 59.3 and 63.3 s fused against 60.5 and 71.8 s
    unfused. So K is 1 there, and CPU_FUSE when every trial has one width and the stacks fill. On a GPU, as
    many trials as fit in its free memory, up to AUTO_FUSE_MAX.

    Either way at most a quarter of the study's trials, rounded up: TPE draws a trial from the finished ones,
    and a stack of all the trials would ask every one before any finished, a random search. The fused default
    study at K = 8, a quarter of its 30 trials, matched the unfused study's best val/acc. With a fit flag that
    `check_fusable` refuses for stacks (`why_unfusable`), 1.
    """
    if unfusable := why_unfusable(cli):
        return 1, "one trial at a time: " + unfusable[0]
    if free_bytes is None:
        if not one_width(space):
            return 1, (
                "one trial at a time on the CPU, where trials of searched widths rarely share a stack and fusing "
                "them measured no faster"
            )
        fuse, why = CPU_FUSE, f"on the CPU, trials of one width share stacks; {CPU_FUSE} was the fastest K there"
    else:
        fuse = max(1, min(AUTO_FUSE_MAX, stack_fits(space, cli, free_bytes)[0]))
        why = f"{AUTO_FUSE_MAX} at most, and as many as fit in the GPU's free memory"
    quarter = math.ceil(n_trials / 4)
    if quarter < fuse:
        return quarter, f"{why}; at most a quarter of the {n_trials} trials, so that TPE learns from finished ones"
    return fuse, why
