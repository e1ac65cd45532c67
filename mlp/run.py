"""One run, as fit.py and the d2l exercises make it: train it, keeping its best checkpoint, then test one
checkpoint once. Training never sees the test set; a caller tests only the run it chose on validation, once."""

import warnings
from pathlib import Path

from lightning.pytorch.callbacks import WeightAveraging

from mlp.cli import MLPCLI, ResumableOnInterrupt, divergence_message, errors_of_processes, fit, resumable_checkpoints
from mlp.errors import UserError, check, write_failed


def train(cli: MLPCLI, ckpt_path: str | None = None) -> str | None:
    """Fit the CLI's model, resuming from `ckpt_path` if given; its best checkpoint by val/acc (without
    validation, its final epoch's), None if it kept none. A divergence is printed with what to try instead."""
    trainer = cli.trainer
    if runs := getattr(trainer.logger, "root_dir", None):
        # The folder of all runs, not this run's: under DDP the other processes start later and would take the
        # next version folder; only rank 0 creates the run's (mlp.cli.held_alone).
        try:
            Path(runs).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot write to the log folder {runs} ({error.strerror}); choose another with "
                            "--trainer.logger.init_args.save_dir") from None
    for logger in trainer.loggers:
        # The run's folder chosen here, once, or processes Lightning starts from copies of this one (--trainer.strategy
        # ddp_spawn or ddp_fork) would each take the next free folder, the test apart from the training.
        logger.version
    trainer.callbacks.append(ResumableOnInterrupt())
    try:
        fit(cli, ckpt_path=ckpt_path)
    except KeyboardInterrupt:
        # Nothing to resume before the first step, or with checkpoints turned off.
        if trainer.log_dir is None or not resumable_checkpoints(Path(trainer.log_dir)):
            raise KeyboardInterrupt("no checkpoint was saved to resume from; run the same command again") from None
        raise
    except OSError as error:
        # The script names the log folder's flag where a write fails; this path may be another flag's.
        if not (flag := flag_choosing(cli, error.filename)):
            raise
        raise UserError(write_failed(error, flag)) from None
    best = cli.checkpoint_callback.best_model_path or None
    if trainer.is_global_zero and (reason := divergence_message(trainer)):
        kept = "the best checkpoint before it is kept" if best else "no epoch ended with a finite loss to keep"
        print(f"training diverged and stopped in {reason}\n"
              f"try a lower learning rate than --model.lr {cli.model.hparams.lr}; {kept}")
    return best


def flag_choosing(cli: MLPCLI, path: str | None) -> str | None:
    """The flag other than the log folder's that chose `path`, where a run failed to write: --checkpoint.dirpath for
    its checkpoints' folder or one above it (making it failed there), --trainer.default_root_dir for a run without a
    logger."""
    if path and (dirpath := cli.config.checkpoint.dirpath):
        failed, chosen = Path(path).resolve(), Path(dirpath).resolve()
        if failed.is_relative_to(chosen) or chosen.is_relative_to(failed):
            return "--checkpoint.dirpath"
    return "--trainer.default_root_dir" if cli.config.trainer.logger is False else None


def test_once(cli: MLPCLI, checkpoint: str | None) -> dict[str, float]:
    """The test metrics of `checkpoint`, or with None of the model's weights as they are (a run that keeps no
    checkpoint), unless they diverged."""
    check(checkpoint is not None or divergence_message(cli.trainer) is None,
          "nothing to test: training diverged before any epoch ended with a finite loss; try a lower --model.lr")
    # A WeightAveraging callback (--trainer.callbacks EMAWeightAveraging) saves the averaged weights, which validation
    # scored, as a checkpoint's weights; left in the Trainer it would load the unaveraged ones kept beside them
    # (Lightning 2.6) for the test. It acts only in training: taken out, as Lightning's warning (silenced) advises.
    averaging = [callback for callback in cli.trainer.callbacks if isinstance(callback, WeightAveraging)]
    cli.trainer.callbacks[:] = [callback for callback in cli.trainer.callbacks if callback not in averaging]
    with warnings.catch_warnings(), errors_of_processes():
        if averaging:
            warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`")
        (results,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=checkpoint)
    return results
