"""The fault table in the README, one test (or a few) per row: each fault is provoked and its handling checked."""

import errno
import gzip
import os
import re
import runpy
import shlex
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import lightning as L
import optuna
from lightning.pytorch.callbacks import TQDMProgressBar
import pytest
import sqlalchemy.exc
import sqlalchemy.pool
import torch
from optuna.trial import TrialState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mlp.data import (
    DEBIAN_DIR,
    FILES,
    CorruptDatasetError,
    DatasetNotFoundError,
    FashionMNISTDataModule,
    locate_fashion_mnist,
)
from mlp.errors import UserError, run_script
from tests.conftest import Payload, write_idx, write_synthetic_dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import fit  # noqa: E402
import tune  # noqa: E402


def script_command(script: str, args: list[str], patch: str = "") -> list[str]:
    """A Python command running scripts/<script> with args, after `patch` (Python source) has run.

    Python leaves SIGINT ignored when it starts with it ignored, as every child of a background job does (POSIX);
    the child installs Python's usual handler, so Ctrl-C means the same however pytest was started.
    """
    code = (
        "import runpy, signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
        f"sys.argv = {[script, *args]!r}\n{patch}\nrunpy.run_path({script!r}, run_name='__main__')"
    )
    return [sys.executable, "-c", code]


def run(script: str, args: list[str], patch: str = "", timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        script_command(str(ROOT / "scripts" / script), args, patch),
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )


def start(script: str, args: list[str], patch: str = "") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        script_command(str(ROOT / "scripts" / script), args, patch),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )


