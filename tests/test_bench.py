"""scripts/bench.py and scripts/trials_per_hour.py on the synthetic dataset: every pipeline runs and the report
is complete."""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench  # noqa: E402
import trials_per_hour  # noqa: E402


def test_bench_times_d2l_floor_and_ours_and_prints_the_ratios(synthetic_dir, capsys):
    per_epoch = bench.main(["--data-dir", str(synthetic_dir), "--val-size", "100", "--epochs", "2", "--width", "32"])
    assert set(per_epoch) == {"d2l", "floor", "ours", "startup"}
    assert all(seconds > 0 for seconds in per_epoch.values())
    assert per_epoch["startup"] < 600  # a real launch of fit.py that reached its first step
    printed = capsys.readouterr().out
    assert "784-32-10, batch 256" in printed
    assert re.search(r"ours / floor = \d+\.\d\d", printed) and re.search(r"d2l / ours   = \d+\.\d\d", printed)
    assert re.search(r"first training step: \d+\.\d\d s", printed)


def test_bench_tuning_mode_reports_model_epochs_per_second_for_each_fuse(synthetic_dir, capsys):
    rates = bench.main(["--tuning", "--data-dir", str(synthetic_dir), "--val-size", "100", "--epochs", "2",
                        "--fuse", "1", "3"])
    archs = ["784-256-10", "784-512-512-10"]
    assert set(rates) == {f"{arch} {kind}" for arch in archs for kind in ("floor", "fuse 1", "fuse 3")}
    assert all(rate > 0 for rate in rates.values())
    printed = capsys.readouterr().out
    # Three models in the first epoch, and in the second those that did not diverge (one at least: its rate > 0).
    assert re.search(r"784-512-512-10 fuse 3 +\d+\.\d{3}   \(\d+\.\d\d x fuse 1\)   models each epoch: 3 [1-3]\n",
                     printed)


def test_bench_names_a_net_without_hidden_layers_and_refuses_a_gpu_torch_cannot_see(monkeypatch, capsys):
    assert bench.architecture(0, 256) == "784-10" and bench.architecture(2, 512) == "784-512-512-10"  # was 784--10
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):  # it had been torch's traceback, "Found no NVIDIA driver on your system"
        bench.main(["--accelerator", "gpu"])
    assert "--accelerator gpu: torch sees no CUDA GPU here" in capsys.readouterr().err


@pytest.mark.parametrize("workers, devices", [(2, []), (1, ["--trainer.accelerator=cpu", "--trainer.devices=2"])])
def test_trials_per_hour_counts_the_finished_trials_of_every_worker(workers, devices, synthetic_dir):
    # tune.py on two devices starts a worker of its own; by default the two had shared a journal file, unwatched
    # here, and their 3 trials were reported as none finished.
    row = trials_per_hour.main(["--workers", str(workers), "--n-trials", "3", "--", f"--data.data_dir={synthetic_dir}",
                                "--data.val_size=100", "--pruner=none", "--model.depth=1", "--model.width=16",
                                "--trainer.max_epochs=1", *devices])
    assert row["workers"] == workers and row["finished"] >= 3 and row["failed"] == 0
    assert row["seconds"] > 0
    assert row["trials_per_hour"] == pytest.approx(row["finished"] / row["seconds"] * 3600, rel=0.01)


def test_ctrl_c_of_trials_per_hour_leaves_no_worker_running(synthetic_dir, monkeypatch):
    # The workers run in sessions of their own, which Ctrl-C does not reach: they had trained on, unwatched.
    started = []

    def popen(*args, **kwargs) -> subprocess.Popen:
        started.append(subprocess.Popen(*args, **kwargs))
        return started[-1]

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(trials_per_hour, "subprocess", SimpleNamespace(Popen=popen, STDOUT=subprocess.STDOUT))
    monkeypatch.setattr(trials_per_hour, "time", SimpleNamespace(time=time.time, sleep=interrupted))
    with pytest.raises(KeyboardInterrupt):
        trials_per_hour.main(["--workers", "1", "--n-trials", "1", "--", f"--data.data_dir={synthetic_dir}"])
    (worker,) = started
    assert worker.wait(timeout=30) == -signal.SIGKILL


def test_trials_per_hour_refuses_a_study_of_the_users_and_says_a_bad_log_path_in_one_line(synthetic_dir, tmp_path,
                                                                                         capsys):
    with pytest.raises(SystemExit):  # a study watched under another name would seem to finish no trial
        trials_per_hour.main(["--n-trials", "1", "--", "--study-name=mine", f"--data.data_dir={synthetic_dir}",
                              "--data.val_size=100", "--model.width=16", "--trainer.max_epochs=1"])
    assert "--study-name is trials_per_hour.py's to set" in capsys.readouterr().err
    command = [sys.executable, str(Path(trials_per_hour.__file__)), "--n-trials", "1", "--log", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: [Errno 21] Is a directory: '{tmp_path}'\nchoose another path with --log")
