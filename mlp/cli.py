"""The one place that turns command-line flags into a Trainer, a model and a data module.

scripts/fit.py and scripts/tune.py both build their runs here, so a flag means the same in both.
"""

import sys
import warnings

from lightning import Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mlp.data import FashionMNISTDataModule
from mlp.module import MLPClassifier

LOG_DIR = "lightning_logs"


class MLPCLI(LightningCLI):
    """LightningCLI with a best-by-val/acc checkpoint, a quieter progress bar and a `--ckpt_path` to resume from."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:02d}-val_acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(TQDMProgressBar, "progress_bar")
        # Redrawing the bar every step costs more than a step of this small net; 0 hides it.
        parser.set_defaults({"progress_bar.refresh_rate": 50})
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None, help='checkpoint to resume training from, or "last"'
        )


def divergence_guard() -> EarlyStopping:
    """Stops training as soon as the validation loss is NaN or infinite, and at no other time."""
    return EarlyStopping(monitor="val/loss", check_finite=True, patience=sys.maxsize, check_on_train_epoch_end=False)


def divergence_message(trainer: Trainer) -> str | None:
    """Why the divergence guard stopped training, or None if it did not."""
    guard = trainer.early_stopping_callback
    return guard.stopping_reason_message if guard is not None else None


def build_cli(args: list[str] | None = None) -> MLPCLI:
    """Parse `args` (sys.argv when None) and instantiate the Trainer, model and data module without running."""
    with warnings.catch_warnings():
        # tune.py's own flags stay in sys.argv while its trials pass their fit flags as `args`.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return MLPCLI(
            MLPClassifier,
            FashionMNISTDataModule,
            run=False,
            args=args,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "max_epochs": 20,
                "callbacks": [divergence_guard()],
                "logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": LOG_DIR, "name": "fit", "default_hp_metric": False},
                },
            },
        )
