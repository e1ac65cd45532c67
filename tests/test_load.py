"""The load test's short version (scripts/load_test.py): three workers on a journal file, one killed mid-trial and one
interrupted, and two on PostgreSQL, one killed (tests/test_scale_out.py runs three there); every check of the
full 32-worker run must hold."""

import sys

import pytest

from mlp.errors import UserError
from tests.conftest import real_data_available
from tests.test_reliability import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import load_test  # noqa: E402


@pytest.mark.skipif(not real_data_available(), reason="needs Fashion-MNIST: apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("storage, workers, interrupt", [("journal", 3, 1), ("postgresql", 2, 0)])
def test_workers_some_killed_or_interrupted_finish_the_study(storage, workers, interrupt, tmp_path):
    # Trials long enough (8 epochs of 3,000 images) for the half-second poll to find one mid-trial: a worker's next
    # trial joins its running Trainer, with no start-up between them.
    (result,) = load_test.main([
        f"--workers={workers}", "--n-trials=6", "--kill=1", f"--interrupt={interrupt}", f"--storage={storage}",
        "--images=3000", "--epochs=8", "--heartbeat=1", "--grace=3", "--timeout=240", f"--keep={tmp_path / 'load'}",
    ])
    if "skipped" in result:
        pytest.skip(result["skipped"])
    assert not load_test.failed([result])
    checked = {what for what, _, _ in result["checks"]}
    assert "every killed trial failed by heartbeat and rerun once" in checked
    assert storage == "journal" or "no password in any output or file" in checked


@pytest.mark.parametrize("flag, said", [("--n-trials=0", "--n-trials must be >= 1"),
                                        ("--kill=-1", "--kill and --interrupt count workers: 0 or more")])
def test_counts_below_their_range_are_refused_before_any_worker_starts(flag, said):
    # --n-trials 0 had run the default 64 trials; --kill -1 a load test with one killed worker fewer than none.
    with pytest.raises(UserError, match=said):
        load_test.main([flag])
