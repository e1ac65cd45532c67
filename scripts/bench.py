"""Seconds per training epoch of the same net three ways, measured in one run on the same data.

    python scripts/bench.py                       # 784-256-10, SGD, batch 256, 3 epochs each
    python scripts/bench.py --depth 3 --width 2048 --accelerator gpu
    python scripts/bench.py --tuning              # tuning throughput: model-epochs/s at --fuse 1, 2, 4, 8, 16

1. d2l: torchvision's FashionMNIST + ToTensor + DataLoader(shuffle=True, num_workers=4), a plain loop.
2. floor: the training split as one float tensor, randperm batches, a plain loop.
3. ours: the Trainer, MLPClassifier and FashionMNISTDataModule as fit.py builds them, with validation and checkpoints.
All three train mlp.net.MLP with the same optimiser; the first epoch of each is warm-up and is excluded.
Also measured: start-up, the seconds from launching `python scripts/fit.py` to its first training step.

--tuning trains lr from 0.02 to 0.5 (the fit defaults otherwise) for 784-256-10 and 784-512-512-10, in
model-epochs per second: the floor, `--fuse 1` (one model in the real Trainer, as tune.py trains a trial) and
`--fuse K` (K models as one FusedClassifier, as tune.py trains a group; a model that diverges stops counting).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sized
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import transforms  # noqa: E402
from torchvision.datasets import FashionMNIST  # noqa: E402

from mlp.cli import build_cli  # noqa: E402
from mlp.data import FashionMNISTDataModule  # noqa: E402
from mlp.errors import run_script  # noqa: E402
from mlp.fused import FusedClassifier  # noqa: E402
from mlp.gpu_sizing import pads_widths  # noqa: E402
from mlp.module import MLPClassifier  # noqa: E402
from mlp.trials import group_cli  # noqa: E402


def plain_loop(batches: Sized, model: MLPClassifier, device: torch.device, epochs: int) -> list[float]:
    """Seconds of each epoch of a hand-written loop over `batches`, training model.net as its hparams say."""
    net, hp = model.net.to(device), model.hparams
    optimizer = torch.optim.SGD(net.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov,
                                weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, hp.lr, total_steps=epochs * len(batches),
                                                    cycle_momentum=False)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class RandpermBatches:
    """The floor's batches: slices of one pre-loaded tensor in a fresh random order each epoch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.x), device=self.x.device)
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size]
            yield self.x[idx], self.y[idx]


class EpochTimer(L.Callback):
    """Wall time from one training epoch's start to the next one's, so validation and checkpoints count."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.models: list[int] = []  # how many models trained in each epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module.device)
        self.starts.append(time.perf_counter())
        self.models.append(len(pl_module.names) if isinstance(pl_module, FusedClassifier) else 1)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module.device)
        self.starts.append(time.perf_counter())

    @property
    def times(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


def ours(flags: list[str], epochs: int) -> list[float]:
    with tempfile.TemporaryDirectory() as logs:
        cli = build_cli([*flags, f"--trainer.max_epochs={epochs}", f"--trainer.logger.init_args.save_dir={logs}",
                         "--progress_bar.refresh_rate=0", "--trainer.enable_model_summary=false"])
        timer = EpochTimer()
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        return timer.times


def fused(flags: list[str], k: int, epochs: int) -> tuple[float, list[int]]:
    """Model-epochs per second, epochs 2.., of k models (lr 0.02 to 0.5) stacked as tune.py --fuse k does, and how
    many trained in each epoch. Only those still in the stack count: which ones diverge and leave depends on the data
    order and rounding, so counting all k moved the figure with the seed. Nor is a stack's cost proportional to its
    size (on 2 cores seven cost what eight do), so the counts are printed beside the rate."""
    hparams = {key: v for key, v in build_cli(flags).model.hparams.items() if not key.startswith("_")}
    models = [MLPClassifier(**{**hparams, "lr": 0.02 * 25 ** (i / max(k - 1, 1))}) for i in range(k)]
    cli = group_cli(flags, epochs)
    timer = EpochTimer()
    cli.trainer.callbacks.append(timer)
    stack = FusedClassifier(models, [epochs] * k, [str(i) for i in range(k)], pad_widths=pads_widths(cli))
    cli.trainer.fit(stack, datamodule=cli.datamodule)
    return sum(timer.models[1:]) / sum(timer.times[1:]), timer.models


def architecture(depth: int, width: int) -> str:
    """The net's layer sizes, as 784-256-10; with no hidden layer 784-10."""
    return "-".join(map(str, [784, *[width] * depth, 10]))


