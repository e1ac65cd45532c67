"""The study in its storage, and the rules every worker on it follows: which trial to run next, when to wait
for other workers, the heartbeats by which a dead worker's trial is found and rerun, and which worker writes
the report."""

import fcntl
import os
import random
import re
import signal
import socket
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, Self

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from mlp.budget import Budget
from mlp.cli import MLPCLI
from mlp.errors import UserError
from mlp.records import record
from mlp.search import FIT_FLAGS, SearchSpace, TrialSeededTPE, make_pruner

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Trials that are or will be counted towards --n-trials: a WAITING one is run by the next worker to ask.
LIVE = (*FINISHED, TrialState.RUNNING, TrialState.WAITING)
# A worker that dies leaves its trial RUNNING; once its heartbeat is older than the grace period, any other
# worker marks it failed and enqueues its parameters again. Idle workers look again every heartbeat.
HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 30
RETRY_SECONDS = 1  # after a heartbeat that failed: the grace period leaves time for a few tries
log = optuna.logging.get_logger("optuna.mlp")


def connect(storage: str) -> BaseStorage:
    """The storage, with heartbeats on: a journal file for a path (no `://`, as optuna-dashboard reads one),
    else an RDB URL whose tables are created on first use."""
    if is_journal(storage):
        return journal_storage(storage)
    if storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        return heartbeat_storage(storage)
    # SQLAlchemy's errors cover a bad URL and, wrapped, the driver's (unreachable server, refused login); an
    # ImportError is a driver that is not installed, a ValueError a port that is no number. Anything else is a
    # bug and keeps its traceback.
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as error:
        first_line = str(error).splitlines()[0]  # SQLAlchemy appends the SQL and a link to its docs
        raise UserError(f"cannot open the study storage {shown(storage)}: {masked(first_line, storage)}") from None


def is_journal(storage: str) -> bool:
    return "://" not in storage


def shown(storage: str) -> str:
    """The storage as it may be printed or logged: a URL with its password masked."""
    if is_journal(storage):
        return repr(storage)
    try:
        return repr(sqlalchemy.engine.make_url(storage).render_as_string(hide_password=True))
    except (sqlalchemy.exc.ArgumentError, ValueError):  # not a URL SQLAlchemy parses (a bad port...)
        return repr(PASSWORD.sub(r"\1***@", storage))


PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")  # user:password@ in a URL SQLAlchemy cannot parse


def masked(message: str, storage: str) -> str:
    """A message about the storage (a driver's error, a failed heartbeat) with the URL's password masked."""
    try:
        password = sqlalchemy.engine.make_url(storage).password if not is_journal(storage) else None
    except (sqlalchemy.exc.ArgumentError, ValueError):
        password = None
    return message.replace(str(password), "***") if password else message


def heartbeat_storage(storage_url: str, attempts: int = 6) -> RDBStorage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = RDBStorage(
                storage_url,
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=GRACE_SECONDS,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                engine_kwargs=engine_kwargs(storage_url),
            )
    except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError) as error:
        # Workers started together on an empty database race to create the same tables and types; a loser gets
        # one of these errors (SQLite: "database is locked", "table ... already exists") and finds everything
        # made when it tries again. Backing off, doubled each time, spreads 32 workers' retries out.
        if attempts == 1 or not table_race(error):
            raise
        time.sleep(random.uniform(0.5, 1.5) * 2 ** (6 - attempts))
        return heartbeat_storage(storage_url, attempts - 1)
    if storage.engine.name == "sqlite" and storage.engine.url.database not in (None, "", ":memory:"):
        sqlalchemy.event.listen(storage.engine, "connect", write_ahead_log)
        storage.engine.dispose()  # the connections that created the tables reopen with it
    return storage


def table_race(error: sqlalchemy.exc.SQLAlchemyError) -> bool:
    """Whether the error is one a worker gets when another creates the tables at the same moment, rather than
    a refused login or an unreachable server (OperationalErrors too, which no retry mends)."""
    message = str(error)
    return not isinstance(error, sqlalchemy.exc.OperationalError) or "locked" in message or "already exists" in message


def engine_kwargs(storage_url: str) -> dict[str, Any]:
    """The worker's one connection pool: its main thread and its heartbeat thread hold a connection each at most.

    A server's connections are few (PostgreSQL's default max_connections is 100, #1347 "too many clients"), so
    each worker keeps at most two, where SQLAlchemy's default pool would let it open 15. pre_ping replaces a
    pooled connection the server closed (a restart, an idle timeout) before it is used, rather than failing the
    call that gets it (Optuna turns it on for MySQL alone).
    """
    if storage_url.startswith("sqlite"):
        return {}
    return {"pool_size": 2, "max_overflow": 0, "pool_timeout": 60, "pool_pre_ping": True}


