"""The study in its storage, and the rules every worker on it follows: which trial to run next, when to wait for
the others, the heartbeats by which a dead worker's trial is found and rerun, and which worker writes the report."""

import contextlib
import copy
import fcntl
import gc
import os
import random
import re
import signal
import socket
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator
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
from mlp.errors import UserError, why_not_a_file
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
        try:
            Path(storage).parent.mkdir(parents=True, exist_ok=True)
            if why := not_a_journal(Path(storage)):
                raise UserError(why)
            return HeartbeatJournal(storage)
        # A folder in the way, no permission; ValueError, KeyError: lines no journal holds.
        except (OSError, ValueError, KeyError, UserError) as error:
            raise UserError(f"cannot open the study storage {shown(storage)} as a journal file: {error}") from None
    try:
        if storage.startswith("sqlite"):
            database = sqlalchemy.engine.make_url(storage).database
            if database in (None, "", ":memory:"):
                raise UserError(f"the study storage {storage!r} is an SQLite database in memory, gone when the "
                                "command ends, with every trial: give a file, sqlite:///PATH")
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        return heartbeat_storage(storage)
    # A bad URL, or the driver's errors wrapped (unreachable server, refused login); ImportError: no driver
    # installed; ValueError: a port that is no number. Anything else is a bug and keeps its traceback.
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as error:
        first_line = str(error).splitlines()[0]  # SQLAlchemy appends the SQL and a link to its docs
        raise UserError(f"cannot open the study storage {shown(storage)}: {masked(first_line, storage)}") from None


def stored_trials(study_name: str, storage_url: str) -> list[FrozenTrial]:
    """The study's trials, read without creating anything (a command refused on them leaves behind no storage file,
    no folder for it and no study): none while its file or the study does not exist."""
    if (file := storage_file(storage_url)) and not file.exists():
        return []
    storage = connect(storage_url)
    try:
        return storage.get_all_trials(storage.get_study_id_from_name(study_name), deepcopy=False)
    except KeyError:  # no study of that name
        return []
    finally:
        if isinstance(storage, RDBStorage):
            storage.engine.dispose()  # open_study connects on its own: no connections held twice


def storage_file(storage: str) -> Path | None:
    """The file of a journal or SQLite storage; None for a server's database, or for a URL `connect` refuses."""
    if is_journal(storage):
        return Path(storage)
    try:
        database = sqlalchemy.engine.make_url(storage).database
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return None
    return Path(database) if storage.startswith("sqlite") and database else None


def not_a_journal(path: Path) -> str | None:
    """Why the file is no journal to append to, or None when it is new, empty or begins as Optuna's records do:
    Optuna takes a last line that is no record for one still being written, and would append to any one-line file."""
    if not path.exists():
        return None
    if not path.is_file():  # a device fails Optuna's first fsync, a named pipe blocks its opening for good
        return f"it {why_not_a_file(path)}; give a journal file's path, or a new one"
    with path.open("rb") as file:
        first = file.readline()
    record = b'{"op_code"'  # how Optuna begins every record
    if first.startswith(record) or record.startswith(first):  # a whole record, or the first being written, or none
        return None
    if first.startswith(b"SQLite format 3\0"):
        return f"it is an SQLite file, left as it is; give sqlite:///{path}"
    return "it is no journal Optuna wrote, and is left as it is; give a new path"


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
    """A driver's error message with the storage URL's password masked where it stands apart from letters and
    digits: a short one would mask pieces of words ("p" of "psycopg", "port")."""
    try:
        password = sqlalchemy.engine.make_url(storage).password
    except (sqlalchemy.exc.ArgumentError, ValueError):
        password = None
    return re.sub(rf"(?<!\w){re.escape(str(password))}(?!\w)", "***", message) if password else message