def wait_for(process: subprocess.Popen, condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the process ended before {what}:\n{process.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def fit_args(data_dir: Path, log_dir: Path, *extra: str) -> list[str]:
    return [
        f"--data.data_dir={data_dir}", f"--trainer.logger.init_args.save_dir={log_dir}", "--data.val_size=100",
        "--data.batch_size=32", "--model.depth=1", "--model.width=16", "--trainer.max_epochs=2",
        "--progress_bar.refresh_rate=0", *extra,
    ]


# -- dataset missing everywhere ------------------------------------------------------------------------------


def test_missing_dataset_is_one_clear_error_with_nonzero_exit(tmp_path, monkeypatch, no_download, capfd):
    monkeypatch.setattr("mlp.data.DEBIAN_DIR", Path("/nonexistent"))
    args = [f"--data.data_dir={tmp_path / 'empty'}", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    with pytest.raises(SystemExit) as exit:
        run_script(lambda: fit.main(args), interrupted="")  # as scripts/fit.py runs its main
    message = exit.value.code
    assert isinstance(message, str) and message.startswith("error: Fashion-MNIST not found")
    assert str(tmp_path / "empty") in message and "/nonexistent" in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "Traceback" not in capfd.readouterr().err


# -- data_dir a file, unreadable, truncated or corrupt ---------------------------------------------------------


def test_data_dir_that_is_a_file_is_named(tmp_path):
    not_a_folder = tmp_path / "data.txt"
    not_a_folder.write_text("")
    with pytest.raises(DatasetNotFoundError, match=f"{not_a_folder} is a file"):
        locate_fashion_mnist(not_a_folder)


def corrupt(folder: Path, how: str, split: str = "train") -> str:
    """Damage one file of a synthetic dataset in `folder`; returns the damaged file's name."""
    images, labels = folder / FILES[f"{split}_images"], folder / FILES[f"{split}_labels"]
    if how == "wrong magic number":
        images.write_bytes(b"\x00\x00\x07\x07" + images.read_bytes()[4:])
    elif how == "wrong length":
        images.write_bytes(images.read_bytes()[:-100])
    elif how == "labels outside 0-9":
        write_idx(labels, torch.full((labels.stat().st_size - 8,), 12))  # after its 8-byte header, a byte a label
        return labels.name
    elif how == "a label short":  # a well-formed file, one label fewer than the images: the images are named
        write_idx(labels, torch.zeros(labels.stat().st_size - 9))
    elif how in ("truncated gzip", "gzip of data cut short"):
        gz, content = folder / f"{images.name}.gz", images.read_bytes()
        gz.write_bytes(gzip.compress(content)[:1000] if how == "truncated gzip" else gzip.compress(content[:-100]))
        images.unlink()
        return gz.name
    return images.name


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("how", ["wrong magic number", "wrong length", "labels outside 0-9", "truncated gzip",
                                 "gzip of data cut short", "a label short"])
def test_corrupt_idx_file_is_named_with_what_is_wrong_and_how_to_fix_it(tmp_path, how, split):
    folder = write_synthetic_dataset(tmp_path / "data", gz=False)
    name = corrupt(folder, how, split)
    data = FashionMNISTDataModule(data_dir=str(folder), val_size=100)
    with pytest.raises(CorruptDatasetError) as error:
        data.setup("fit")  # the test files too, though only trainer.test serves them
    # The .gz the user can replace, not its decompressed copy in the cache, which torchvision found cut short.
    assert str(error.value).startswith(f"{folder / name}: ")
    assert str(error.value).endswith(f"put Fashion-MNIST's own files there, or remove the four to use {DEBIAN_DIR}'s")
    if how == "labels outside 0-9":
        assert "labels must be 0-9, found 12" in str(error.value)


def test_a_corrupt_file_of_the_debian_package_is_to_be_reinstalled(tmp_path, monkeypatch):
    debian = write_synthetic_dataset(tmp_path / "debian")
    monkeypatch.setattr("mlp.data.DEBIAN_DIR", debian)
    (debian / f"{FILES['train_labels']}.gz").write_bytes(b"garbage")
    with pytest.raises(CorruptDatasetError) as error:
        FashionMNISTDataModule(data_dir=str(tmp_path / "own"), val_size=100).setup("fit")
    assert str(error.value).startswith(f"{debian / FILES['train_labels']}.gz: cannot be read as an IDX file")
    assert str(error.value).endswith("; restore them: sudo apt-get install --reinstall dataset-fashion-mnist")


@pytest.mark.parametrize("script", ["fit", "tune"])
def test_a_corrupt_test_file_stops_fit_and_tune_before_they_train(tmp_path, script):
    """It had been found as the run's best checkpoint was tested: after the whole training."""
    folder = write_synthetic_dataset(tmp_path / "data", gz=False)
    corrupt(folder, "truncated gzip", "test")
    if script == "fit":
        main, args = fit.main, fit_args(folder, tmp_path / "logs")
    else:
        main, args = tune.main, [*tune_args(folder, tmp_path, n_trials=1), "--epochs", "1", "1"]
    with pytest.raises(CorruptDatasetError, match=f"{FILES['test_images']}.gz: cannot be read") as error:
        main(args)
    assert "\n" not in str(error.value) and not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("header", ["true to the training images", "declaring 300 MB"])
def test_a_gzip_bomb_is_refused_early_in_bounded_memory(tmp_path, header):
    """A 300 KB .gz that expands to 300 MB: read whole, it held 586 MB above the import for 2 s (the issue's 1.36
    GB resident); read with the bound its IDX header sets, 4 MB for 0.24 s."""
    folder = write_synthetic_dataset(tmp_path / "data")
    images = 800 if header == "true to the training images" else 382_653  # 382,653 images of 784 bytes: 300 MB
    megabyte = gzip.compress(bytes(2**20))  # gzip members concatenated decompress as one stream
    bomb = gzip.compress(struct.pack(">IIII", 0x0803, images, 28, 28)) + megabyte * 286
    (folder / f"{FILES['train_images']}.gz").write_bytes(bomb)
    assert len(bomb) < 310_000

    tracemalloc.start()
    try:
        with pytest.raises(CorruptDatasetError, match=FILES["train_images"]) as error:
            FashionMNISTDataModule(data_dir=str(folder), val_size=100).setup("fit")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20
    expected = "more data than its header declares" if images == 800 else "its header declares 299,999,952 bytes"
    assert expected in str(error.value) and len(str(error.value).splitlines()) == 1
    assert not list((folder / "FashionMNIST" / "raw").glob("*"))  # nor left a partial copy behind


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    folder = write_synthetic_dataset(tmp_path / "data", gz=False)

    def permission_denied(path):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr("mlp.data.read_image_file", permission_denied)  # root reads any file, so fake it
    with pytest.raises(CorruptDatasetError, match=f"{FILES['train_images']}.*Permission denied"):
        FashionMNISTDataModule(data_dir=str(folder), val_size=100).setup("fit")


# -- invalid hyperparameters: rejected before any training starts, with the allowed range ----------------------


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--model.depth=-1", "depth (hidden layers) must be >= 0"),
        ("--model.width=0", "width (hidden units) must be >= 1"),
        ("--model.lr=0", "lr must be a positive finite number"),
        ("--model.lr=-0.1", "lr must be a positive finite number"),
        ("--model.lr=abc", "Expected a <class 'float'>"),
        ("--model.lr=nan", "lr"),
        ("--data.batch_size=0", "batch_size must be >= 1"),
        # It trained: every pre-activation standardised to 0 over its one image, the running variance shrunk to 0.
        ("--model.batch_norm=true --data.batch_size=1", "which one image cannot give: --data.batch_size 2 or more"),
        ("--data.val_size=800", "val_size must be below the 800 training images"),
        ("--model.init=uniform", "'normal', 'kaiming', 'xavier'"),
        ("--model.optimizer=rmsprop", "'sgd', 'adam'"),
        ("--trainer.max_epochs=0", "max_epochs must be >= 1"),
        ("--trainer.max_epochs=-1", "max_epochs -1 trains without end, but the onecycle schedule needs to know"),
        ("--trainer.devices=0", "the --trainer flags do not fit this machine or each other: `Trainer(devices='0')`"),
        ("--trainer.strategy=nope", "the --trainer flags do not fit this machine or each other: You selected an"),
        # ModuleNotFoundError tracebacks: what they need is not installed.
        ("--trainer.accelerator=tpu", "do not fit this machine or each other: Requirement 'torch_xla>=1.13' not met"),
        ("--trainer.precision=transformer-engine", "do not fit this machine or each other: Requirement 'transformer_e"),
        ("--trainer.limit_train_batches=0.01", "the --trainer flags do not fit this run: You requested to check 0.01"),
        ("--model.weight_decay=.inf", "weight_decay must be a finite number >= 0"),  # it trained and blamed the lr
        # It kept the epoch of the highest val/loss as the best.
        ("--checkpoint.monitor=val/loss", "is a loss, and --checkpoint.mode max (for val/acc) would keep its highest"),
        # A ValueError traceback, raised by Lightning as it sized the schedule by the batches.
        ("--trainer.limit_train_batches=2 --trainer.val_check_interval=5",
         "the --trainer flags do not fit this run: `val_check_interval` (5) must be less than or equal to"),
        ("--trainer.overfit_batches=2", "--trainer.overfit_batches would swap the data module's batches"),
        # Tracebacks: the one-cycle schedule sized by no step; numpy's and torch's bounds on seeds; an allocation.
        ("--trainer.limit_train_batches=0", "--trainer.limit_train_batches 0 would train on no batch"),
        ("--seed_everything=-5", "--seed_everything must be 0 to 4294967295 (numpy's seeds)"),
        ("--data.seed=99999999999999999999", "seed must fit in 64 bits"),
        ("--model.width=1000000000000", "the model's weights do not fit in this machine's memory"),  # 3 PB
        (f"--config={ROOT / 'docs' / 'predict_steps.png'}", "a --config file is no YAML text"),  # a photo given
        ("--trainer.limit_test_batches=0", "--trainer.limit_test_batches 0 would leave the run untested"),
        # It had failed in its search with "Tried to step 8 times"; or else, finding another size, left the
        # one-cycle schedule unfinished (fewer steps) or cut short (more).
        ("--trainer.callbacks+=BatchSizeFinder", "BatchSizeFinder would change the batch size once the onecycle"),
        ("--model.backward=manual --trainer.callbacks+=GradientAccumulationScheduler "  # a RuntimeError traceback
         "--trainer.callbacks.scheduling='{0: 2}'", "GradientAccumulationScheduler needs Lightning's automatic"),
        # Tracebacks: the class a flag builds refused its value; or it failed after training, testing the best
        # checkpoint (Lightning 2.6's SpikeDetection cannot load its state, ModelPruning found nothing to prune,
        # BackboneFinetuning no `backbone`).
        ("--checkpoint.save_top_k=-2", "the flags do not build the run: Invalid value for save_top_k=-2"),
        ("--trainer.callbacks+=EarlyStopping --trainer.callbacks.monitor=val/loss --trainer.callbacks.mode=maxx",
         "the flags do not build the run: `mode` can be min, max, got maxx"),
        ("--trainer.callbacks+=SpikeDetection", "SpikeDetection: Lightning 2.6's cannot load its state back"),
        ("--trainer.callbacks+=ModelPruning --trainer.callbacks.pruning_fn=l1_unstructured",
         "ModelPruning prunes the `weight` and `bias` of torch's layer modules"),
        ("--trainer.callbacks+=BackboneFinetuning", "BackboneFinetuning unfreezes a model's `backbone` module"),
        # GradScaler's AssertionError traceback: a GPU's --trainer.precision 16-mixed, as a CPU can be given it.
        ("--model.backward=manual --trainer.plugins+=MixedPrecision --trainer.plugins.precision=16-mixed "
         "--trainer.plugins.device=cpu", "float16 mixed precision scales the loss inside autograd's backward"),
    ],
)
def test_invalid_hyperparameter_is_rejected_before_training(synthetic_dir, tmp_path, capsys, flag, message):
    with pytest.raises((UserError, SystemExit)) as error:
        fit.main(fit_args(synthetic_dir, tmp_path / "logs", *shlex.split(flag)))
    said = str(error.value) + capsys.readouterr().err
    assert message in said
    assert not list((tmp_path / "logs").rglob("*.ckpt"))
    for run_dir in (tmp_path / "logs").glob("fit/version_*"):
        assert not EventAccumulator(str(run_dir)).Reload().Tags()["scalars"]  # not one step was logged


@pytest.mark.parametrize("flag", ["--trainer.fast_dev_run=true", "--trainer.enable_checkpointing=false"])
def test_a_run_that_keeps_no_checkpoint_is_fit_and_tests_its_final_weights_but_tune_refuses_it(
    synthetic_dir, tmp_path, capsys, flag
):
    from mlp.cli import ResumableOnInterrupt, build_cli

    results = fit.main(fit_args(synthetic_dir, tmp_path / "logs", flag))
    printed = capsys.readouterr().out
    assert "(best checkpoint: none, the final weights)" in printed and "test/acc" in results
    assert ("tensorboard --logdir" in printed) == ("fast_dev_run" not in flag)  # which writes no logs
    assert not list((tmp_path / "logs").rglob("*.ckpt"))
    cli, on_interrupt = build_cli(fit_args(synthetic_dir, tmp_path / "logs", flag)), ResumableOnInterrupt()
    on_interrupt.setup(cli.trainer, cli.model, "fit")
    assert on_interrupt.path is None  # nor does Ctrl-C save one
    with pytest.raises(UserError, match="tune.py keeps each trial's best checkpoint for the final models"):
        tune.main([f"--storage=sqlite:///{tmp_path / 'study.db'}", f"--data.data_dir={synthetic_dir}", flag,
                   f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert not (tmp_path / "study.db").exists()


def test_fit_without_a_logger_names_its_checkpoint_and_no_tensorboard_folder(synthetic_dir, tmp_path, capsys):
    fit.main(fit_args(synthetic_dir, tmp_path / "logs", "--trainer.logger=false",
                      f"--trainer.default_root_dir={tmp_path / 'root'}"))
    printed = capsys.readouterr().out
    assert f"(best checkpoint: {tmp_path / 'root' / 'checkpoints'}/" in printed
    assert "logs:" not in printed  # it had said "tensorboard --logdir /" of a folder holding no logs


@pytest.mark.parametrize("flag, message", [
    ("--trainer.gradient_clip_val=1", "tune.py steps each stacked trial's optimiser itself"),
    ("--trainer.accumulate_grad_batches=2", "tune.py steps each stacked trial's optimiser itself"),
    ("--trainer.max_steps=20", "a trial trains for its epochs"),
    ("--trainer.max_time=00:00:00:01", "a trial trains for its epochs"),
    ("--trainer.max_epochs=-1 --model.schedule=constant", "a trial trains for its epochs"),
    ("--trainer.limit_val_batches=0", "one of 5 epochs would never validate"),
    ("--trainer.check_val_every_n_epoch=3 --epochs 2 4", "one of 2 epochs would never validate"),
    ("--trainer.callbacks+=EarlyStopping --trainer.callbacks.monitor=val/loss", "drop the EarlyStopping"),
    ("--trainer.callbacks+=LearningRateMonitor", "drop the LearningRateMonitor of --trainer.callbacks: each trial"),
    ("--trainer.callbacks+=LearningRateFinder", "drop the LearningRateFinder of --trainer.callbacks: the search"),
    ("--trainer.callbacks+=BatchSizeFinder --model.schedule=constant", "drop the BatchSizeFinder"),
    ("--trainer.callbacks+=Timer --trainer.callbacks.duration=00:00:00:03", "drop the Timer of --trainer.callbacks"),
    ("--trainer.callbacks+=StochasticWeightAveraging --trainer.callbacks.swa_lrs=0.01", "drop the StochasticWeight"),
    ("--trainer.callbacks+=EMAWeightAveraging", "drop the EMAWeightAveraging of --trainer.callbacks: it averages"),
    ("--trainer.callbacks+=GradientAccumulationScheduler --trainer.callbacks.scheduling='{0: 2}'", "drop the Gradient"),
    ("--checkpoint.monitor=val/loss --checkpoint.mode=min", "drop --checkpoint.monitor, --checkpoint.mode"),
    ("--trainer.val_check_interval=0.5", "drop --trainer.val_check_interval"),
    ("--trainer.val_check_interval=1", "drop --trainer.val_check_interval"),
    # A checkpoint's path was ignored by every trial (and --ckpt_path last, with a fit run to resume, failed trial 0).
    ("--ckpt_path=some.ckpt", "a trial is a new run, and a study continues by the same command rerun: drop --ckpt_"),
])
def test_trainer_flags_a_stack_of_trials_cannot_honour_are_refused_by_tune_before_any_trial(
    synthetic_dir, tmp_path, flag, message
):
    with pytest.raises(UserError, match=message):
        tune.main([f"--storage=sqlite:///{tmp_path / 'study.db'}", f"--data.data_dir={synthetic_dir}",
                   f"--trainer.logger.init_args.save_dir={tmp_path}", *shlex.split(flag)])
    # --checkpoint flags had been ignored unsaid; validating within an epoch, a trial reported its first validation
    # as the epoch's (Optuna keeps a step's first report), and was pruned on it. The rest had failed the first trial
    # with Lightning's refusal (the monitor: "no logger"; the finders: tracebacks), crashed it with a schedule too
    # short for its steps (max_steps), or stopped the stack with trials in it that no one told their end (max_time);
    # endless epochs had ended every trial after its first; a trial that never validates was told no value and,
    # failed, did not count, so the study asked for trials without end.
    assert not (tmp_path / "study.db").exists()


@pytest.mark.parametrize("own", [
    "--trainer.callbacks+=ModelCheckpoint --trainer.callbacks.monitor=val/loss --trainer.callbacks.filename=own",
    "--trainer.callbacks+=OnExceptionCheckpoint --trainer.callbacks.dirpath=on_exception",
    # Without a monitor: a RuntimeError traceback, its state key that of the run's own last.ckpt saver.
    "--trainer.callbacks+=ModelCheckpoint --trainer.callbacks.filename=own",
])
def test_a_users_own_checkpoint_callback_leaves_fit_testing_its_best_by_val_acc(
    synthetic_dir, tmp_path, capsys, monkeypatch, own
):
    monkeypatch.chdir(tmp_path)  # where OnExceptionCheckpoint's folder is
    # A user's ModelCheckpoint came first in the Trainer: fit.py tested its checkpoint (here the best val/loss) as
    # "the best"; a user's OnExceptionCheckpoint, a checkpoint callback with no top k, ended the fit in a traceback.
    fit.main(fit_args(synthetic_dir, tmp_path / "logs", *own.split()))
    tested = Path(re.search(r"\(best checkpoint: (\S+)\)", capsys.readouterr().out)[1])
    assert tested.name.startswith("epoch") and "val_acc" in tested.name
    assert any(tested.parent.glob("own*.ckpt")) or "OnException" in own  # the user's, kept beside it


def test_a_fit_averaging_its_weights_tests_the_averaged_weights_its_validation_chose(synthetic_dir, tmp_path, capsys):
    from mlp.final import test_checkpoints

    # EMAWeightAveraging validates, and saves as the checkpoint's weights, their running average; the test had
    # loaded the unaveraged weights the checkpoint keeps beside them: "test accuracy 1.0000" for weights whose own
    # validation accuracy was 0.28, and which test 0.22.
    results = fit.main(fit_args(synthetic_dir, tmp_path / "logs", "--trainer.callbacks+=EMAWeightAveraging"))
    best = re.search(r"\(best checkpoint: (\S+)\)", capsys.readouterr().out)[1]
    saved = test_checkpoints([best])  # the weights in the file, on the same splits
    assert saved["val_acc"] == pytest.approx(float(re.search(r"val_acc(\d\.\d+)", best)[1]), abs=1e-4)
    assert results["test/acc"] == pytest.approx(saved["test_acc"], abs=1e-6)


class OwnProgressBar(TQDMProgressBar):
    """A user's progress bar, as RichProgressBar is one (without `rich` to install); records that it drew."""

    drew_epochs: list[int] = []

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, module)
        self.drew_epochs.append(trainer.current_epoch)


def test_a_progress_bar_of_ones_own_replaces_fits_which_tune_refuses(synthetic_dir, tmp_path, capsys):
    # Lightning had refused it beside fit.py's own bar: "You added multiple progress bar callbacks".
    own = f"--trainer.callbacks+={__name__}.OwnProgressBar"
    results = fit.main(fit_args(synthetic_dir, tmp_path / "logs", own))
    assert OwnProgressBar.drew_epochs == [0, 1] and "test/acc" in results
    with pytest.raises(UserError, match="drop the OwnProgressBar of --trainer.callbacks: tune.py shows the study's"):
        tune.main([f"--storage=sqlite:///{tmp_path / 'study.db'}", f"--data.data_dir={synthetic_dir}",
                   f"--trainer.logger.init_args.save_dir={tmp_path}", own])


class StopsAtFirstEpochEnd(L.Callback):
    """A user's callback that stops the Trainer, as a time limit would."""

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        trainer.should_stop = True


@pytest.mark.parametrize("fuse", ["1", "2"])
def test_a_callback_that_stops_a_stack_of_trials_early_fails_them_in_one_line(synthetic_dir, tmp_path, fuse):
    # The trials were left running, each failed as stale and retried in turn once its heartbeat aged, without end.
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    callback = f"--trainer.callbacks+={__name__}.StopsAtFirstEpochEnd"
    runs = "0, 1" if fuse == "2" else "0"
    with pytest.raises(UserError, match=f"training stopped before runs {runs} ended: something stopped the Trainer"):
        tune.main([f"--storage={storage}", f"--data.data_dir={synthetic_dir}", "--data.val_size=100", "--n-trials=2",
                   f"--trainer.logger.init_args.save_dir={tmp_path}", "--epochs", "3", "3", "--fuse", fuse, callback])
    trials = optuna.load_study(study_name="mlp", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * int(fuse)


@pytest.mark.parametrize("callback, flags, written", [
    ("Timer", [], "interval: step"),
    ("StochasticWeightAveraging", ["--trainer.callbacks.swa_lrs=0.01"], "device: cpu"),
])
def test_a_callbacks_defaults_are_saved_in_the_run_config_which_builds_the_run_again(
    synthetic_dir, tmp_path, callback, flags, written
):
    from mlp.cli import build_cli

    # Timer's `interval` default, an enum, stopped the fit with a traceback as its config.yaml was written; SWA's
    # `device` was written as "Unable to serialize instance cpu", and the config failed to build the run (a study's
    # refits are built so).
    fit.main(fit_args(synthetic_dir, tmp_path / "logs", f"--trainer.callbacks+={callback}", *flags))
    config = tmp_path / "logs" / "fit" / "version_0" / "config.yaml"
    assert written in config.read_text()
    rebuilt = build_cli([f"--config={config}"]).trainer.callbacks
    assert any(type(c).__name__ == callback for c in rebuilt)


@pytest.mark.parametrize("flags", [["--model.schedule=constant"], ["--trainer.max_steps=10"]])
def test_endless_epochs_are_accepted_where_the_schedule_has_a_length(synthetic_dir, tmp_path, flags):
    from mlp.cli import build_cli

    cli = build_cli(fit_args(synthetic_dir, tmp_path / "logs", "--trainer.max_epochs=-1", *flags))
    assert cli.trainer.max_epochs == -1


@pytest.mark.parametrize(
    "flags, message",
    [(["--lr", "0", "1"], "--lr"), (["--width", "64", "8"], "--width"), (["--n-trials", "0"], "--n-trials"),
     (["--dropout", "0", "1.5"], r"--dropout 0.0 1.5: dropout must be in \[0, 1\), got 1.5"),
     (["--lr", "nan", "1"], "--lr nan 1.0: lr must be a positive finite number, got nan")],
)
def test_bad_search_range_is_rejected_before_any_trial(synthetic_dir, tmp_path, flags, message):
    args = [f"--storage=sqlite:///{tmp_path / 'study.db'}", f"--data.data_dir={synthetic_dir}", *flags]
    with pytest.raises(UserError, match=message):
        tune.main(args)
    assert not (tmp_path / "study.db").exists()


# -- NaN/inf loss in fit ---------------------------------------------------------------------------------------


def test_a_fit_diverging_in_its_first_epoch_points_at_lr_and_tests_nothing(synthetic_dir, tmp_path, capsys):
    # Its NaN epoch had been kept as the best checkpoint (its val/acc, chance, the first) and tested.
    with pytest.raises(UserError, match="nothing to test: training diverged before any epoch ended with a finite"):
        fit.main(fit_args(synthetic_dir, tmp_path / "logs", "--model.lr=1e4", "--trainer.max_epochs=5"))
    printed = capsys.readouterr().out
    assert "training diverged and stopped in epoch 0: Monitored metric val/loss = nan is not finite" in printed
    assert "try a lower learning rate than --model.lr 10000.0; no epoch ended with a finite loss to keep" in printed
    assert not list((tmp_path / "logs" / "fit" / "version_0" / "checkpoints").glob("epoch*.ckpt"))


class PoisonsTheWeightsAtEpoch(L.Callback):
    """A divergence on cue: NaN weights from the start of `epoch`."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                for p in module.net.parameters():
                    p.fill_(float("nan"))


# Each keeps the latest epoch: without validation the checkpoint does so; with it, monitoring the step does.
@pytest.mark.parametrize("flags", [["--data.val_size=0"], ["--checkpoint.monitor=step", "--checkpoint.mode=max"]])
def test_a_fit_diverging_later_keeps_and_tests_its_last_finite_epoch(synthetic_dir, tmp_path, capsys, flags):
    from mlp.cli import build_cli
    from mlp.run import test_once, train

    cli = build_cli(fit_args(synthetic_dir, tmp_path / "logs", "--trainer.max_epochs=4", *flags))
    cli.trainer.callbacks.append(PoisonsTheWeightsAtEpoch(2))
    best = train(cli)
    assert Path(best).name.startswith("epoch01")  # it had kept epoch 2's NaN weights
    assert all(t.isfinite().all() for t in torch.load(best)["state_dict"].values())
    assert "the best checkpoint before it is kept" in capsys.readouterr().out
    assert test_once(cli, best)["test/acc"] > 0.5


def test_a_users_early_stopping_on_the_loss_stops_the_fit_and_is_not_taken_for_a_divergence(synthetic_dir, tmp_path,
                                                                                              capsys):
    # It shared the divergence guard's state key (Lightning refused the Trainer), and its stop was reported as one.
    stop = ["--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val/loss",
            "--trainer.callbacks.patience=0", "--trainer.callbacks.min_delta=1", "--trainer.max_epochs=10"]
    fit.main(fit_args(synthetic_dir, tmp_path / "logs", *stop))
    last = torch.load(tmp_path / "logs" / "fit" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1  # no loss falls by 1 in an epoch: stopped after its second
    assert "training diverged" not in capsys.readouterr().out


# -- SIGINT during fit -----------------------------------------------------------------------------------------


def test_children_take_sigint_even_when_pytest_was_started_with_it_ignored(tmp_path, monkeypatch):
    """A shell starts background jobs with SIGINT ignored, and children inherit that; the signal tests below
    would then see their child shrug off Ctrl-C. script_command restores Python's handler in the child."""
    script = tmp_path / "sleeper.py"
    script.write_text("import time\nprint('ready', flush=True)\ntime.sleep(600)\n")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in `python -m pytest &`
    try:
        process = subprocess.Popen(script_command(str(script), []), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode != 0 and "KeyboardInterrupt" in stderr


# What Lightning printed at every fit's start: the first two because an OnExceptionCheckpoint among the callbacks
# turns fit(ckpt_path=None) into "last"; the third, Lightning's own use of a torch API this torch deprecates.
LIGHTNING_WARNINGS_ABOUT_OUR_CALLS = ("was called without a model", "there is no last checkpoint available", "LeafSpec",
                                     "`weights_only` was not set")


def test_ctrl_c_inside_a_step_stops_the_fit_at_that_batchs_end_and_not_inside_the_code_it_hit(synthetic_dir, tmp_path):
    # A KeyboardInterrupt raised wherever Python was can break a library mid-update (TensorBoard's queue.put left
    # its writer asleep for two minutes); the fit must finish the line the signal hit, then stop at the batch end.
    import lightning as L

    from mlp.cli import build_cli
    from mlp.cli import fit as fit_run

    class CtrlCInStep(L.Callback):
        lines_after_the_signal = 0

        def on_train_batch_start(self, trainer: L.Trainer, *_: object) -> None:
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)
                self.lines_after_the_signal += 1

    cli = build_cli(fit_args(synthetic_dir, tmp_path))
    ctrl_c = CtrlCInStep()
    cli.trainer.callbacks.append(ctrl_c)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, however pytest started
    try:
        with pytest.raises(KeyboardInterrupt):
            fit_run(cli)
        assert ctrl_c.lines_after_the_signal == 1 and cli.trainer.global_step == 3  # that batch trained, no other
        with pytest.raises(KeyboardInterrupt):  # after the run, Ctrl-C interrupts at once again
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("saved_before", [False, True])
def test_ctrl_c_says_a_checkpoint_was_saved_only_where_one_was(synthetic_dir, tmp_path, monkeypatch, saved_before):
    # Before the first step (or with --trainer.enable_checkpointing false) nothing is saved, and fit.py had said "a
    # checkpoint was saved; continue with the same command plus --ckpt_path last", which then found none.
    checkpoints = tmp_path / "fit" / "version_0" / "checkpoints"

    def interrupted_fit(*args: object, **kwargs: object) -> None:
        if saved_before:  # as the latest epoch's end leaves it
            checkpoints.mkdir(parents=True)
            (checkpoints / "last.ckpt").touch()
        raise KeyboardInterrupt

    monkeypatch.setattr("mlp.run.fit", interrupted_fit)
    with pytest.raises(SystemExit) as exit:
        run_script(lambda: fit.main(fit_args(synthetic_dir, tmp_path)), interrupted="a checkpoint was saved")
    said = "a checkpoint was saved" if saved_before else "no checkpoint was saved to resume from; run the same command"
    assert exit.value.code.startswith(f"interrupted: {said}")


def test_ctrl_c_while_fit_py_starts_says_nothing_was_saved(synthetic_dir, tmp_path, monkeypatch):
    def interrupted_build(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("mlp.cli.build_cli", interrupted_build)
    with pytest.raises(SystemExit) as exit:
        run_script(lambda: fit.main(fit_args(synthetic_dir, tmp_path)), interrupted="a checkpoint was saved")
    assert exit.value.code == "interrupted: no checkpoint was saved to resume from; run the same command again"


@pytest.mark.parametrize("config", ["model:\n#  width: 64\ntrainer:\n  max_epochs: 1\n", "checkpoint:\ntrainer:\n  "
                                    "max_epochs: 1\n", "model: 5\n"])
def test_a_config_section_without_settings_is_one_line(tmp_path, config):
    # AttributeError and TypeError tracebacks: a section with every key commented out reads as null.
    (tmp_path / "run.yaml").write_text(config)
    with pytest.raises(UserError, match="holds no settings .indented `key: value` lines under it.: give it some"):
        fit.main([f"--config={tmp_path / 'run.yaml'}", f"--trainer.logger.init_args.save_dir={tmp_path}"])


class InterruptedImport(type(sys)):
    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):  # what the import machinery and pytest look up
            raise AttributeError(name)
        raise KeyboardInterrupt  # as Ctrl-C lands while torch and Lightning import, before run_script is called


def test_ctrl_c_while_tune_py_imports_says_nothing_was_started(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlp.final", InterruptedImport("mlp.final"))
    try:
        runpy.run_path(str(ROOT / "scripts" / "tune.py"))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C while tune.py imports ends in a traceback")
    except SystemExit as exit:
        assert exit.code == "interrupted: nothing was started yet; run the same command again"
    else:
        pytest.fail("tune.py went on without the module it imports")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C; `timeout`, a scheduler's preemption
def test_sigint_during_fit_keeps_a_checkpoint_and_resume_finishes_the_same_epochs(synthetic_dir, tmp_path, signum):
    args = fit_args(synthetic_dir, tmp_path / "logs", "--trainer.max_epochs=15", "--model.width=256")
    run_dir = tmp_path / "logs" / "fit" / "version_0"
    process = start("fit.py", args)
    wait_for(process, lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), "the first checkpoint")
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0 and "Traceback" not in stderr
    assert "--ckpt_path last" in stderr
    assert not [warning for warning in LIGHTNING_WARNINGS_ABOUT_OUR_CALLS if warning in stderr]  # a plain fit's start
    interrupted = torch.load(run_dir / "checkpoints" / "on_exception.ckpt", weights_only=False)
    assert interrupted["epoch"] < 14

    resumed = run("fit.py", [*args, "--ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not [warning for warning in LIGHTNING_WARNINGS_ABOUT_OUR_CALLS if warning in resumed.stderr]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 14
    assert last["global_step"] == 15 * 22  # 700 training images in batches of 32: 22 steps an epoch
    assert not (tmp_path / "logs" / "fit" / "version_1").exists()


# -- SIGINT / SIGKILL of a tune process ------------------------------------------------------------------------


def tune_args(synthetic_dir: Path, tmp_path: Path, n_trials: int) -> list[str]:
    """A study whose trials report after their first epoch and train nine more: time for a signal to land."""
    return [
        f"--n-trials={n_trials}", f"--storage=sqlite:///{tmp_path / 'study.db'}", "--study-name=faults",
        "--epochs", "10", "10", "--depth", "1", "1", "--width", "128", "256",
        f"--data.data_dir={synthetic_dir}", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--data.val_size=100", "--data.batch_size=32",
    ]


def created_trials(url: str, study_name: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials; none while the tune processes are still creating its tables or the study.

    Read without creating tables: a reader creating them too would race those processes (alembic_version). No
    pool: a storage that fails as it opens (its tables not there yet) leaves its connection to the collector,
    which closes it only if no pool keeps it.
    """
    storage = None
    try:
        storage = optuna.storages.RDBStorage(url, skip_table_creation=True,
                                             engine_kwargs={"poolclass": sqlalchemy.pool.NullPool})
        return optuna.load_study(study_name=study_name, storage=storage).trials
    except (KeyError, sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError):
        return []
    finally:
        if storage is not None:
            storage.remove_session()


def trials_of(tmp_path: Path) -> list[optuna.trial.FrozenTrial]:
    return created_trials(f"sqlite:///{tmp_path / 'study.db'}", "faults")


def running_trial(tmp_path: Path) -> bool:
    """True once the second trial has reported an epoch, so the study holds a finished and a running trial."""
    if not (tmp_path / "study.db").exists():  # connecting would create the file before the tune process does
        return False
    trials = trials_of(tmp_path)
    return len(trials) >= 2 and trials[-1].state == TrialState.RUNNING and bool(trials[-1].intermediate_values)


def test_a_checkpoint_to_resume_from_that_would_run_code_is_refused_in_one_line(synthetic_dir, tmp_path, capsys):
    marker = tmp_path / "payload_ran"
    torch.save({"epoch": 3, "payload": Payload(marker)}, tmp_path / "shared.ckpt")
    args = fit_args(synthetic_dir, tmp_path / "logs", f"--ckpt_path={tmp_path / 'shared.ckpt'}")
    with pytest.raises(SystemExit) as exit:
        run_script(lambda: fit.main(args), interrupted="")
    assert exit.value.code == (f"error: --ckpt_path {tmp_path / 'shared.ckpt'} is refused: it would call "
                               f"{Payload.CALLS} as it loads, which could run any code; only checkpoints of tensors "
                               "and plain values are loaded, as fit.py and tune.py write them")
    assert not marker.exists()


def test_sigint_of_tune_fails_the_running_trial_and_the_rerun_retries_it_and_continues(synthetic_dir, tmp_path):
    args = tune_args(synthetic_dir, tmp_path, n_trials=2)
    process = start("tune.py", args)
    wait_for(process, lambda: running_trial(tmp_path), "a running trial")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0 and "Traceback" not in stderr
    assert "run the same command again to continue" in stderr
    # The failed trial is queued to run again, once.
    assert [t.state for t in trials_of(tmp_path)] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]

    tune.main([*args, "--quiet"])  # the same study again, in this process: what it resumes is in the storage
    trials = trials_of(tmp_path)
    states = [t.state for t in trials]
    assert states.count(TrialState.FAIL) == 1 and TrialState.RUNNING not in states
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == 2
    assert len(trials) == 3 and trials[2].params == trials[1].params  # the retry trained in its place


def test_a_study_in_a_project_folder_moved_elsewhere_still_finds_every_checkpoint(synthetic_dir, tmp_path,
                                                                                   monkeypatch):
    # Its trials recorded their checkpoints by absolute paths, gone with the move: a rerun's final models found
    # none of them (the ensemble's were all "missing"), and the best checkpoint was "on another host".
    from mlp.final import ensemble

    args = ["--quiet", "--study-name=moved", "--n-trials=2", "--epochs", "1", "1", "--depth", "1", "1", "--width",
            "8", "16", "--pruner=none", f"--data.data_dir={synthetic_dir}", "--data.val_size=100",
            "--data.batch_size=32"]
    (tmp_path / "before").mkdir()
    monkeypatch.chdir(tmp_path / "before")
    tune.main(args)
    (tmp_path / "before").rename(tmp_path / "after")
    monkeypatch.chdir(tmp_path / "after")
    study = optuna.load_study(study_name="moved", storage="sqlite:///lightning_logs/tune/optuna.db")
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 2 and all(Path(t.user_attrs["best_checkpoint"]).is_file() for t in trials)
    assert ensemble(study)["missing_checkpoints"] == []


def test_sigkill_of_tune_leaves_a_running_trial_that_a_rerun_fails_and_retries_once(
    synthetic_dir, tmp_path, monkeypatch
):
    quick_heartbeat = "import mlp.study; mlp.study.HEARTBEAT_SECONDS = 1; mlp.study.GRACE_SECONDS = 2"
    args = tune_args(synthetic_dir, tmp_path, n_trials=2)
    process = start("tune.py", args, patch=quick_heartbeat)
    wait_for(process, lambda: running_trial(tmp_path), "a running trial")
    process.kill()
    process.communicate(timeout=300)
    killed = trials_of(tmp_path)[-1]
    assert killed.state == TrialState.RUNNING  # nobody was left to say otherwise
    time.sleep(3)  # let its heartbeat go stale

    monkeypatch.setattr("mlp.study.HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr("mlp.study.GRACE_SECONDS", 2)
    tune.main([*args, "--quiet"])  # the same study again, in this process
    trials = trials_of(tmp_path)
    assert trials[killed.number].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 2
    assert TrialState.RUNNING not in [t.state for t in trials]


# -- unwritable log directory / disk error on checkpoint save --------------------------------------------------


def test_log_folder_under_a_file_is_a_clear_error(synthetic_dir, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write to the log folder .*blocker"):
        fit.main(fit_args(synthetic_dir, blocker / "logs"))


@pytest.mark.parametrize("flag", ["--checkpoint.dirpath", "--trainer.default_root_dir"])
def test_an_unusable_path_names_the_flag_that_chose_it(synthetic_dir, tmp_path, flag):
    # Both had been said to need another --trainer.logger.init_args.save_dir, which the user never gave.
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    args = fit_args(synthetic_dir, tmp_path / "logs", f"{flag}={blocker / 'run'}", "--trainer.max_epochs=1",
                    *["--trainer.logger=false"][:flag == "--trainer.default_root_dir"])
    with pytest.raises(SystemExit) as exit:
        run_script(lambda: fit.main(args), interrupted="")
    assert str(blocker) in str(exit.value) and str(exit.value).endswith(f"\nchoose another path with {flag}")
    assert blocker.read_text() == ""


def test_disk_full_while_saving_a_checkpoint_is_a_clear_error(synthetic_dir, tmp_path, monkeypatch):
    def disk_full(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("lightning.pytorch.Trainer.save_checkpoint", disk_full)
    with pytest.raises(SystemExit) as exit:
        run_script(lambda: fit.main(fit_args(synthetic_dir, tmp_path / "logs")), interrupted="")
    assert "No space left on device" in str(exit.value) and ".ckpt" in str(exit.value)
    assert str(exit.value).endswith("\nfree some space, or choose another path with "
                                    "--trainer.logger.init_args.save_dir")


# -- same seed twice on CPU ------------------------------------------------------------------------------------


def test_same_seed_twice_gives_identical_metrics_and_weights(synthetic_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        results = fit.main(fit_args(synthetic_dir, tmp_path / name, "--seed_everything=7"))
        run_dir = tmp_path / name / "fit" / "version_0"
        events = EventAccumulator(str(run_dir)).Reload()
        weights = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        runs.append((results, [e.value for e in events.Scalars("train/loss_epoch")], weights))
    (results_a, losses_a, weights_a), (results_b, losses_b, weights_b) = runs
    assert results_a == results_b
    assert losses_a == losses_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
