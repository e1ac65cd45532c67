"""The one place that turns command-line flags into a Trainer, a model and a data module: scripts/fit.py and
scripts/tune.py both build their runs here, so a flag means the same in both."""

import contextlib
import enum
import fcntl
import logging
import os
import pydoc
import re
import signal
import sys
import threading
import traceback
import warnings
from argparse import ArgumentError
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

import torch
import yaml
from jsonargparse import Namespace
from jsonargparse.typing import register_type
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import (
    BackboneFinetuning, BatchSizeFinder, EarlyStopping, GradientAccumulationScheduler, ModelCheckpoint, ModelPruning,
    ProgressBar, SpikeDetection, TQDMProgressBar
)
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.multiprocessing import ProcessRaisedException

from mlp import classes
from mlp.errors import UserError, check
from mlp.loading import read_checkpoint

LOG_DIR = "lightning_logs"
SEEDS = 2**32  # --seed_everything's values, numpy's seeds: 0 to SEEDS - 1

# Lightning 2.6 builds a LeafSpec, which this torch deprecates, whenever it flattens a batch: printed at every fit
# start, nothing in how we call Lightning causes it, and nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
# Lightning 2.6 advertises its cloud products ("💡 Tip: ... litlogger", "... litmodels") at every Trainer it builds.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip:"))

# A callback's defaults, written to a run's config.yaml so that it builds the run again: an enum (Timer's `interval`)
# as its value, which YAML's safe dumper cannot write; a torch.device (StochasticWeightAveraging's) as its name, which
# jsonargparse cannot serialise otherwise.
yaml.SafeDumper.add_multi_representer(enum.Enum, lambda dumper, value: dumper.represent_data(value.value))
register_type(torch.device)


