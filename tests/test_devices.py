"""tune.py with several devices: one worker per device on one study, never a DDP trial, one report; the study in
a journal file unless --storage names another."""

import signal
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from optuna.trial import TrialState

from mlp.devices import cpu_threads, one_device_args, worker
from mlp.errors import UserError
from mlp.cli import build_cli
from tests.test_reliability import run, start, tune_args, wait_for

TWO_CPU_DEVICES = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--fuse=1", "--pruner=none"]


def default_storage_args(synthetic_dir: Path, tmp_path: Path, n_trials: int) -> list[str]:
    """tune_args less --storage: the study goes where tune.py puts it by default."""
    return [arg for arg in tune_args(synthetic_dir, tmp_path, n_trials) if not arg.startswith("--storage")]


def journal(tmp_path: Path) -> Path:
    return tmp_path / "logs" / "tune" / "optuna.journal"  # the default storage of several workers


def trials_of(tmp_path: Path) -> list[optuna.trial.FrozenTrial]:
    if not journal(tmp_path).exists():  # opening it would create it
        return []
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal(tmp_path))))
    try:
        return optuna.load_study(study_name="faults", storage=storage).trials
    except KeyError:  # the study is not created yet
        return []


def test_each_worker_gets_one_device_and_its_share_of_the_cores(synthetic_dir, tmp_path):
    fit_args = [f"--data.data_dir={synthetic_dir}", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    assert one_device_args(fit_args, build_cli(fit_args).trainer) == [fit_args]
    two = [*fit_args, "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    workers = one_device_args(two, build_cli(two).trainer)
    assert workers == [[*two, "--trainer.devices=1", "--trainer.strategy=auto"]] * 2
    assert build_cli(workers[0]).trainer.num_devices == 1
    # One device under ddp_spawn had the trials train in a process Lightning spawned: a pickling traceback.
    spawn = [*fit_args, "--trainer.accelerator=cpu", "--trainer.strategy=ddp_spawn"]
    alone = [*spawn, "--trainer.devices=1", "--trainer.strategy=auto"]
    assert one_device_args(spawn, build_cli(spawn).trainer) == [alone]
    assert cpu_threads(2) >= 1 and cpu_threads(10_000) == 1


def test_two_cpu_devices_run_two_workers_that_both_train_and_one_report(synthetic_dir, tmp_path):
    result = run("tune.py", [*default_storage_args(synthetic_dir, tmp_path, n_trials=2), *TWO_CPU_DEVICES], timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = trials_of(tmp_path)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 2 and TrialState.RUNNING not in [t.state for t in trials]
    assert len({t.user_attrs["worker"] for t in finished}) == 2  # one trial on each device's worker
    assert result.stdout.count('"best_trial"') == 1  # the report, printed once
    assert (tmp_path / "logs" / "tune" / "faults" / "report.json").is_file()
    assert not (tmp_path / "logs" / "tune" / "optuna.db").exists()


def test_sigint_to_the_tune_command_fails_and_queues_again_every_workers_running_trial(synthetic_dir, tmp_path):
    args = [*default_storage_args(synthetic_dir, tmp_path, n_trials=4), *TWO_CPU_DEVICES, "--epochs", "50", "50"]
    process = start("tune.py", args)

    def both_running() -> bool:
        trials = trials_of(tmp_path)
        running = [t for t in trials if t.state == TrialState.RUNNING]
        return len(running) == 2 and all(t.intermediate_values for t in running)

    wait_for(process, both_running, "a running trial on each worker")
    process.send_signal(signal.SIGINT)  # to the command alone, as `kill -INT`; a terminal's Ctrl-C reaches all
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0 and "Traceback" not in stderr, stderr[-3000:]
    assert "run the same command again to continue" in stderr
    trials = trials_of(tmp_path)
    assert [t.state for t in trials] == [TrialState.FAIL] * 2 + [TrialState.WAITING] * 2, stderr[-3000:]  # retries
    assert all(t.user_attrs.get("interrupted") for t in trials[:2])


def test_a_spawned_worker_writes_its_error_line_in_one_call(monkeypatch):
    # tune.py's device workers may meet the same bad input at once (a storage gone, say); sys.exit wrote each line's
    # text and its newline in two calls, where two processes' lines can run into one (as DDP's did).
    def bad_input(fit_args: list[str]) -> None:
        raise UserError("cannot open the study storage")

    writes = []
    monkeypatch.setattr(sys, "stderr", SimpleNamespace(write=writes.append, flush=lambda: None))
    monkeypatch.setattr("multiprocessing.parent_process", lambda: object())  # as in a spawned worker
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # the worker's own SIGINT handler: not this process's
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exit:
            worker(bad_input, (), [], 2, threading.Event())
    finally:
        torch.set_num_threads(threads)
    assert exit.value.code == 1
    assert writes == ["error: cannot open the study storage\n"]