def tuning(args: argparse.Namespace, device: torch.device, name: str, floor: RandpermBatches,
           shared: list[str]) -> dict[str, float]:
    """Model-epochs per second of the floor and of each --fuse K, for each of the two architectures."""
    results, stack_sizes = {}, {}
    for depth, width in ((1, 256), (2, 512)):
        arch = architecture(depth, width)
        flags = [f"--model.depth={depth}", f"--model.width={width}", *shared]
        seconds = plain_loop(floor, build_cli(flags).model, device, args.epochs)
        results[f"{arch} floor"] = 1 / statistics.mean(seconds[1:])
        for k in args.fuse:
            if k == 1:
                results[f"{arch} fuse {k}"] = 1 / statistics.mean(ours(flags, args.epochs)[1:])
            else:
                results[f"{arch} fuse {k}"], stack_sizes[f"{arch} fuse {k}"] = fused(flags, k, args.epochs)
    print(f"tuning throughput, batch {args.batch_size}, {name}; model-epochs per second, epochs 2..{args.epochs}:")
    for key, rate in results.items():
        arch = key.split()[0]
        versus = f"   ({rate / results[f'{arch} fuse 1']:.2f} x fuse 1)" if f"{arch} fuse 1" in results else ""
        sizes = f"   models each epoch: {' '.join(map(str, stack_sizes[key]))}" if key in stack_sizes else ""
        print(f"  {key:28s} {rate:8.3f}{versus}{sizes}")
    return results


class FirstStepClock(L.Callback):
    """Prints the wall-clock time at which the first training step starts, then ends the process."""

    def on_train_batch_start(self, *args: object) -> None:
        print(f"first training step at {time.time()}", flush=True)
        os._exit(0)


def startup(flags: list[str]) -> float:
    """Seconds from launching `python scripts/fit.py FLAGS` to the start of its first training step."""
    with tempfile.TemporaryDirectory() as logs:
        command = [sys.executable, str(Path(__file__).with_name("fit.py")), *flags,
                   f"--trainer.logger.init_args.save_dir={logs}", "--trainer.callbacks+=bench.FirstStepClock"]
        launched = time.time()
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    clock = re.search(r"first training step at ([\d.]+)", done.stdout)  # the progress bar may share its line
    if not clock:
        raise RuntimeError(f"fit.py ended before its first training step:\n{done.stderr[-2000:]}")
    return float(clock[1]) - launched


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each pipeline, the first one excluded")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--skip-d2l", action="store_true", help="leave out the slow d2l pipeline")
    parser.add_argument("--tuning", action="store_true", help="tuning throughput at each --fuse K instead")
    parser.add_argument("--fuse", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="the K of --tuning")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the first epoch is warm-up and not counted")
    if min(args.fuse) < 1:
        parser.error("--fuse: each K must be >= 1")
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("--accelerator gpu: torch sees no CUDA GPU here; leave the flag out to measure on the CPU")
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    shared = [f"--data.batch_size={args.batch_size}", f"--data.data_dir={args.data_dir}",
              f"--data.val_size={args.val_size}", f"--trainer.accelerator={args.accelerator}", "--trainer.devices=1"]
    data = FashionMNISTDataModule(data_dir=args.data_dir, batch_size=args.batch_size, val_size=args.val_size)
    data.setup("test")  # decompresses all four IDX files into torchvision's layout, which d2l's pipeline reads
    floor = RandpermBatches(*(t.to(device) for t in data.train_set.tensors), args.batch_size)
    if args.tuning:
        return tuning(args, device, name, floor, shared)
    flags = [f"--model.depth={args.depth}", f"--model.width={args.width}", *shared]
    results = {}
    if not args.skip_d2l:
        d2l_set = FashionMNIST(args.data_dir, train=True, transform=transforms.ToTensor())
        loader = DataLoader(d2l_set, batch_size=args.batch_size, shuffle=True, num_workers=4)
        results["d2l"] = plain_loop(loader, build_cli(flags).model, device, args.epochs)
    results["floor"] = plain_loop(floor, build_cli(flags).model, device, args.epochs)
    results["ours"] = ours(flags, args.epochs)
    startup_seconds = startup(flags)
    print(f"{architecture(args.depth, args.width)}, batch {args.batch_size}, {name}; "
          f"seconds per epoch, mean of epochs 2..{args.epochs} (epoch 1 is warm-up):")
    per_epoch = {key: statistics.mean(times[1:]) for key, times in results.items()}
    for key, seconds in per_epoch.items():
        print(f"  {key:6s} {seconds:7.3f} s/epoch   (all epochs: {', '.join(f'{t:.3f}' for t in results[key])})")
    print(f"  ours / floor = {per_epoch['ours'] / per_epoch['floor']:.2f}")
    if "d2l" in per_epoch:
        print(f"  d2l / ours   = {per_epoch['d2l'] / per_epoch['ours']:.2f}")
    print(f"start-up, from launching scripts/fit.py to its first training step: {startup_seconds:.2f} s")
    return {**per_epoch, "startup": startup_seconds}


if __name__ == "__main__":
    run_script(main, interrupted="nothing was written", writes_with=None)