class MLPCLI(LightningCLI):
    """LightningCLI with a best-by-val/acc checkpoint, a quieter progress bar and a `--ckpt_path` to resume from."""

    # Building the parser reads every class signature, slower than parsing and instantiating together
    # (docs/results.md#parser-cpu); tune.py builds a run per trial, so runs of the same settings share one parser.
    parsers: ClassVar[dict[str, LightningArgumentParser]] = {}

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
                     ) -> None:
        # Everything LightningCLI builds the parser from: the classes whose signatures become flags, and the settings.
        settings = repr((self.trainer_class, self.model_class, self.datamodule_class, self.subclass_mode_model,
                         self.subclass_mode_data, self.auto_configure_optimizers, add_subcommands, main_kwargs,
                         subparser_kwargs, self.trainer_defaults, self.seed_everything_default))
        if settings not in self.parsers:
            super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
            self.parsers[settings] = self.parser
        self.parser = self.parsers[settings]

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(FiniteCheckpoint, "checkpoint")
        # save_last off: Lightning 2.6 writes last.ckpt only when the best improves; our `latest` writes it each epoch.
        parser.set_defaults({"checkpoint.monitor": "val/acc", "checkpoint.mode": "max", "checkpoint.save_last": False,
                             "checkpoint.filename": "epoch{epoch:02d}-val_acc{val/acc:.4f}",
                             "checkpoint.auto_insert_metric_name": False})
        parser.add_lightning_class_args(TQDMProgressBar, "progress_bar")
        # Redrawing the bar every step costs more than a step of this small net; 0 hides it.
        parser.set_defaults({"progress_bar.refresh_rate": 50})
        parser.add_argument("--ckpt_path", type=str | None, default=None, help='checkpoint to resume training from, '
                            'or "last": the newest run in the log folder that saved one')
        # The model's first layer takes what the data module serves; saved in the model's hyperparameters, so a
        # checkpoint still reloads alone.
        parser.link_arguments("data.input_size", "model.input_size", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # A flag that is wrong is said in one line, not after the usage of every flag (tune.py's typos got fit.py's).
        parser.exit_on_error = False
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            said = " ".join(line.strip() for line in str(error).splitlines())
            raise UserError(f"{said} (fit.py --help lists every fit flag; tune.py --help its own)") from None
        except UnicodeDecodeError as error:  # a checkpoint or a photo given as --config
            raise UserError(f"a --config file is no YAML text ({error})") from None
        # Checked before LightningCLI seeds with it, where numpy's bounds are a ValueError's traceback.
        seed = self.config.seed_everything
        check(not isinstance(seed, int) or isinstance(seed, bool) or 0 <= seed < SEEDS,
              f"--seed_everything must be 0 to {SEEDS - 1} (numpy's seeds), true (drawn) or false, got {seed}")

    def before_instantiate_classes(self) -> None:
        # A --config section with every key commented out reads as null (`model:`), which no class is built from.
        empty = [name for name in ("trainer", "model", "data", "checkpoint")
                 if not isinstance(self.config[name], Namespace)]
        check(not empty, f"a --config file's `{empty[0] if empty else ''}:` holds no settings (indented `key: value` "
              "lines under it): give it some, or drop it")
        epochs, steps = self.config.trainer.max_epochs, self.config.trainer.max_steps
        check(epochs is None or epochs >= 1 or epochs == -1, f"--trainer.max_epochs must be >= 1, got {epochs}")
        schedule = self.config.model.schedule
        check(not (epochs == -1 and steps == -1 and schedule != "constant"),
              f"--trainer.max_epochs -1 trains without end, but the {schedule} schedule needs to know its length: "
              "give --trainer.max_steps, or use --model.schedule constant")
        # IndexBatches gives each rank its part of every batch; Lightning's DistributedSampler would pad the
        # evaluation and shuffle each rank apart.
        check(not self.config.trainer.use_distributed_sampler, "--trainer.use_distributed_sampler must stay false: "
              "the data module splits the batches between the processes itself")
        check(self.config.trainer.limit_train_batches != 0, "--trainer.limit_train_batches 0 would train on no batch: "
              "give a number of batches an epoch, or a fraction of the epoch")
        check(not self.config.trainer.overfit_batches, "--trainer.overfit_batches would swap the data module's "
              "batches for single images; --trainer.limit_train_batches N trains on N batches an epoch")
        check(not self.config.model.batch_norm or self.config.data.batch_size >= 2, "--model.batch_norm true "
              "standardises each hidden unit over the batch, which one image cannot give: --data.batch_size 2 or more")
        check(self.config.trainer.limit_test_batches != 0, "--trainer.limit_test_batches 0 would leave the run "
              "untested: a run tests its chosen checkpoint once, after training, the one time it reads the test set")
        if self.config.trainer.enable_progress_bar is False:
            # The bar is a callback of ours (`progress_bar`), which Lightning refuses beside this flag: hidden instead.
            self.config.trainer.enable_progress_bar, self.config.progress_bar.refresh_rate = None, 0
        saves = self.config.trainer.enable_checkpointing is not False
        if not saves:
            # Our checkpoints are callbacks, which Lightning refuses beside this flag: they save nothing instead.
            self.config.trainer.enable_checkpointing, self.config.checkpoint.save_top_k = None, 0
        monitor = self.config.checkpoint.monitor
        check(not (monitor and "loss" in monitor and self.config.checkpoint.mode == "max"), f"--checkpoint.monitor "
              f"{monitor} is a loss, and --checkpoint.mode max (for val/acc) would keep its highest epoch: add "
              "--checkpoint.mode min")
        validates = self.config.data.val_size > 0
        if not validates:
            # No validation split: nothing to validate, so the checkpoint keeps the final epoch's weights.
            self.config.trainer.limit_val_batches = 0
            self.config.checkpoint.monitor, self.config.checkpoint.filename = None, "epoch{epoch:02d}"
        # Added to the run's own callbacks at instantiation: `latest` keeps last.ckpt, the end of the latest epoch, for
        # `--ckpt_path last`; the guard watches the loss this run has.
        latest = LatestCheckpoint(filename="last", monitor=None, save_top_k=1, enable_version_counter=False)
        self.trainer_defaults["callbacks"] = [*[latest][:saves], DivergenceGuard(validates), InterruptAtBatchEnd()]
        if self.config.ckpt_path == "last":
            self.resume_last()

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (MisconfigurationException, ValueError) as error:
            # A class refused its arguments (`--checkpoint.save_top_k -2`) or could not be built (a callback's extra
            # not installed); jsonargparse wraps its error, which says what is wrong, in one listing every type tried.
            cause: BaseException = error
            while cause.__cause__ or cause.__context__:
                cause = cause.__cause__ or cause.__context__
            raise UserError(f"the flags do not build the run: {cause}") from None
        except RuntimeError as error:
            if "can't allocate memory" not in str(error):  # torch's CPU allocator
                raise
            raise UserError("the model's weights do not fit in this machine's memory: give a smaller --model.width "
                            "or --model.depth") from None

    @property
    def checkpoint_callback(self) -> ModelCheckpoint:
        """The run's checkpoint by val/acc (`--checkpoint.*`; without validation, its final epoch's), the one a run
        tests: trainer.checkpoint_callback is the first in the Trainer, a user's own ModelCheckpoint if one is added."""
        return self.config_init["checkpoint"]

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # Lightning checks the accelerator, devices and strategy against the machine as the Trainer is built, and its
        # message says what is wrong (no GPU, a strategy that needs one, devices 0, an uninstalled package's name).
        own = self.config_init.trainer.callbacks
        if any(isinstance(callback, ProgressBar) for callback in (own if isinstance(own, list) else [own])):
            # The user's (--trainer.callbacks+=RichProgressBar) replaces ours, beside which Lightning refuses it.
            self.config_init.progress_bar = Callback()
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, ImportError) as error:
            raise UserError(f"the --trainer flags do not fit this machine or each other: {error}") from None

        def given(kind: type[Callback]) -> bool:
            return any(isinstance(callback, kind) for callback in trainer.callbacks)

        schedule = self.config.model.schedule
        check(schedule == "constant" or not given(BatchSizeFinder),
              f"--trainer.callbacks BatchSizeFinder would change the batch size once the {schedule} schedule was sized "
              "by its steps: give --data.batch_size yourself, or use --model.schedule constant")
        check(self.config.model.backward != "manual" or not given(GradientAccumulationScheduler),
              "--trainer.callbacks GradientAccumulationScheduler needs Lightning's automatic optimisation, which "
              "--model.backward manual turns off: drop one of them")
        check(self.config.model.backward != "manual" or getattr(trainer.precision_plugin, "scaler", None) is None,
              "float16 mixed precision scales the loss inside autograd's backward, which --model.backward manual "
              "never calls: use --trainer.precision bf16-mixed (or 32-true) with it")
        check(not given(ModelPruning) or ModelPruning.sanitize_parameters_to_prune(self.model),
              "--trainer.callbacks ModelPruning prunes the `weight` and `bias` of torch's layer modules, which this "
              "from-scratch net has none of: its weights are plain tensors (MLP.params)")
        check(not given(BackboneFinetuning) or hasattr(self.model, "backbone"), "--trainer.callbacks "
              "BackboneFinetuning unfreezes a model's `backbone` module, which MLPClassifier has none of")
        # Lightning-AI/pytorch-lightning#21752; tests/test_private_apis.py fails once a release mends it.
        check(not given(SpikeDetection), "--trainer.callbacks SpikeDetection: Lightning 2.6's cannot load its state "
              "back from a checkpoint, which testing the best checkpoint and resuming both do")
        return trainer

    def resume_last(self) -> None:
        """`--ckpt_path last`: continue the newest run that saved last.ckpt or on_exception.ckpt, from the newer
        of the two, in that run's folder. A run that failed before saving either is passed over, never restarted."""
        logger = self.config.trainer.logger
        if logger is False:  # --trainer.logger false: the run's checkpoints are in default_root_dir's
            runs, version = Path(self.config.trainer.default_root_dir or "."), "."
            folders = [runs]
        elif not getattr(logger, "init_args", None):
            return  # a logger of Lightning's default: it looks for last.ckpt itself
        else:
            runs = Path(logger.init_args.save_dir) / logger.init_args.name
            version = logger.init_args.version
            if version is not None:
                folders = [run_folder(runs, version)]
            else:
                numbered = (p for p in runs.glob("version_*") if p.name[8:].isdigit())
                folders = sorted(numbered, key=lambda p: int(p.name[8:]), reverse=True)
        for folder in folders:
            if saved := resumable_checkpoints(folder):
                if logger is not False:
                    logger.init_args.version = folder.name
                self.config.ckpt_path = str(max(saved, key=lambda path: path.stat().st_mtime))
                return
        where = folders[0].resolve() if version is not None else runs
        raise UserError(f"--ckpt_path last: no run in {where} saved a checkpoint to resume; start without --ckpt_path")


