"""The load test's short version (scripts/load_test.py): three workers on a journal file, one killed mid-trial and one
interrupted, and two on PostgreSQL, one killed (tests/test_scale_out.py runs three there); every check of the
full 32-worker run must hold."""

import subprocess
import sys

import pytest

from mlp.errors import UserError
from tests.conftest import real_data_available
from tests.test_reliability import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import load_test  # noqa: E402


@pytest.mark.skipif(not real_data_available(), reason="needs Fashion-MNIST: apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("storage, workers, interrupt", [("journal", 3, 1), ("postgresql", 2, 0)])
def test_workers_some_killed_or_interrupted_finish_the_study(storage, workers, interrupt, tmp_path, monkeypatch):
    # Trials long enough (8 epochs of 3,000 images) for the half-second poll to find one mid-trial: a worker's next
    # trial joins its running Trainer, with no start-up between them. --keep relative: the workers, which run in the
    # repository's folder, had written there while this process read an empty folder here.
    monkeypatch.chdir(tmp_path)
    (result,) = load_test.main([
        f"--workers={workers}", "--n-trials=6", "--kill=1", f"--interrupt={interrupt}", f"--storage={storage}",
        "--images=3000", "--epochs=8", "--heartbeat=1", "--grace=3", "--timeout=240", "--keep=load",
    ])
    assert not (ROOT / "load").exists()
    if "skipped" in result:
        pytest.skip(result["skipped"])
    assert not load_test.failed([result])
    checked = {what for what, _, _ in result["checks"]}
    assert "every killed trial failed by heartbeat and rerun once" in checked
    assert storage == "journal" or "no password in any output or file" in checked


@pytest.mark.parametrize("flag, said", [("--n-trials=0", "--n-trials must be >= 1"),
                                        ("--kill=-1", "--kill and --interrupt count workers: 0 or more"),
                                        ("--epochs=0", "--epochs must be >= 1"), ("--baseline=-1", "--baseline >= 0"),
                                        ("--heartbeat=0", "--heartbeat, --grace and --timeout are seconds above 0")])
def test_counts_below_their_range_are_refused_before_any_worker_starts(flag, said):
    # --n-trials 0 had run the default 64 trials; --kill -1 a load test with one killed worker fewer than none;
    # --epochs 0, --baseline -1 and --heartbeat 0 had started workers that all failed, then a ZeroDivisionError.
    with pytest.raises(UserError, match=said):
        load_test.main(["--workers=2", "--kill=0", "--interrupt=0", "--storage=journal", flag])


def test_workers_that_finish_no_trial_are_said_in_one_line_with_the_workers_last_words(tmp_path, monkeypatch):
    def failing_worker(flags, out, times, heartbeat, grace) -> subprocess.Popen:
        with out.open("w") as log:
            return subprocess.Popen([sys.executable, "-c", "print('error: the reason')"], stdout=log)

    monkeypatch.setattr(load_test, "start_worker", failing_worker)
    monkeypatch.setattr(load_test, "data_slice", lambda folder, images: folder)
    with pytest.raises(UserError, match="no trial finished; worker 0's output ends: error: the reason"):
        load_test.main(["--workers=2", "--kill=0", "--interrupt=0", "--storage=journal", f"--keep={tmp_path / 'k'}"])
    (tmp_path / "file").touch()  # a file, not a folder: had been refused as a save_dir of tune.py's
    with pytest.raises(UserError, match="file: choose an empty or new folder"):
        load_test.main(["--workers=2", "--kill=0", "--interrupt=0", f"--keep={tmp_path / 'file'}"])
