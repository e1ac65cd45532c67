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
    from mlp.cli import ResumableOnInterrupt, build_cli, divergence_message, fit, release_processes

    cli = build_cli(args)
    trainer = cli.trainer
    if runs := getattr(trainer.logger, "root_dir", None):
        # The folder of all runs, not this run's: under DDP the other processes start later and would take the
        # next version folder; Lightning creates the run's folder once they agree on it.
        try:
            Path(runs).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(
                f"cannot write to the log folder {runs} ({error.strerror}); "
                "choose another with --trainer.logger.init_args.save_dir"
            ) from None
    trainer.callbacks.append(ResumableOnInterrupt())
    fit(cli, ckpt_path=cli.config.ckpt_path)
    if trainer.is_global_zero and (reason := divergence_message(trainer)):
        print(
            f"training diverged and stopped in {reason}\n"
            f"try a lower learning rate than --model.lr {cli.model.hparams.lr}; the best checkpoint so far is kept"
        )
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    (results,) = trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best or None)
    log_dir = trainer.log_dir  # asked of every process: under DDP they agree on it together
    if trainer.is_global_zero:
        print(f"test accuracy {results['test/acc']:.4f} (best checkpoint: {best or 'none, the final weights'})")
        print(f"logs: {log_dir}  (tensorboard --logdir {Path(log_dir).parent.parent})")
    release_processes()
    return results


if __name__ == "__main__":
    run_script(main, interrupted="a checkpoint was saved; continue with the same command plus --ckpt_path last")