@contextlib.contextmanager
def run_folder_alone(cli: MLPCLI, new: bool) -> Iterator[None]:
    """Hold the folder the run saves in (one --trainer.logger.init_args.version names, or without a logger
    default_root_dir) for this process alone while it trains: two runs in one folder, started at once or one resuming
    the other, overwrite each other's checkpoints. A `new` run is refused, under the lock so that two started at once
    cannot both pass, where a run saved checkpoints: theirs and this one's would read as one run's, and its last.ckpt
    be overwritten (Lightning only warns). One that saved none is no run to keep."""
    folder = cli.trainer.log_dir
    # Nothing saved: no checkpoint callback (a stack of trials' Trainer, mlp.trials), or fast_dev_run.
    if not cli.trainer.checkpoint_callbacks or cli.trainer.fast_dev_run or folder is None:
        yield
        return
    logged = cli.config.trainer.logger is not False
    choose = "--trainer.logger.init_args.version" if logged else "--trainer.default_root_dir"
    with held_alone(Path(folder) / "training.lock", f"another process is training into {Path(folder).resolve()}: "
                    f"wait for it to end, or give this run another {choose}"):
        check(not new or not any((Path(folder) / "checkpoints").glob("*.ckpt")), f"{Path(folder).resolve()} holds a "
              f"run already, whose checkpoints this one would mix with its own: give another {choose}, or continue "
              "that run with --ckpt_path last")
        yield