def heartbeat_storage(storage_url: str, attempts: int = 6) -> RDBStorage:
    try:
        with warnings.catch_warnings(action="ignore", category=optuna.exceptions.ExperimentalWarning):
            storage = RDBStorage(storage_url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                                 heartbeat_stale_trial_callback=retry_once(),
                                 engine_kwargs=engine_kwargs(storage_url))
    except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError) as error:
        # Workers started together on an empty database race to create the same tables and types; a loser finds
        # them made when it tries again. Another OperationalError (a refused login, an unreachable server) no retry
        # mends. Backing off, doubled each time, spreads 32 workers' retries out.
        message = str(error)
        lost_race = "locked" in message or "already exists" in message  # SQLite: "database is locked"
        if attempts == 1 or (isinstance(error, sqlalchemy.exc.OperationalError) and not lost_race):
            raise
    else:
        if storage.engine.name == "sqlite":  # a file: `connect` refuses a database in memory
            sqlalchemy.event.listen(storage.engine, "connect", write_ahead_log)
            storage.engine.dispose()  # the connections that created the tables reopen with it
        return storage
    # The storage that lost keeps its pool's connections open until it is collected, which its cycles put off:
    # collected now, so a worker holds no more connections than its own pool's two (docs/scaling.md). Here, not in
    # the except block: the error's traceback holds the half-built storage until that block ends.
    gc.collect()
    time.sleep(random.uniform(0.5, 1.5) * 2 ** (6 - attempts))
    return heartbeat_storage(storage_url, attempts - 1)


def engine_kwargs(storage_url: str) -> dict[str, Any]:
    """At most two connections a worker (its main and heartbeat threads), not SQLAlchemy's default 15: a server's
    are few (docs/scaling.md). pre_ping replaces a pooled connection the server closed (a restart, an idle timeout)
    rather than failing the call that gets it (Optuna turns it on for MySQL alone)."""
    if storage_url.startswith("sqlite"):
        return {}
    return {"pool_size": 2, "max_overflow": 0, "pool_timeout": 60, "pool_pre_ping": True}


class HeartbeatJournal(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with the heartbeats Optuna (5.1) gives only RDBStorage, so that fail_stale_trials
    requeues a dead worker's trials here too (docs/scaling.md). A beat is the `heartbeat` system attribute, a time on
    the clock all the machine's workers share. BaseHeartbeat is private: tests/test_storage.py fails if it changes."""

    def __init__(self, path: str) -> None:
        super().__init__(JournalFileBackend(path, KernelLock(path)))

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, "heartbeat", time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        # A trial that never beat counts from its start: a worker that died between asking and its first beat would
        # leave it RUNNING for good. A beat before the start is not this run's: a retry inherits its dead original's
        # system attributes (RetryHeartbeatStaleTrialCallback), and would be failed as stale the moment it started.
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [self.get_trial_id_from_study_id_trial_number(study_id, t.number) for t in running
                if now - max(t.system_attrs.get("heartbeat", 0.0), t.datetime_start.timestamp()) > GRACE_SECONDS]

    def get_heartbeat_interval(self) -> int:
        return HEARTBEAT_SECONDS

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None]:
        return retry_once()


class KernelLock(JournalFileOpenLock):
    """The journal file's write lock as the kernel's `flock` on a file beside it: the kernel frees a dead writer's
    lock at once and wakes a waiter, where Optuna's lock file stalls the others for 30 s and its waiters poll
    (docs/scaling.md). A plain Optuna process writing to the same file would not wait for it."""

    def __init__(self, journal: str) -> None:
        # Optuna's lock class only for its interface (the base, BaseJournalFileLock, is private): none of its state.
        self.journal, self.path, self.held = journal, f"{journal}.flock", -1

    def acquire(self) -> bool:
        held = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(held, fcntl.LOCK_EX)
        self.held = held
        cut_torn_record(self.journal)
        return True

    def release(self) -> None:
        held, self.held = self.held, -1
        os.close(held)  # closing the file releases its lock


def cut_torn_record(journal: str) -> None:
    """Cut a last record a writer left unfinished as it died (a full disk, a power cut): Optuna reads past it as one
    still being written, but the next record appended would join it in a line no reader parses, and the study could
    never be read again. Called under the writers' lock, so no writer of ours is mid-write."""
    if not os.path.exists(journal):
        return  # Optuna creates it before its first write
    with open(journal, "rb+") as file:
        size = file.seek(0, os.SEEK_END)
        file.seek(max(size - 1, 0))
        if file.read(1) in (b"", b"\n"):  # empty, or its last record whole
            return
        file.seek(0)
        kept = file.read().rfind(b"\n") + 1
        file.truncate(kept)
        log.warning(f"The study journal {journal} ended in an unfinished record ({size - kept} bytes, left by a writer "
                    "that died as it wrote); cut, as Optuna had read past it.")


def write_ahead_log(connection: sqlite3.Connection, _: object) -> None:
    """Put an SQLite study file in write-ahead-log mode, synced at checkpoints: a trial commits each value on its own,
    and the default rollback journal waits for the disk twice a commit (docs/fused-trials.md). A killed worker loses
    nothing; a power cut may lose the last commits, but never corrupts the file."""
    if connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        # Refused while another process holds the file open in a transaction: the rollback journal stays, only slower.
        with contextlib.suppress(sqlite3.OperationalError):
            connection.execute("PRAGMA journal_mode=WAL")  # kept in the file, so only its first connection switches
    connection.execute("PRAGMA synchronous=NORMAL")  # per connection


