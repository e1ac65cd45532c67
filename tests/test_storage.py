"""The study's storage: a journal file beside SQLite and PostgreSQL, heartbeats and a dead worker's trial rerun on
it, what one worker reads and holds of the storage, workers started at once, and URLs printed without their
password."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState

from mlp.budget import Budget
from mlp.cli import InterruptAtBatchEnd
from mlp.errors import UserError
from mlp.progress import StudyProgress
from mlp.search import SearchSpace
from mlp.study import (
    Heartbeats, KernelLock, connect, fail_stale_trials, masked, not_a_journal, open_study, run_trials, shown, storage_of
)
from mlp.tune import default_storage
from tests.test_reliability import ROOT
from tests.test_scale_out import Quadratic

sys.path.insert(0, str(ROOT / "scripts"))
import tune


def storage_in(tmp_path, kind: str) -> str:
    return str(tmp_path / "study.journal") if kind == "journal" else f"sqlite:///{tmp_path / 'study.db'}"


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_dead_workers_trial_is_failed_once_its_heartbeat_is_stale_and_rerun(kind, tmp_path, monkeypatch):
    """Optuna (5.1) beats hearts on an RDB only; the journal file gets the same from mlp.study.HeartbeatJournal."""
    monkeypatch.setattr("mlp.study.HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr("mlp.study.GRACE_SECONDS", 2)
    study = open_study("s", storage_in(tmp_path, kind), "none", SearchSpace().epochs[0], seed=0)
    dead = study.ask()  # a worker that started a trial, beat once and died
    dead.suggest_float("x", -1, 1)
    storage_of(study).record_heartbeat(dead._trial_id)
    started = time.monotonic()

    run_trials(study, Quadratic(), n_trials=1, budget=Budget(time.time() + 60))

    trials = study.trials
    assert time.monotonic() - started >= 2  # not before the grace period
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params == trials[0].params and trials[1].system_attrs["failed_trial"] == dead.number


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_on_a_journal_file_a_trial_whose_worker_died_before_its_first_beat_is_stale_after_the_grace_period(
    tmp_path, monkeypatch
):
    """Optuna's RDBStorage never fails such a trial (it has no heartbeat row), and the study waits for it forever."""
    monkeypatch.setattr("mlp.study.HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr("mlp.study.GRACE_SECONDS", 2)
    study = open_study("s", storage_in(tmp_path, "journal"), "none", SearchSpace().epochs[0], seed=0)
    dead = study.ask()
    dead.suggest_float("x", -1, 1)
    run_trials(study, Quadratic(), n_trials=1, budget=Budget(time.time() + 60))
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_on_a_journal_file_a_retry_is_not_stale_by_its_dead_originals_last_beat(tmp_path, monkeypatch):
    """The retry inherits the original's system attributes, its last beat among them: 1 of 64 trials of the
    32-worker load test, and 5 of 23 retries with a 10 s grace, were failed the moment they started."""
    monkeypatch.setattr("mlp.study.HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr("mlp.study.GRACE_SECONDS", 2)
    study = open_study("s", storage_in(tmp_path, "journal"), "none", SearchSpace().epochs[0], seed=0)
    storage = storage_of(study)
    dead = study.ask()
    dead.suggest_float("x", -1, 1)
    storage.record_heartbeat(dead._trial_id)
    time.sleep(2.5)
    fail_stale_trials(study)  # fails it and queues the retry
    retry = study.ask()  # a worker starts the retry, and is about to beat
    inherited = study.trials[retry.number].system_attrs
    assert inherited["failed_trial"] == dead.number and "heartbeat" in inherited
    fail_stale_trials(study)
    assert study.trials[retry.number].state == TrialState.RUNNING


def test_ctrl_c_while_a_stale_trial_is_failed_waits_until_its_retry_is_queued(tmp_path, monkeypatch):
    """Ctrl-C to a worker between trials (where it raises at once) as the worker fails a dead worker's trial,
    landing between the failure and the retry's queueing, loses no retry."""
    monkeypatch.setattr("mlp.study.GRACE_SECONDS", 0)
    study = open_study("s", storage_in(tmp_path, "journal"), "none", SearchSpace().epochs[0], seed=0)
    storage = storage_of(study)
    dead = study.ask()  # a worker that started a trial and died
    dead.suggest_float("x", -1, 1)
    fail = storage.set_trial_state_values

    def fail_then_ctrl_c(*args, **kwargs):
        failed = fail(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return failed

    monkeypatch.setattr(storage, "set_trial_state_values", fail_then_ctrl_c)
    time.sleep(0.01)  # older than the grace period
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # not one an earlier test's run left
    try:
        with pytest.raises(KeyboardInterrupt):
            run_trials(study, Quadratic(), n_trials=1, budget=Budget(time.time() + 60))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    assert study.trials[1].system_attrs["failed_trial"] == dead.number


class CountsReads:
    """Counts get_all_trials calls on a storage."""

    def __init__(self, storage: optuna.storages.BaseStorage) -> None:
        self.calls, self.read = 0, storage.get_all_trials

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.read(*args, **kwargs)


def test_a_pass_of_the_worker_loop_reads_the_trials_once(tmp_path, monkeypatch):
    study = open_study("s", storage_in(tmp_path, "journal"), "none", SearchSpace().epochs[0], seed=0)
    storage = storage_of(study)
    reads = CountsReads(storage)
    monkeypatch.setattr(storage, "get_all_trials", reads)

    class Counted(Quadratic):
        """Quadratic trials, noting the reads before each: the loop's own, since the last trial's end."""

        per_pass: list[int] = []

        def start_trials(self, study, may_refill) -> None:
            self.per_pass.append(reads.calls)
            super().start_trials(study, may_refill)
            reads.calls = 0

    # As a worker out of a terminal runs them (tune.py in the background, or started by another): its bar hidden.
    run_trials(study, Counted(), n_trials=4, budget=Budget(time.time() + 60), progress=StudyProgress(4, file=None))
    # The stale trials' check and the pass's own read (before: three reads a pass beside the stale trials' query).
    assert Counted.per_pass[1:] == [2, 2, 2]


def test_a_journal_writer_killed_while_it_holds_the_lock_holds_no_other_worker_back(tmp_path):
    """Optuna's own lock file outlives a killed writer, and every other worker waited its 30 s grace period."""
    journal = str(tmp_path / "study.journal")
    holder = subprocess.Popen(
        [sys.executable, "-c", (f"from mlp.study import KernelLock\nKernelLock({journal!r}).acquire()\n"
                                "print('held', flush=True)\nimport time\ntime.sleep(600)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline() == "held\n"
    lock, acquired = KernelLock(journal), threading.Event()
    waiter = threading.Thread(target=lambda: lock.acquire() and acquired.set(), daemon=True)
    waiter.start()
    assert not acquired.wait(1)  # held: the writer is alive
    holder.kill()
    holder.wait()
    holder.stdout.close()
    assert acquired.wait(20)  # a grace period would be 30 s
    lock.release()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_heartbeats_go_on_for_the_other_trials_when_another_worker_failed_one_as_stale(tmp_path, monkeypatch):
    """On a journal file the beat of a trial failed elsewhere raises; it once killed the thread, so this worker's
    other trials stopped beating and were failed as stale too."""
    monkeypatch.setattr("mlp.study.HEARTBEAT_SECONDS", 0.1)
    study = open_study("s", storage_in(tmp_path, "journal"), "none", SearchSpace().epochs[0], seed=0)
    failed, alive = study.ask(), study.ask()
    other_worker = optuna.load_study(study_name="s", storage=connect(storage_in(tmp_path, "journal")))
    def beat_of(trial: optuna.Trial) -> float:
        return study.trials[trial.number].system_attrs.get("heartbeat", 0.0)

    def until(condition, seconds: float = 20) -> bool:  # polled: a loaded machine may run the thread late
        deadline = time.monotonic() + seconds
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.05)
        return condition()

    with Heartbeats(study, [failed, alive]) as heartbeats:
        assert until(lambda: beat_of(failed) > 0)
        other_worker.tell(failed.number, state=TrialState.FAIL)
        before = beat_of(alive)
        assert until(lambda: beat_of(alive) > before + 0.2)  # beats after the failed trial's beat raised
        assert heartbeats.thread.is_alive()


class DroppedCtrlC:
    """A worker's trials, during which Ctrl-C lands in a finaliser, where Python prints the KeyboardInterrupt as
    "Exception ignored" and drops it (as the gc.collect after a stack runs finalisers)."""

    interrupted = False

    def __init__(self) -> None:
        self.calls = 0

    def start_trials(self, study, may_refill) -> None:
        self.calls += 1

        class Finalised:
            def __del__(self) -> None:
                os.kill(os.getpid(), signal.SIGINT)

        Finalised()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_ctrl_c_dropped_inside_a_finaliser_still_stops_the_worker(tmp_path):
    study = open_study("s", storage_in(tmp_path, "journal"), "none", SearchSpace().epochs[0], seed=0)
    trials = DroppedCtrlC()
    with pytest.raises(KeyboardInterrupt):
        run_trials(study, trials, n_trials=3, budget=Budget(time.time() + 60))
    assert trials.calls == 1


class CtrlCTwiceInATrial:
    """A worker's trial that Ctrl-C stops at its batch's end, and a second Ctrl-C landing in a finaliser as the stop
    frees the stack (the gc.collect after it); the run's handler stays installed, as Lightning leaves it."""

    interrupted = False

    def start_trials(self, study, may_refill) -> None:
        run = InterruptAtBatchEnd()
        run.setup(None, None, "fit")
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            run.raise_if_requested()  # the batch's end
        run.on_exception(None, None, KeyboardInterrupt())

        class Finalised:
            def __del__(self) -> None:
                os.kill(os.getpid(), signal.SIGINT)

        Finalised()
        self.interrupted = True


def test_a_second_ctrl_c_as_a_stopped_trial_is_failed_is_only_recorded_not_dropped_noisily(tmp_path, monkeypatch):
    # It had been raised in the finaliser: Python printed "Exception ignored in: ..." and its traceback.
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", dropped.append)
    study = open_study("s", storage_in(tmp_path, "journal"), "none", SearchSpace().epochs[0], seed=0)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # not one an earlier test's run left
    try:
        with pytest.raises(KeyboardInterrupt):
            run_trials(study, CtrlCTwiceInATrial(), n_trials=3, budget=Budget(time.time() + 60))
    finally:
        signal.signal(signal.SIGINT, before)
    assert dropped == []


def test_a_journal_file_in_a_folder_that_cannot_exist_is_one_clear_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot open the study storage .*file/study.journal.* as a journal file"):
        connect(str(tmp_path / "file" / "study.journal"))


def test_a_record_a_dead_writer_left_unfinished_is_cut_before_the_next_is_appended(tmp_path):
    """Half a line from a writer that died as it wrote (a full disk, a power cut): Optuna reads past it, but the next
    record appended to it made a line no reader parses, and the study could never be read again."""
    path = str(tmp_path / "study.journal")
    study = optuna.create_study(study_name="s", storage=connect(path))
    study.tell(study.ask(), 0.5)
    with open(path, "ab") as file:
        file.write(b'{"op_code":4,"worker_id":"dead","study_id":0,"datetime_st')
    study.tell(study.ask(), 0.7)  # this worker appends next
    content = (tmp_path / "study.journal").read_bytes()
    assert content.endswith(b"}\n") and b'"dead"' not in content
    assert [t.value for t in optuna.load_study(study_name="s", storage=connect(path)).trials] == [0.5, 0.7]


def test_a_journal_whose_first_record_another_worker_is_writing_is_not_taken_for_another_file(tmp_path):
    for written in (b'{"op_co', b'{"op_code":0,"worker_id":"w', b""):
        (tmp_path / "study.journal").write_bytes(written)
        assert not_a_journal(tmp_path / "study.journal") is None


def test_a_journal_in_a_folder_this_process_may_only_read_is_still_read(tmp_path, monkeypatch):
    path = str(tmp_path / "study.journal")
    study = optuna.create_study(study_name="s", storage=connect(path))
    study.tell(study.ask(), 0.5)

    def refused(lock: KernelLock) -> bool:  # as in another user's study folder, where no lock file can be made
        raise PermissionError(13, "Permission denied", lock.path)

    monkeypatch.setattr(KernelLock, "acquire", refused)
    assert [t.value for t in optuna.load_study(study_name="s", storage=connect(path)).trials] == [0.5]


def test_a_file_that_is_no_journal_is_refused_in_one_line_and_left_as_it_was(tmp_path):
    """Optuna reads a last line that is no record as one still being written, so it would append to these."""
    optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.db'}")
    files = {"notes.txt": b"hello\n", "count.log": b"1\n", "rows.jsonl": b'{"a": 1}\n', "study.db": None}
    for name, content in files.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        before = path.read_bytes()
        why = "an SQLite file, left as it is; give sqlite:///" if name == "study.db" else "no journal Optuna wrote"
        with pytest.raises(UserError, match=f"cannot open the study storage .*{name}.* as a journal file: it is {why}"):
            connect(str(path))
        assert path.read_bytes() == before and not (tmp_path / f"{name}.flock").exists()


def test_a_path_that_is_no_regular_file_is_refused_as_a_journal_in_one_line(tmp_path):
    """A device failed at Optuna's first fsync with a bare "[Errno 22] Invalid argument" that named another flag; a
    named pipe blocked the worker for good, Optuna opening it to append."""
    os.mkfifo(tmp_path / "pipe.journal")
    for path in (os.devnull, str(tmp_path / "pipe.journal")):
        with pytest.raises(UserError, match=f"cannot open the study storage .*{path}.* as a journal file: it is no "
                           "regular file"):
            connect(path)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_optuna_dashboard_reads_the_journal_file(tmp_path):
    storage_url = pytest.importorskip("optuna_dashboard._storage_url", reason="pip install optuna-dashboard")
    path = str(tmp_path / "study.journal")
    study = open_study("s", path, "none", SearchSpace().epochs[0], seed=0)
    study.tell(study.ask(), 0.5)
    # What `optuna-dashboard PATH` opens:
    seen = optuna.load_study(study_name="s", storage=storage_url.get_storage(path))
    assert [(t.state, t.value) for t in seen.trials] == [(TrialState.COMPLETE, 0.5)]


def test_workers_started_at_once_on_an_empty_sqlite_file_all_open_it(tmp_path):
    """Optuna #820: "database is locked" in 7 of 32 SQLite processes started at once. Threads race the same way
    (each storage its own connections): without the retry, 12, 11 and 13 of 16 failed in three rounds."""
    url, errors = f"sqlite:///{tmp_path / 'study.db'}", []

    def worker() -> None:
        try:
            open_study("s", url, "none", SearchSpace().epochs[0], seed=0)
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:"])  # e.g. sqlite:///$UNSET
def test_an_sqlite_database_in_memory_is_refused_as_it_would_lose_the_study(url):
    with pytest.raises(UserError, match="is an SQLite database in memory, gone when the command ends"):
        connect(url)


def test_without_storage_a_study_is_continued_in_whichever_file_of_the_folder_holds_it(tmp_path):
    """A journal file made for another study had sent every later rerun of an SQLite study to the journal, where its
    study was a new one, and its folder's runs another study's."""
    journal, sqlite = str(tmp_path / "optuna.journal"), f"sqlite:///{tmp_path / 'optuna.db'}"
    for name, storage in (("in_sqlite", sqlite), ("in_journal", journal)):
        open_study(name, storage, "none", SearchSpace().epochs[0], seed=0)
    assert [default_storage(tmp_path, 1, name) for name in ("in_sqlite", "in_journal", "new")] == [
        sqlite, journal, journal]


def test_without_storage_a_new_study_of_several_workers_goes_to_the_journal_beside_an_sqlite_file(tmp_path):
    """A study of one worker left optuna.db, and every later study of several workers went there too, where Optuna's
    FAQ and docs/scaling.md advise a journal; one in optuna.db is still continued there."""
    sqlite = f"sqlite:///{tmp_path / 'optuna.db'}"
    open_study("alone", sqlite, "none", SearchSpace().epochs[0], seed=0)
    assert default_storage(tmp_path, 1, "new") == sqlite
    assert default_storage(tmp_path, 2, "new") == str(tmp_path / "optuna.journal")
    assert default_storage(tmp_path, 2, "alone") == sqlite


def test_a_storage_url_is_shown_without_its_password():
    assert shown("postgresql+psycopg://tune:s3cret@db/tune") == "'postgresql+psycopg://tune:***@db/tune'"
    assert shown("postgresql://tune:s3cret@db:notaport/tune") == "'postgresql://tune:***@db:notaport/tune'"
    assert shown("lightning_logs/tune/optuna.journal") == "'lightning_logs/tune/optuna.journal'"


def test_a_short_password_is_masked_where_it_stands_alone_not_inside_the_words_of_a_message():
    # pruning.py --storage postgresql://u:p@127.0.0.1:1/x had printed "(***syco***g.O***erationalError) ... ***ort 1".
    said = "(psycopg.OperationalError) connection to server at 127.0.0.1, port 1 failed"
    assert masked(said, "postgresql://u:p@127.0.0.1:1/x") == said
    url = "postgresql://u:p@db/x"
    assert masked(f"to {url}, password p", url) == "to postgresql://u:***@db/x, password ***"
    assert masked("for s3cret!", "postgresql://tune:s3cret!@db/tune") == "for ***"


def test_an_unreachable_storage_error_names_it_without_its_password(synthetic_dir, tmp_path):
    pytest.importorskip("psycopg", reason="the PostgreSQL driver: pip install 'psycopg[binary]'")
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    args = [f"--storage=postgresql+psycopg://tune:s3cret@127.0.0.1:{port}/db", f"--data.data_dir={synthetic_dir}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"]
    with pytest.raises(UserError, match=r"tune:\*\*\*@127.0.0.1") as error:
        tune.main(args)
    assert "s3cret" not in str(error.value)