@contextlib.contextmanager
def held_alone(lock: Path, busy: str) -> Iterator[None]:
    """Run the block while this process alone holds the kernel's lock on the file `lock`, or refuse, saying `busy`.
    The kernel frees a dead process's lock, so a file a killed process left refuses nothing; the holder removes it as it
    lets go. Under DDP, Lightning's processes rerun the script in step with rank 0's: only rank 0 locks, and makes the
    folder (another's logger, started after it, numbers its run past rank 0's, which they agree on once connected)."""
    if rank_zero_only.rank != 0:
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(busy) from None
        # Unlinked: its holder let go between this process's opening it and locking it, and another may hold a new one.
        check(os.fstat(held.fileno()).st_nlink > 0, busy)
        try:
            yield
        finally:
            lock.unlink()


def run_folder(runs: Path, version: int | str) -> Path:
    """The folder of run `version` among `runs`, as TensorBoardLogger names it."""
    return runs / (version if isinstance(version, str) else f"version_{version}")


def resumable_checkpoints(run_folder: Path) -> list[Path]:
    """The checkpoints in a run's folder that `--ckpt_path last` resumes from: last.ckpt, the end of the latest
    epoch, and on_exception.ckpt, saved on Ctrl-C (ResumableOnInterrupt)."""
    saved = [run_folder / "checkpoints" / name for name in ("last.ckpt", ResumableOnInterrupt.FILE_NAME)]
    return [path for path in saved if path.is_file()]


class ResumableOnInterrupt(Callback):
    """Ctrl-C (or a crash) mid-training saves on_exception.ckpt, which `--ckpt_path last` resumes from; nothing
    before the first step, as a run that failed on bad input has nothing worth resuming. Not Lightning's
    OnExceptionCheckpoint, with which Lightning resumes every fit started without a checkpoint from whatever its
    folder holds (warning twice where it holds none); we resume only when `--ckpt_path` asks."""

    FILE_NAME = "on_exception.ckpt"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Known only now: under DDP, trainer.log_dir is rank zero's run folder on every rank once they are connected.
        # None where the run keeps no checkpoint (--trainer.enable_checkpointing false, or fast_dev_run: no folder).
        # A user's OnExceptionCheckpoint is a checkpoint callback too, with no top k.
        saves = trainer.log_dir is not None and any(
            isinstance(c, ModelCheckpoint) and c.save_top_k for c in trainer.checkpoint_callbacks)
        self.path = Path(trainer.log_dir) / "checkpoints" / self.FILE_NAME if saves else None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if trainer.global_step > 0 and self.path is not None:
            trainer.save_checkpoint(self.path, weights_only=False)  # the whole state, to resume


class InterruptAtBatchEnd(Callback):
    """During a run, Ctrl-C stops it at the end of the current batch instead of wherever Python was.

    A KeyboardInterrupt can land inside a library's critical section and leave it broken: in TensorBoard's queue.put,
    between counting the item and waking its writer thread, it leaves the run's final flush waiting two minutes for
    that thread's next timed flush. So from setup to teardown SIGINT only records the request, and the next batch's
    end raises KeyboardInterrupt, which Lightning handles as any Ctrl-C: a second Ctrl-C raises at once, and a
    request with no batch left is raised at teardown.
    """

    def __init__(self) -> None:
        self.requested = self.active = False
        self.previous: Any = signal.default_int_handler  # the SIGINT handler before the run, put back after it

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self.requested, self.active = False, True
            self.previous = signal.signal(signal.SIGINT, self.request) or signal.default_int_handler

    def request(self, signum: int, frame: FrameType | None) -> None:
        if not self.active:
            # Lightning puts back the handlers of the run's start after an interrupted run, so this one can
            # outlive its run: then it is the handler it replaced.
            if callable(self.previous):
                self.previous(signum, frame)
            elif self.previous != signal.SIG_IGN:
                raise KeyboardInterrupt
        elif self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def raise_if_requested(self, *_: Any) -> None:
        if self.active and self.requested:
            raise KeyboardInterrupt

    on_train_batch_end = on_validation_batch_end = on_test_batch_end = on_predict_batch_end = raise_if_requested

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.active = False

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.active:
            return
        self.active = False
        if signal.getsignal(signal.SIGINT) == self.request:
            signal.signal(signal.SIGINT, self.previous)
        if self.requested:
            raise KeyboardInterrupt