def open_study(
    study_name: str, storage_url: str, pruner: str, shortest_epochs: int, seed: int, first: dict | None = None,
    slow_starters: bool = False,
) -> optuna.Study:
    """Create the study, or load it if it exists, so that rerunning the same command continues it; its trial 0
    draws `first` (see TrialSeededTPE); the pruner is `make_pruner`'s."""
    settings = dict(study_name=study_name, storage=connect(storage_url), sampler=TrialSeededTPE(seed, first),
                    pruner=make_pruner(pruner, shortest_epochs, slow_starters))
    try:
        return optuna.create_study(direction="maximize", **settings)
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(**settings)


def fit_defaults(cli: MLPCLI, space: SearchSpace) -> dict[str, Any] | None:
    """The searched hyperparameters fit.py would train with the same flags, as the study's first trial (fit.py's
    defaults were chosen on the validation split: a known-good start); None when one lies outside its range."""
    start = {name: cli.config[FIT_FLAGS[name]] for name in space.searched()}
    return start if all(space.holds(name, value) for name, value in start.items()) else None


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage the study was opened with: private to Optuna's Study (`_storage`), but its optimize beats hearts
    through it, and so must a worker running trials by ask and tell (tests/test_private_apis.py fails if it moves)."""
    return study._storage


class Heartbeats:
    """While the with block runs, a thread beats every HEARTBEAT_SECONDS for each trial of `trials` (until the study
    is told its end), as Optuna's optimize does for its one. A failed beat is logged and retried after RETRY_SECONDS:
    a thread that died of it would get the trials retried elsewhere while still trained here."""

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
        """Beat for `trials` now and from then on: a trial asked while others train, whose worker died before the
        thread's next beat, would stay running for good where Optuna counts only trials that beat (RDB storages)."""
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
    """The trial's place in the order the study created its trials; a retry takes over its original's."""
    with warnings.catch_warnings(action="ignore", category=optuna.exceptions.ExperimentalWarning):
        retried = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    return trial.number if retried is None else retried


def surplus_trials(study: optuna.Study, n_trials: int) -> set[int]:
    """The numbers of the running or queued trials that a study of n_trials has no place for: two workers can check
    the count at the same moment, and one asking between fail_stale_trials failing a dead worker's trials and
    queueing their retries takes a place a retry is owed. Finished trials keep their places, the rest go by `place`."""
    live = study.get_trials(deepcopy=False, states=LIVE)
    unfinished = sorted((place(t), t.number) for t in live if t.state not in FINISHED)
    places_left = max(0, n_trials - sum(t.state in FINISHED for t in live))
    return {number for _, number in unfinished[places_left:]}


def is_surplus(trial: optuna.Trial, n_trials: int) -> bool:
    """Whether the study has no place for this trial (surplus_trials): checked as it starts and at each epoch's end."""
    return trial.number in surplus_trials(trial.study, n_trials)


def mark_surplus(trial: optuna.Trial) -> None:
    """Record that the study had no place for the trial: it is failed, but counts as no failure (mlp.progress)."""
    record(trial, surplus=True)


def gives_way(trial: optuna.Trial, epochs_trained: int) -> None:
    """Note a running trial found surplus at an epoch's end: the epochs it trained count in the report's cost,
    though it reports no value for the last."""
    record(trial, epochs_trained=epochs_trained)
    log.info(f"Trial {trial.number} stops: a retry of an older trial took its place in the study.")


def retry_once() -> RetryHeartbeatStaleTrialCallback:
    """What queues a failed trial's parameters again, once, as a retry that takes over its place (`place`)."""
    with warnings.catch_warnings(action="ignore", category=optuna.exceptions.ExperimentalWarning):
        return RetryHeartbeatStaleTrialCallback(max_retry=1)


