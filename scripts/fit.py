"""Train the from-scratch MLP on Fashion-MNIST, then test the best checkpoint (by val/acc) once.

    python scripts/fit.py --model.depth 2 --model.width 512 --trainer.max_epochs 20
    python scripts/fit.py --ckpt_path last          # continue the latest run after Ctrl-C
    python scripts/fit.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlp.errors import run_script


def main(args: list[str] | None = None) -> dict[str, float]:
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        from mlp.cli import build_cli, release_processes
        from mlp.run import test_once, train

        cli = build_cli(args)
    except KeyboardInterrupt:  # before training began
        raise KeyboardInterrupt("no checkpoint was saved to resume from; run the same command again") from None
    best = train(cli, ckpt_path=cli.config.ckpt_path)
    results = test_once(cli, best)
    log_dir = cli.trainer.log_dir  # asked of every process: under DDP they agree on it together
    if cli.trainer.is_global_zero:
        print(f"test accuracy {results['test/acc']:.4f} (best checkpoint: {best or 'none, the final weights'})")
        if isinstance(cli.trainer.logger, TensorBoardLogger):  # not with --trainer.logger false or fast_dev_run
            print(f"logs: {log_dir}  (tensorboard --logdir {Path(log_dir).parent.parent})")
        elif cli.trainer.logger is not None and log_dir is not None:  # another logger's folder (CSVLogger...)
            print(f"logs: {log_dir}")
    release_processes()
    return results


if __name__ == "__main__":
    run_script(main, interrupted="a checkpoint was saved; continue with the same command plus --ckpt_path last")
