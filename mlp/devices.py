"""tune.py on several devices: `--trainer.devices N` means N workers on one study, this process on the first device
and one spawned process on each other, each training its own trials on its device alone. Not DDP: a small net gains
nothing from it, and Lightning launches DDP's other ranks by running the script again, which tune.py must not do."""

import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Self

import torch
from lightning import Trainer

from mlp.errors import UserError, check, exit_saying

STOP_SECONDS = 120  # how long an interrupted worker may take to fail its trials and exit before it is killed


def one_device_args(fit_args: list[str], trainer: Trainer) -> list[list[str]]:
    """For each of the Trainer's devices, the fit flags that train on it alone: one list per worker."""
    if trainer.num_devices == 1 and trainer.strategy.launcher is None:
        return [fit_args]  # no strategy that starts processes: a trial's state stays in the worker that trains it
    check(trainer.num_nodes == 1, "tune.py spreads its trials over one machine's devices; for several machines "
          "run the same tune.py on each with --trainer.num_nodes 1 and a shared --storage (see docs/scaling.md)")
    if trainer.strategy.root_device.type == "cpu":
        device_flags = ["--trainer.devices=1"] * trainer.num_devices
    else:
        device_flags = [f"--trainer.devices=[{index}]" for index in trainer.device_ids]
    return [[*fit_args, flag, "--trainer.strategy=auto"] for flag in device_flags]


def cpu_threads(workers: int) -> int:
    """Each worker's share of the CPU's cores, so that N workers on the CPU do not fight over them."""
    return max(1, (os.cpu_count() or 1) // workers)


class OtherDevices:
    """While the with block runs, `train(*args, fit_args)` runs in one spawned process per extra entry of
    `worker_args`. On Ctrl-C each worker fails its running trials (as any worker does) and exits; leaving the
    block waits for them."""

    def __init__(self, train: Callable[..., None], args: tuple, worker_args: Sequence[list[str]]) -> None:
        spawn = multiprocessing.get_context("spawn")  # fork would copy this process's threads and CUDA state
        self.ready = [spawn.Event() for _ in worker_args[1:]]
        self.processes = [
            spawn.Process(target=worker, args=(train, args, fit_args, len(worker_args), ready), name=f"worker {k}")
            for k, (fit_args, ready) in enumerate(zip(worker_args[1:], self.ready), start=1)
        ]

    def __enter__(self) -> Self:
        if self.processes:
            torch.set_num_threads(cpu_threads(len(self.processes) + 1))
        for process in self.processes:
            process.start()
        # This process starts its own trials once every worker has started Python and its libraries (seconds),
        # so that the study's first trials are spread over the devices, not all taken here.
        try:
            while not all(ready.is_set() or not p.is_alive() for ready, p in zip(self.ready, self.processes)):
                time.sleep(0.1)
        except KeyboardInterrupt as error:
            self.__exit__(KeyboardInterrupt, error, None)
            raise
        return self

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        if isinstance(error, KeyboardInterrupt):
            # A terminal's Ctrl-C reaches every worker; a signal sent to this process alone is passed on.
            for process in self.processes:
                if process.is_alive():
                    os.kill(process.pid, signal.SIGINT)
        for process in self.processes:
            process.join(STOP_SECONDS if error else None)
            if process.is_alive():
                process.kill()
                process.join()

    def failed(self) -> list[str]:
        """The workers that ended in an error (their trials were failed and retried by the others)."""
        return [f"{p.name} (exit status {p.exitcode})" for p in self.processes if p.exitcode not in (0, None)]


def worker(train: Callable[..., None], args: tuple, fit_args: list[str], workers: int, ready) -> None:
    """A spawned worker: its share of the CPU, Ctrl-C as a KeyboardInterrupt, then its trials."""
    # A shell starts background jobs with SIGINT ignored, and a spawned process inherits that.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.set_num_threads(cpu_threads(workers))
    ready.set()
    try:
        train(*args, fit_args)
    except KeyboardInterrupt:
        pass  # its trials are failed; the process that started it reports the interruption
    except UserError as error:
        exit_saying(f"error: {error}")