def retry_interrupted(study: optuna.Study, numbers: list[int]) -> None:
    """Queue the trials `numbers`, failed by Ctrl-C, to run again once, as a stale trial's are (so fit's own
    configuration, trial 0, is not lost to a Ctrl-C in its first minute)."""
    trials = study.get_trials(deepcopy=False)
    for number in numbers:
        interrupted = copy.deepcopy(trials[number])  # its retry is no interrupted trial
        interrupted.set_user_attr("interrupted", False)
        retry_once()(study, interrupted)


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the trials of workers whose heartbeat went stale; each is enqueued again once."""
    with warnings.catch_warnings(action="ignore", category=optuna.exceptions.ExperimentalWarning):
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


def run_trials(study: optuna.Study, objective: TrialRunner, n_trials: int, budget: Budget,
               progress: Callable[[optuna.Study], None] = lambda study: None) -> None:
    """Run trials until the study holds n_trials finished ones and none runs anywhere, or until the time left in the
    `budget` is what the final model needs; `progress` sees the study after each trial and while waiting. Any
    number of workers may do this on one study at once: with nothing to start, a worker waits for the others'
    trials, so that a dead worker's trial is failed once its heartbeat is stale and rerun here."""

    def may_refill() -> bool:  # as one of several trials trained at once ends (mlp.trials)
        fail_stale_trials(study)  # in a run, where Ctrl-C waits for the batch's end (mlp.cli.InterruptAtBatchEnd)
        progress(study)
        return budget.trials_may_start(best_first_if_bounded(study, budget))

    waiting_logged = False
    with CtrlC() as ctrl_c:
        while True:
            ctrl_c.raise_if_requested()
            with ctrl_c.held():  # between a stale trial's failure and its retry's queueing, it would never be retried
                fail_stale_trials(study)
            # One read of the trials serves the pass: with 32 workers reads add up.
            trials = study.get_trials(deepcopy=False)
            if not budget.trials_may_start(ranked(trials)):
                return
            progress(study)
            if may_start_trial(study, n_trials, trials):
                objective.start_trials(study, may_refill)
                if objective.interrupted:
                    raise KeyboardInterrupt
            elif running := sum(t.state == TrialState.RUNNING for t in trials):
                if not waiting_logged:
                    log.info(f"No trial left to start; waiting for {running} running elsewhere.")
                    waiting_logged = True
                time.sleep(max(0.0, min(HEARTBEAT_SECONDS, budget.left())))
            else:
                return


class CtrlC:
    """While the with block runs, Ctrl-C is recorded as well as raised, and `raise_if_requested` raises it again: a
    KeyboardInterrupt raised in a weakref callback or a __del__ (the gc.collect after a stack runs them) is dropped
    as "Exception ignored". Within `held()` it is only recorded, and raised as that block ends. Within a run
    `mlp.cli.InterruptAtBatchEnd` takes Ctrl-C over, and hands it back; one handed on by the handler of a run that an
    exception stopped is only recorded."""

    def __enter__(self) -> Self:
        self.requested, self.holding, self.previous = False, False, None
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self.previous = signal.signal(signal.SIGINT, self.request)
        return self

    def request(self, signum: int, frame: object) -> None:
        self.requested = True
        # A run an exception stopped leaves its handler installed (Lightning puts back the one of the run's start),
        # and that one hands on each later Ctrl-C: the command is already stopping, and a second KeyboardInterrupt
        # would cut short the failing of its trials, or be dropped noisily from the finalisers its stack's end runs.
        if not self.holding and signal.getsignal(signal.SIGINT) == self.request:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A block that Ctrl-C must not cut in two."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        self.raise_if_requested()

    def raise_if_requested(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def best_first(study: optuna.Study) -> list[FrozenTrial]:
    return ranked(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def best_first_if_bounded(study: optuna.Study, budget: Budget) -> list[FrozenTrial]:
    """`best_first` for `Budget`'s methods; no storage read without --timeout, where each answers as for none."""
    return best_first(study) if budget.bounded else []


def ranked(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The complete ones of `trials`, best value first (the earlier of equal ones)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return sorted(complete, key=lambda t: (-t.value, t.number))


def finished_numbers(study: optuna.Study) -> set[int]:
    return {t.number for t in study.get_trials(deepcopy=False, states=FINISHED)}


def writes_report(study: optuna.Study, ran: list[int], finished_before: set[int]) -> bool:
    """Whether this worker reports: the one that finished the study's last trial (which every worker agrees on),
    once none is running. A worker that ran none (all its trials surplus, or the command rerun on a finished study)
    reports only if that trial had finished before it started (`finished_before`): then no other worker did."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.RUNNING for t in trials):
        return False
    finished = [t for t in trials if t.state in FINISHED]
    if not finished:
        return True  # no trial to test: the report only counts the failed ones
    last = max(finished, key=lambda t: (t.datetime_complete, t.number)).number
    return last in ran or (not ran and last in finished_before)