class HeartbeatJournal(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with the heartbeats Optuna gives only its RDBStorage (5.1): a beat is the trial's
    `heartbeat` system attribute, the time it was recorded; a running trial whose beat is older than the grace
    period is stale. Optuna's own fail_stale_trials and RetryHeartbeatStaleTrialCallback then fail and requeue
    it as on an RDB. The clock is the machine's, which every worker on a journal file shares.

    BaseHeartbeat is private to Optuna ("not supposed to be directly accessed by library users"), but it is what
    fail_stale_trials asks a storage for; tests/test_storage.py's dead-worker test fails on the upgrade that
    changes it."""

    def __init__(self, path: str) -> None:
        super().__init__(JournalFileBackend(path, KernelLock(path)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.stale_callback = RetryHeartbeatStaleTrialCallback(max_retry=1)

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, "heartbeat", time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        # A trial that never beat counts from its start: its worker beats as soon as it has asked for its trials
        # (Heartbeats), so one that died in between would otherwise stay RUNNING, and the study unfinished. A beat
        # before the start is not this run's: a retry inherits its dead original's system attributes, last beat
        # included (RetryHeartbeatStaleTrialCallback), and was failed as stale the moment it started.
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        last = {t.number: max(t.system_attrs.get("heartbeat", 0.0), t.datetime_start.timestamp()) for t in running}
        stale = [number for number, beat in last.items() if now - beat > GRACE_SECONDS]
        return [self.get_trial_id_from_study_id_trial_number(study_id, number) for number in stale]

    def get_heartbeat_interval(self) -> int:
        return HEARTBEAT_SECONDS

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None]:
        return self.stale_callback


class KernelLock(JournalFileOpenLock):
    """The journal file's write lock as the kernel's `flock` on a file beside it. Optuna's own locks are a lock file
    that a writer creates and deletes: one killed while writing leaves it behind, and every other worker waits out a
    30 s grace period before breaking it (32 workers with 3 killed stalled together, and their heartbeats went
    stale); and a waiter polls, sleeping up to 1 s between tries. The kernel releases a dead process's flock at
    once and wakes a waiter as soon as the lock is free. Every worker of this template takes this lock; a plain
    Optuna process writing to the same file would not wait for it (reading, as optuna-dashboard does, takes none)."""

    def __init__(self, journal: str) -> None:
        # Optuna's lock class only for its interface (the base, BaseJournalFileLock, is private): none of its state.
        self.path, self.held = f"{journal}.flock", -1

    def acquire(self) -> bool:
        held = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(held, fcntl.LOCK_EX)
        self.held = held
        return True

    def release(self) -> None:
        held, self.held = self.held, -1
        os.close(held)  # closing the file releases its lock


def journal_storage(path: str) -> HeartbeatJournal:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return HeartbeatJournal(path)
    except (OSError, ValueError) as error:  # a folder in the way, no permission; ValueError: not a journal
        raise UserError(f"cannot open the study storage {shown(path)} as a journal file: {error}") from None


def write_ahead_log(connection: sqlite3.Connection, _: object) -> None:
    """Put an SQLite study file in write-ahead-log mode, synchronised at checkpoints rather than every commit.

    A trial writes each of its intermediate values and user attributes in a transaction of its own; in SQLite's
    default rollback-journal mode each waits for the disk twice. With the log, a commit is one append (2.3 ms down
    to 0.8 ms each on the 2-core machine, measured when a trial wrote ~100 values: about 1.2 s of an 8-trial
    study). A crashed or killed worker loses nothing; a power cut may lose the last commits, never corrupt the
    file. Any process reading the file (optuna-dashboard, a test) uses the log too.
    """
    cursor = connection.cursor()
    if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        try:
            cursor.execute("PRAGMA journal_mode=WAL")  # kept in the file, so only its first connection switches
        except sqlite3.OperationalError:
            pass  # another process holds the file open in a transaction: keep the rollback journal, only slower
    cursor.execute("PRAGMA synchronous=NORMAL")  # per connection
    cursor.close()


def open_study(
    study_name: str, storage_url: str, pruner: str, shortest_epochs: int, seed: int, first: dict | None = None,
    slow_starters: bool = False,
) -> optuna.Study:
    """Create the study, or load it if it exists, so that rerunning the same command continues it; its trial 0
    draws `first` (see TrialSeededTPE); the pruner is `make_pruner`'s."""
    settings = dict(
        study_name=study_name,
        storage=connect(storage_url),
        sampler=TrialSeededTPE(seed, first),
        pruner=make_pruner(pruner, shortest_epochs, slow_starters),
    )
    try:
        return optuna.create_study(direction="maximize", **settings)
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(**settings)


def fit_defaults(cli: MLPCLI, space: SearchSpace) -> dict[str, Any] | None:
    """The searched hyperparameters fit.py would train with the same flags, as the study's first trial; None
    when one lies outside its search range.

    fit.py's defaults were chosen on the validation split, so the search starts from a known-good point. A
    pinned hyperparameter comes from the fit flags, as in every trial.
    """
    start = {name: cli.config[flag] for name, flag in FIT_FLAGS.items()}
    searched = space.searched()
    if all(space.holds(name, start[name]) for name in searched):
        return {name: start[name] for name in searched}
    return None


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage the study was opened with. Optuna's Study keeps it private (`_storage`) and offers no public
    accessor, but its own optimize beats trials' hearts through it, and so must a worker running trials by ask and
    tell (see Heartbeats): this is the one place that reaches for it (tests/test_private_apis.py fails if it moves)."""
    return study._storage


class Heartbeats:
    """While the with block runs, a thread records a heartbeat for each trial of `trials` (a trial leaves the list
    when the study is told its end) every HEARTBEAT_SECONDS, as Optuna's optimize does for its one trial; a worker
    that dies stops beating, and its trials are retried.

    A beat that fails (the storage unreachable for a moment) is logged and tried again RETRY_SECONDS later: a
    thread that died of it would leave the worker's trials to be failed as stale, and retried elsewhere, while
    this worker still trains them."""

    def __init__(self, study: optuna.Study, trials: list[optuna.Trial]) -> None:
        self.storage, self.study_name, self.trials = storage_of(study), study.study_name, trials
        self.trial_ids: dict[int, int] = {}  # by trial number, looked up once
        self.failed_elsewhere: set[int] = set()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.beat, daemon=True)

    def beat(self) -> None:
        while True:
            wait = HEARTBEAT_SECONDS
            for trial in [t for t in self.trials if t.number not in self.failed_elsewhere]:
                try:
                    self.storage.record_heartbeat(self.trial_id(trial.number))
                except optuna.exceptions.UpdateFinishedTrialError:
                    # Another worker failed it as stale (a journal file's beats may be late under load): its retry
                    # has its place, and its epoch's end stops it here (EpochEnds.judge).
                    self.failed_elsewhere.add(trial.number)
                except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError, OSError) as error:
                    first_line = str(error).splitlines()[0]
                    log.warning(f"Heartbeat of trial {trial.number} failed ({first_line}); trying again.")
                    wait = RETRY_SECONDS
            if self.stopped.wait(wait):
                return

    def trial_id(self, number: int) -> int:
        if number not in self.trial_ids:
            study_id = self.storage.get_study_id_from_name(self.study_name)
            self.trial_ids[number] = self.storage.get_trial_id_from_study_id_trial_number(study_id, number)
        return self.trial_ids[number]

    def join(self, trials: list[optuna.Trial]) -> None:
        """Beat for `trials` now and from then on: a trial asked while others train (a freed place refilled) would
        otherwise have no heartbeat until the thread's next beat, and a worker killed in between would leave it
        running for good where Optuna counts only trials that beat (SQLite, PostgreSQL)."""
        for trial in trials:
            self.storage.record_heartbeat(self.trial_id(trial.number))
        self.trials.extend(trials)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()


def worker_name(pid: int | None = None) -> str:
    """How a trial records the worker that trains it (the `worker` user attribute): host and process id."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def place(trial: FrozenTrial) -> int:
    """The trial's place in the order the study created its trials; a retry keeps the place of the trial it
    retries, whose place it takes over."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retried = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    return trial.number if retried is None else retried


def surplus_trials(study: optuna.Study, n_trials: int) -> set[int]:
    """The numbers of the running or queued trials that a study of n_trials has no place for.

    Workers check the count before they ask for a trial, but two can check at the same moment, and Optuna's
    fail_stale_trials fails all of a dead worker's trials before it queues their retries, so a worker asking in
    between starts a fresh trial in a place a retry is owed. The rule every worker applies: finished trials
    keep their places, and the rest go to running and queued trials by their `place`: a fresh trial created in
    the same moment as another loses to the earlier one, and a fresh trial loses to a retry of an older trial.
    """
    live = study.get_trials(deepcopy=False, states=LIVE)
    unfinished = sorted((place(t), t.number) for t in live if t.state not in FINISHED)
    places_left = max(0, n_trials - sum(t.state in FINISHED for t in live))
    return {number for _, number in unfinished[places_left:]}


def is_surplus(trial: optuna.Trial, n_trials: int) -> bool:
    """Whether the study has no place for this running trial (see surplus_trials); checked when it starts and
    at each of its epochs' ends, when it stops if so."""
    return trial.number in surplus_trials(trial.study, n_trials)


def mark_surplus(trial: optuna.Trial) -> None:
    """Record that the study had no place for the trial; it is then failed, but counts as no failure (see
    mlp.progress)."""
    record(trial, surplus=True)


def gives_way(trial: optuna.Trial, epochs_trained: int) -> None:
    """Note a running trial found surplus at the end of an epoch: a retry of an older trial took its place. The
    epochs it trained count in the report's cost, though it reports no value for the last of them."""
    record(trial, epochs_trained=epochs_trained)
    log.info(f"Trial {trial.number} stops: a retry of an older trial took its place in the study.")


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the trials of workers whose heartbeat went stale; each is enqueued again once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def may_start_trial(study: optuna.Study, n_trials: int, trials: list[FrozenTrial] | None = None) -> bool:
    """Whether a worker may start a trial: the study holds a WAITING one, or fewer than n_trials live ones.
    `trials`: the study's trials, if just read."""
    states = [t.state for t in (study.get_trials(deepcopy=False) if trials is None else trials)]
    return TrialState.WAITING in states or sum(state in LIVE for state in states) < n_trials


class TrialRunner(Protocol):
    """What run_trials needs of a worker's trials (see mlp.trials.Trials)."""

    interrupted: bool  # Ctrl-C stopped the trials started last

    def start_trials(self, study: optuna.Study, may_refill: Callable[[], bool]) -> None: ...


def run_trials(
    study: optuna.Study,
    objective: TrialRunner,
    n_trials: int,
    budget: Budget,
    progress: Callable[[optuna.Study], None] = lambda study: None,
) -> None:
    """Run trials until the study holds n_trials finished ones and no trial is running anywhere, or until the
    time left in the `budget` is what the final model needs.

    `progress` is called with the study after each trial and while waiting (see mlp.progress).

    Any number of workers may do this on one study at once. A worker starts a trial while the study holds a
    WAITING one or fewer than n_trials live ones. With nothing to start it waits for the other workers'
    trials, so that if one of them dies, its trial is failed once the heartbeat is stale and rerun here.
    """

    def may_refill() -> bool:
        """Whether a worker training several trials at once may start another as one ends (see mlp.trials)."""
        fail_stale_trials(study)
        progress(study)
        return budget.trials_may_start(best_first(study))

    waiting_logged = False
    with CtrlC() as ctrl_c:
        while True:
            ctrl_c.raise_if_requested()
            # One read of the study's trials serves the whole pass: with 32 workers each pass's reads add up (the
            # stale trials' query and the progress bar's read aside, each pass read them four times).
            fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            if not budget.trials_may_start(ranked(trials)):
                return
            progress(study)
            states = [t.state for t in trials]
            if may_start_trial(study, n_trials, trials):
                objective.start_trials(study, may_refill)
                if objective.interrupted:
                    raise KeyboardInterrupt
            elif TrialState.RUNNING in states:
                if not waiting_logged:
                    running = states.count(TrialState.RUNNING)
                    log.info(f"No trial left to start; waiting for {running} running elsewhere.")
                    waiting_logged = True
                time.sleep(max(0.0, min(HEARTBEAT_SECONDS, budget.left())))
            else:
                return


class CtrlC:
    """While the with block runs, Ctrl-C is recorded as well as raised, and `raise_if_requested` raises it again.

    Python raises KeyboardInterrupt wherever the main thread is; raised inside a weakref callback or a __del__ (as
    the gc.collect after a stack runs them) it is printed as "Exception ignored" and dropped, and a worker went on
    to train the next trial. Within a run `mlp.cli.InterruptAtBatchEnd` takes Ctrl-C over, and hands it back."""

    def __enter__(self) -> Self:
        self.requested, self.previous = False, None
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self.previous = signal.signal(signal.SIGINT, self.request)
        return self

    def request(self, signum: int, frame: object) -> None:
        self.requested = True
        raise KeyboardInterrupt

    def raise_if_requested(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def best_first(study: optuna.Study) -> list[FrozenTrial]:
    """The study's complete trials, best value first (the earlier of equal ones)."""
    return ranked(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def ranked(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The complete ones of `trials`, best value first (the earlier of equal ones)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return sorted(complete, key=lambda t: (-t.value, t.number))


def finished_numbers(study: optuna.Study) -> set[int]:
    return {t.number for t in study.get_trials(deepcopy=False, states=FINISHED)}


def writes_report(study: optuna.Study, ran: list[int], finished_before: set[int]) -> bool:
    """Whether this worker reports: the one that finished the study's last trial, once none is running.

    Every worker agrees on which trial finished last, so exactly one of the workers that ran trials reports.
    A worker that ran none (all its trials surplus, or the command rerun on a finished study) reports only if
    that trial had finished before it started (`finished_before`): then no worker beside it finished it.
    """
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.RUNNING for t in trials):
        return False
    finished = [t for t in trials if t.state in FINISHED]
    if not finished:
        return True  # no trial to test: the report only counts the failed ones
    last = max(finished, key=lambda t: (t.datetime_complete, t.number)).number
    return last in ran or (not ran and last in finished_before)
