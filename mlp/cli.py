"""The one place that turns command-line flags into a Trainer, a model and a data module.

scripts/fit.py and scripts/tune.py both build their runs here, so a flag means the same in both.
"""

from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
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


def build_cli(args: list[str] | None = None, run_name: str = "fit") -> MLPCLI:
    """Parse `args` (sys.argv when None) and instantiate the Trainer, model and data module without running."""
    return MLPCLI(
        MLPClassifier,
        FashionMNISTDataModule,
        run=False,
        args=args,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "max_epochs": 20,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": LOG_DIR, "name": run_name, "default_hp_metric": False},
            },
        },
    )