class DivergenceGuard(EarlyStopping):
    """Stops training as soon as the epoch's loss (the validation loss, or without a validation split the training
    loss) is NaN or infinite, and at no other time; `FusedClassifier` applies the same rule to each stacked model.
    A class of its own so that a user's EarlyStopping on the same loss keeps its state apart (Lightning keys a
    callback's state by its class and monitor) and its stop is not taken for a divergence."""

    def __init__(self, validates: bool) -> None:
        # Not strict without validation: an epoch resumed after its last step logs no training loss.
        super().__init__("val/loss" if validates else "train/loss_epoch", check_finite=True, patience=sys.maxsize,
                         check_on_train_epoch_end=not validates, strict=validates)


def divergence_message(trainer: Trainer) -> str | None:
    """When and why the divergence guard stopped training, or None if it did not."""
    guard = next((callback for callback in trainer.callbacks if isinstance(callback, DivergenceGuard)), None)
    if guard is not None and guard.stopping_reason_message:
        return f"epoch {guard.stopped_epoch}: {guard.stopping_reason_message}"
    return None


class LatestCheckpoint(ModelCheckpoint):
    """last.ckpt, the end of the latest epoch. A class of its own, so that a user's ModelCheckpoint without a monitor
    (--trainer.callbacks+=ModelCheckpoint) keeps its state apart: Lightning keys a callback's state by class and
    settings, and refuses two callbacks of one key."""


class FiniteCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps nothing of the epoch the DivergenceGuard stopped training at, its loss not finite:
    that epoch's val/acc is chance, which may still be the first or beat an earlier one, and its weights are NaN. The
    guard has judged the epoch by then: Lightning calls the checkpoint callbacks after the others, at both hooks."""

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if divergence_message(trainer) is None:
            super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if divergence_message(trainer) is None:  # where a run without validation saves
            super().on_train_epoch_end(trainer, pl_module)


def check_keeps_a_checkpoint(cli: MLPCLI, why: str) -> None:
    """Refuse, saying `why` the caller needs it, a run that keeps no best checkpoint: --trainer.fast_dev_run,
    --trainer.enable_checkpointing false or --checkpoint.save_top_k 0 (fit.py then tests the final weights)."""
    check(not cli.trainer.fast_dev_run and cli.config.checkpoint.save_top_k != 0,
          f"{why}: drop --trainer.fast_dev_run, --trainer.enable_checkpointing false and --checkpoint.save_top_k 0 "
          "(fit.py takes them)")


def validates_within(cli: MLPCLI, epochs: int) -> bool:
    """Whether a run of `epochs` epochs measures val/acc at least once: validation batches, and an epoch to run them."""
    return bool(cli.trainer.limit_val_batches) and (cli.trainer.check_val_every_n_epoch or 1) <= epochs


def fit(cli: MLPCLI, ckpt_path: str | None = None) -> None:
    """cli.trainer.fit on the CLI's model and data. Lightning ends a Ctrl-C'd fit with sys.exit(1), raised here as
    KeyboardInterrupt: callers (the script's error handler, Optuna's trial bookkeeping) tell it from an exit."""
    if ckpt_path not in (None, "last"):  # "last" stays only where Lightning looks for it (no log folder of ours)
        check_resumable(ckpt_path, cli)
    try:
        with run_folder_alone(cli, new=ckpt_path is None), errors_of_processes():
            # A checkpoint to resume from is a file the user hands over: tensors and plain values only (mlp.loading).
            cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, weights_only=True)
    except (MisconfigurationException, ValueError) as error:  # flags Lightning checks only as it fits, with the data
        # A ValueError is a flag's only where Lightning raised it (--trainer.val_check_interval above the batches);
        # one raised in our code or a fork's is a bug, and keeps its traceback.
        raised_in = Path(traceback.extract_tb(error.__traceback__)[-1].filename).parts
        if isinstance(error, ValueError) and "lightning" not in raised_in:
            raise
        raise UserError(f"the --trainer flags do not fit this run: {str(error).strip()}") from None
    except SystemExit as exit:
        if cli.trainer.interrupted:
            raise KeyboardInterrupt from exit
        raise


@contextlib.contextmanager
def errors_of_processes() -> Iterator[None]:
    """An error of a process Lightning started (--trainer.strategy ddp_spawn or ddp_fork) arrives as torch's
    ProcessRaisedException, which holds only its traceback's text: a UserError or MisconfigurationException is raised
    again from the class and message that end it, to be said in one line; any other error keeps its traceback."""
    try:
        yield
    except ProcessRaisedException as error:
        # The last traceback (of a chain), less its indented frames: "module.Class: message", the message whole.
        last = str(error).rpartition("Traceback (most recent call last):\n")[2]
        name, _, message = re.sub(r"^(\s.*\n)*", "", last).rstrip().partition(": ")
        kind = pydoc.locate(name)
        for base in (UserError, MisconfigurationException):
            if isinstance(kind, type) and issubclass(kind, base):
                raise base(message) from None
        raise


def check_resumable(ckpt_path: str, cli: MLPCLI) -> None:
    """A run resumes from a checkpoint of fit.py's with the model and split it began with: another net would not
    load, other hyperparameters would be overridden by the saved optimiser and schedule, and another split would
    validate on images the run trained on. (A schedule made for another length: MLPClassifier.configure_optimizers.)"""
    try:
        saved = read_checkpoint(Path(ckpt_path))
    except UserError as error:  # not found, no checkpoint, or a pickle that would run code
        raise UserError(f"--ckpt_path {error}") from None
    check(saved.optimizer_states is not None, f"--ckpt_path {ckpt_path} holds a model's weights alone, as tune.py "
          "saves a trial's, not a run's state to resume: train a configuration anew, as fit.py --config with a "
          "study's best_config.yaml does")

    def flags(model: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
        return {**{f"model.{k}": v for k, v in model.items()}, **{f"data.{k}": data[k] for k in ("val_size", "seed")}}

    began = flags(saved.hyper_parameters, saved.datamodule_hyper_parameters.model_dump())
    now = flags(cli.model.hparams, cli.datamodule.hparams)
    changed = [f"--{flag} {was} (now {now[flag]})" for flag, was in began.items() if flag in now and was != now[flag]]
    check(not changed, f"--ckpt_path {ckpt_path} began with {', '.join(changed)}: resume with the flags its run began "
          "with, or start a new run without --ckpt_path")
    # A run's own folder (a resumed run's config.yaml names both): its later checkpoints would be overwritten.
    latest, into = Path(ckpt_path).parent / "last.ckpt", cli.trainer.log_dir  # None: the run keeps nothing
    check(not (into and latest.is_file() and latest.parent.resolve() == (Path(into) / "checkpoints").resolve()
               and read_checkpoint(latest).global_step > saved.global_step),
          f"--ckpt_path {ckpt_path}: its run went on past it, to {latest}, which resuming in that run's folder would "
          "overwrite: continue with --ckpt_path last, or train anew without --ckpt_path")


def release_processes() -> None:
    """Ends this process's DDP process group, if any, once its work is done. Lightning leaves it open (later fits and
    tests reuse it); at the interpreter's exit, gloo's threads outlive it and the process aborts ("terminate called
    without an active exception", exit status 134)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def build_cli(args: list[str] | None = None) -> MLPCLI:
    """Parse `args` (sys.argv when None) and instantiate the Trainer, model and data module without running."""
    with warnings.catch_warnings():
        # tune.py's own flags stay in sys.argv while its trials pass their fit flags as `args`.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return MLPCLI(
            classes.MODEL, classes.DATA, run=False, args=args, seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # the module's configure_optimizers owns the optimiser and schedule
            # The model and data save their __init__ arguments (plain values), so a checkpoint reloads without
            # LightningCLI's copy of the config, whose YAML round trip is 1/3 of a build (docs/results.md#build-cpu).
            load_from_checkpoint_support=False,
            trainer_defaults={"max_epochs": 20, "use_distributed_sampler": False, "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": LOG_DIR, "name": "fit", "default_hp_metric": False}}},
        )
