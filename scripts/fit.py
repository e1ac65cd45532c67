"""Train the from-scratch MLP on Fashion-MNIST, then test the best checkpoint (by val/acc) once.

    python scripts/fit.py --model.depth 2 --model.width 512 --trainer.max_epochs 20
    python scripts/fit.py --ckpt_path last          # continue the latest run after Ctrl-C
    python scripts/fit.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlp.errors import UserError, run_script  # noqa: E402


def main(args: list[str] | None = None) -> dict[str, float]:
    from mlp.cli import ResumableOnInterrupt, build_cli, divergence_message, fit

    cli = build_cli(args)
    trainer = cli.trainer
    checkpoints = Path(trainer.log_dir) / "checkpoints"
    try:
        checkpoints.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"cannot write to the log folder {trainer.log_dir} ({error.strerror}); "
            "choose another with --trainer.logger.init_args.save_dir"
        ) from None
    trainer.callbacks.append(ResumableOnInterrupt(dirpath=checkpoints))
    fit(cli, ckpt_path=cli.config.ckpt_path)
    if reason := divergence_message(trainer):
        print(
            f"training diverged and stopped in {reason}\n"
            f"try a lower learning rate than --model.lr {cli.model.hparams.lr}; the best checkpoint so far is kept"
        )
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    (results,) = trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best or None)
    print(f"test accuracy {results['test/acc']:.4f} (best checkpoint: {best or 'none, the final weights'})")
    print(f"logs: {trainer.log_dir}  (tensorboard --logdir {Path(trainer.log_dir).parent.parent})")
    return results


if __name__ == "__main__":
    run_script(main, interrupted="a checkpoint was saved; continue with the same command plus --ckpt_path last")
