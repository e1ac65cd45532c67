"""Several tune.py workers on one study: distinct draws, an exact trial count, a killed worker's trials rerun,
one report, with trials trained one at a time or stacked. The workers run against a real PostgreSQL server
started on loopback for the test."""

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from mlp.budget import Budget
from mlp.errors import UserError
from mlp.postgres import Unavailable, free_port, throwaway_postgres
from mlp.search import FIT_FLAGS, SearchSpace, TrialSeededTPE, suggest
from mlp.study import (
    FINISHED,
    connect,
    finished_numbers,
    is_surplus,
    open_study,
    run_trials,
    surplus_trials,
    writes_report,
)
from tests.test_reliability import ROOT, created_trials, script_command
from tests.test_sweeps import FAST_TRIAL, tune_args

sys.path.insert(0, str(ROOT / "scripts"))
import tune  # noqa: E402

# One torch thread per worker, so that the workers do not fight over the cores; heartbeats every second.
WORKER_PATCH = (
    "import torch; torch.set_num_threads(1)\n"
    "import mlp.study; mlp.study.HEARTBEAT_SECONDS = 1; mlp.study.GRACE_SECONDS = 2"
)


# -- the sampler -------------------------------------------------------------------------------------------


def draws(study: optuna.Study) -> dict:
    trial = study.ask()
    return {"number": trial.number, **suggest(trial, SearchSpace())}


def test_workers_with_the_same_seed_draw_distinct_reproducible_parameters():
    storage = optuna.storages.InMemoryStorage()
    workers = [optuna.create_study(study_name="s", storage=storage, sampler=TrialSeededTPE(seed=0))]
    workers.append(optuna.load_study(study_name="s", storage=storage, sampler=TrialSeededTPE(seed=0)))
    shared = [draws(workers[number % 2]) for number in range(4)]
    assert [d["number"] for d in shared] == [0, 1, 2, 3]
    params = [tuple(sorted((k, v) for k, v in d.items() if k != "number")) for d in shared]
    assert len(set(params)) == 4

    alone = optuna.create_study(sampler=TrialSeededTPE(seed=0))
    assert [draws(alone) for _ in range(4)] == shared  # a trial's draw depends on (seed, number) only


CONTINUOUS = ("model.lr", "model.weight_decay", "model.dropout")


def test_studies_with_different_seeds_share_no_draw():
    """Seeding trial n with seed + n made seed 1's trial k draw what seed 0's trial k + 1 drew."""
    drawn = []
    for seed in (0, 1):
        study = optuna.create_study(sampler=TrialSeededTPE(seed=seed))
        # Continuous values: two independent streams never repeat one (discrete ones may coincide by chance).
        drawn.append({draw[key] for draw in (draws(study) for _ in range(8)) for key in CONTINUOUS})
    assert not drawn[0] & drawn[1]


def test_unreachable_storage_is_one_clear_line(synthetic_dir, tmp_path):
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    args = [f"--storage=postgresql+psycopg://user@127.0.0.1:{port}/db", f"--data.data_dir={synthetic_dir}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"]
    pytest.importorskip("psycopg", reason="the PostgreSQL driver: pip install 'psycopg[binary]'")
    with pytest.raises(UserError, match="cannot open the study storage .*Connection refused") as error:
        tune.main(args)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("url", ["://no-scheme", "nosuchdatabase://host/db", "postgresql+nosuchdriver://user@host/db",
                                 "postgresql://user:pw@host:noport/db"])
def test_bad_storage_url_is_one_clear_line(url):
    with pytest.raises(UserError, match="cannot open the study storage") as error:
        connect(url)
    assert "\n" not in str(error.value)


def test_a_programming_error_while_connecting_is_not_called_bad_input(monkeypatch, tmp_path):
    def bug(*args, **kwargs):
        raise TypeError("a bug in our code")

    monkeypatch.setattr("mlp.study.heartbeat_storage", bug)
    with pytest.raises(TypeError, match="a bug in our code"):
        connect(f"sqlite:///{tmp_path / 'study.db'}")


def test_a_worker_that_lost_the_race_to_create_the_tables_holds_no_more_connections_than_its_pool(
    postgres_url, monkeypatch
):
    """Workers started together on an empty database race to create the tables; a loser tries again. The storage
    that lost held its pool's connection open until the collector found it, which could take the whole run: the load
    test saw 4 at once in a worker whose pool holds 2."""
    import psycopg
    import sqlalchemy

    create_all, lost = sqlalchemy.MetaData.create_all, []

    def lose_the_first_race(metadata: sqlalchemy.MetaData, bind: sqlalchemy.Engine, *args: Any, **kwargs: Any) -> None:
        if not lost:  # as a loser does: its pool keeps the connection it tried with
            lost.append(True)
            with bind.connect():
                raise sqlalchemy.exc.ProgrammingError("CREATE TABLE studies", {}, Exception("already exists"))
        create_all(metadata, bind, *args, **kwargs)

    monkeypatch.setattr(sqlalchemy.MetaData, "create_all", lose_the_first_race)
    monkeypatch.setattr("mlp.study.random.uniform", lambda low, high: 0.0)  # no back-off wait
    server = postgres_url.replace("postgresql+psycopg", "postgresql").replace("/tune", "/postgres")
    storage = connect(postgres_url)
    assert lost and storage.get_all_studies() == []  # the second try made the tables
    with psycopg.connect(server) as admin:
        held = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = 'tune'").fetchone()[0]
    assert 1 <= held <= 2


def test_a_sqlite_study_file_commits_through_the_write_ahead_log(tmp_path):
    path = tmp_path / "study.db"
    storage = connect(f"sqlite:///{path}")
    study = optuna.create_study(storage=storage, direction="maximize")
    study.ask().report(0.5, 1)
    with storage.engine.connect() as connection:  # a connection of the storage's own pool
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL; the default is FULL (2)
    with sqlite3.connect(path) as reader:  # the mode is kept in the file, for every process that opens it
        assert reader.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reloaded = optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{path}")
    assert reloaded.trials[0].intermediate_values == {1: 0.5}


def test_a_sqlite_file_another_process_reads_in_a_transaction_keeps_working_in_rollback_journal_mode(tmp_path):
    path = tmp_path / "study.db"
    optuna.create_study(study_name="s", storage=f"sqlite:///{path}")  # Optuna's own storage: rollback journal
    reader = sqlite3.connect(path)
    reader.execute("BEGIN")
    reader.execute("SELECT * FROM studies").fetchall()  # holds a shared lock, so the mode cannot change
    storage = connect(f"sqlite:///{path}")
    assert [s.study_name for s in storage.get_all_studies()] == ["s"]  # after sqlite's 5 s busy timeout
    reader.rollback()
    optuna.load_study(study_name="s", storage=storage).ask().report(0.5, 1)
    assert reader.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    reader.close()


def test_fit_defaults_are_trial_0_whichever_worker_asks_first(tmp_path):
    url, first = f"sqlite:///{tmp_path / 'study.db'}", {"lr": 0.1, "epochs": 20, "depth": 2, "width": 512,
                                                         "weight_decay": 5e-4, "dropout": 0.0, "label_smoothing": 0.0}
    creator = open_study("s", url, "none", SearchSpace().epochs[0], seed=0, first=first)
    joiner = open_study("s", url, "none", SearchSpace().epochs[0], seed=0, first=first)
    # The worker that joined asks before the one that created the study: the first trial is still fit's.
    assert draws(joiner) == {"number": 0, **{FIT_FLAGS[name]: value for name, value in first.items()}}
    second = draws(creator)
    assert second["number"] == 1 and second["model.lr"] != first["lr"]


# -- the stop rule -------------------------------------------------------------------------------------------


class Quadratic:
    """A stand-in for mlp.trials.Trials: instant trials."""

    interrupted = False

    def __call__(self, trial: optuna.Trial) -> float:
        return trial.suggest_float("x", -1, 1) ** 2

    def start_trials(self, study: optuna.Study, may_refill: Callable[[], bool]) -> None:
        study.optimize(self, n_trials=1)


class AsksMayRefill(Quadratic):
    """Asks may_refill as a fused worker does when a trial leaves its stack, before and after the deadline."""

    answers: list[bool]

    def start_trials(self, study: optuna.Study, may_refill: Callable[[], bool]) -> None:
        self.answers = [may_refill()]
        time.sleep(5.5)  # past the deadline, with room for a loaded machine's first answer to come before it
        self.answers.append(may_refill())
        study.optimize(self, n_trials=1)


def test_a_fused_worker_may_refill_its_stack_until_the_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr("mlp.budget.FINISH_SECONDS", 0)  # no final model to keep time for
    study = open_study("s", f"sqlite:///{tmp_path / 'study.db'}", "none", SearchSpace().epochs[0], seed=0)
    objective = AsksMayRefill()
    run_trials(study, objective, n_trials=1, budget=Budget(time.time() + 5))
    assert objective.answers == [True, False]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_idle_worker_waits_for_a_dead_workers_trial_and_reruns_it(tmp_path, monkeypatch):
    monkeypatch.setattr("mlp.study.HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr("mlp.study.GRACE_SECONDS", 2)
    study = open_study("s", f"sqlite:///{tmp_path / 'study.db'}", "none", SearchSpace().epochs[0], seed=0)
    dead = study.ask()  # a worker that started a trial, beat once and died
    dead.suggest_float("x", -1, 1)
    study._storage.record_heartbeat(dead._trial_id)  # what Study.optimize does while a trial runs

    run_trials(study, Quadratic(), n_trials=1, budget=Budget(time.time() + 60))

    trials = study.trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params == trials[0].params
    assert writes_report(study, ran=[1], finished_before=set())
    assert not writes_report(study, ran=[0], finished_before=set())


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_exactly_one_reporter_when_workers_outnumber_the_remaining_trials(tmp_path):
    study = open_study("s", f"sqlite:///{tmp_path / 'study.db'}", "none", SearchSpace().epochs[0], seed=0)
    # Three workers started together on a study that needs two more trials: the third worker's trial is
    # surplus, so it trains nothing and waits for the other two.
    first, second, surplus = study.ask(), study.ask(), study.ask()
    study.tell(surplus, state=TrialState.FAIL)
    study.tell(first, 0.5)
    study.tell(second, 0.7)
    started_with = set()  # none of the three saw a finished trial when it started
    reporters = [writes_report(study, ran, started_with) for ran in ([first.number], [second.number], [])]
    assert reporters == [False, True, False]
    # The same command run again on the finished study: this worker is alone, and reports.
    assert writes_report(study, ran=[], finished_before=finished_numbers(study))


def fail_as_stale(study: optuna.Study, space: SearchSpace = SearchSpace()) -> optuna.trial.FrozenTrial:
    """A trial with parameters whose worker died, failed by fail_stale_trials; its retry not yet queued."""
    trial = study.ask()
    suggest(trial, space)
    study.tell(trial, state=TrialState.FAIL)
    return study.trials[trial.number]


def queue_retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> int:
    """Queue the retry of a killed trial as fail_stale_trials does; its number."""
    RetryHeartbeatStaleTrialCallback(max_retry=1)(study, trial)
    return study.trials[-1].number


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_retry_keeps_the_place_of_the_trial_it_retries_against_a_fresh_trial_started_before_it():
    """fail_stale_trials fails all of a dead worker's trials, then queues their retries; a worker asking in
    between starts a fresh trial in a place a retry is owed. The fresh trial is the surplus one, whichever
    the storage numbered first, so that every killed configuration runs again."""
    study = optuna.create_study(direction="maximize")
    study.tell(study.ask(), 0.5)
    first, second = fail_as_stale(study), fail_as_stale(study)  # both of the dead worker's trials
    first_retry = queue_retry(study, first)
    assert study.ask().number == first_retry  # started by a survivor
    fresh = study.ask()  # another survivor finds 2 of 3 places held: 1 finished, 1 running
    assert not is_surplus(fresh, n_trials=3)
    second_retry = queue_retry(study, second)
    assert surplus_trials(study, n_trials=3) == {fresh.number}  # the fresh trial stops at its epoch's end
    assert not is_surplus(study.ask(), n_trials=3)  # and the retry, asked next, starts
    assert first_retry < fresh.number < second_retry


def test_places_go_to_finished_trials_first_then_to_the_others_in_order_of_creation():
    study = optuna.create_study(direction="maximize")
    early, late = study.ask(), study.ask()  # two workers took the last place at the same moment
    assert surplus_trials(study, n_trials=1) == {late.number}
    study.tell(late, 0.5)  # a finished trial keeps its place: nothing running can take it back
    assert surplus_trials(study, n_trials=1) == {early.number}
    assert surplus_trials(study, n_trials=2) == set()


@pytest.mark.parametrize("fuse", [1, 2])
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_trial_whose_place_a_retry_is_owed_stops_at_its_epochs_end_and_the_retry_runs(
    fuse, synthetic_dir, tmp_path, monkeypatch
):
    """The race above, in a worker: its fresh trial is told at the end of its first epoch that the study's one
    place belongs to a retry queued meanwhile, stops as surplus, and the worker runs the retry (with --fuse, in
    the same Trainer)."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="test", storage=url, direction="maximize")
    study.enqueue_trial({"lr": 0.1, **FAST_TRIAL})
    dead = fail_as_stale(study, SearchSpace(lr=(1e-7, 1e4), epochs=(1, 2), depth=(1, 1), width=(8, 16)))
    checks = []

    def retry_queued_after_the_first_check(study: optuna.Study, n_trials: int) -> set[int]:
        checks.append(n_trials)
        if len(checks) == 2:  # the fresh trial's first epoch end; its start was the first check
            queue_retry(study, dead)
        return surplus_trials(study, n_trials)

    monkeypatch.setattr("mlp.study.surplus_trials", retry_queued_after_the_first_check)
    monkeypatch.setattr("mlp.trials.surplus_trials", retry_queued_after_the_first_check)
    tune.main([*tune_args(synthetic_dir, tmp_path, n_trials=1), "--pruner=none", f"--fuse={fuse}"])

    trials = optuna.load_study(study_name="test", storage=url).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    fresh, rerun = trials[1], trials[2]
    assert fresh.user_attrs["surplus"] and fresh.params and not fresh.intermediate_values
    assert fresh.user_attrs["epochs_trained"] == 1  # the report's count of the epochs the study cost
    assert rerun.system_attrs["failed_trial"] == dead.number and rerun.params == dead.params
    assert len(checks) > 2


# -- a real PostgreSQL server --------------------------------------------------------------------------------


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server on 127.0.0.1 with an empty database; its URL for SQLAlchemy."""
    try:
        with throwaway_postgres() as url:
            yield url
    except Unavailable as why:
        pytest.skip(str(why))


def test_a_server_whose_free_port_another_process_took_starts_on_another(monkeypatch):
    """The suite's tests run two at a time (pyproject's addopts): a port found free may be bound by the time the
    server binds it."""
    import mlp.postgres

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1]]
        monkeypatch.setattr(mlp.postgres, "free_port", lambda: ports.pop() if ports else free_port())
        try:
            with throwaway_postgres() as url:
                assert f":{taken.getsockname()[1]}/" not in url
                optuna.create_study(study_name="served", storage=url)
                assert optuna.get_all_study_names(url) == ["served"]
        except Unavailable as why:
            pytest.skip(str(why))
    assert not ports, "the taken port was tried first"


# -- workers -----------------------------------------------------------------------------------------------


def worker(args: list[str], log: Path) -> subprocess.Popen:
    """A tune.py process writing its output to `log` (pipes could fill up and block it)."""
    with log.open("w") as out:
        return subprocess.Popen(
            script_command(str(ROOT / "scripts" / "tune.py"), args, WORKER_PATCH),
            stdout=out, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        )


def wait_for(condition: Callable[[], Any], what: str, processes: list[subprocess.Popen], timeout: float = 300) -> Any:
    """The first value of condition() that is not None, polled while every process is alive."""
    deadline = time.monotonic() + timeout
    while (value := condition()) is None:
        dead = [p for p in processes if p.poll() is not None]
        assert not dead, f"a worker ended (exit code {dead[0].returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def trials_of(url: str) -> list[optuna.trial.FrozenTrial]:
    return created_trials(url, "scale")


def pid_of(trial: optuna.trial.FrozenTrial) -> int | None:
    worker = trial.user_attrs.get("worker")
    return int(worker.rsplit(":", 1)[1]) if worker else None


def test_three_workers_on_postgres_share_one_study_and_recover_a_killed_one(postgres_url, synthetic_dir, tmp_path):
    """Each worker trains its trials two at a time (--fuse 2), and the killed worker takes both with it. One trial
    at a time goes through the same ask, heartbeat and retry code (mlp.trials), which the SIGKILL test of
    test_reliability runs on SQLite."""
    fuse = 2
    n_trials = 6
    args = [
        f"--n-trials={n_trials}", f"--storage={postgres_url}", "--study-name=scale", "--pruner=none",
        "--lr", "0.05", "0.2", "--epochs", "15", "15", "--depth", "1", "1", "--width", "8", "32",
        f"--data.data_dir={synthetic_dir}", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--data.val_size=100", "--data.batch_size=32", f"--fuse={fuse}",
    ]
    # All three start at once on an empty database, as a user starting N workers would.
    survivors = [worker(args, tmp_path / f"worker{i}.log") for i in range(2)]
    victim = worker(args, tmp_path / "victim.log")

    def victims_trials() -> list[optuna.trial.FrozenTrial] | None:
        """The victim's running trials, once each has reported an epoch."""
        running = [t for t in trials_of(postgres_url) if t.state == TrialState.RUNNING and pid_of(t) == victim.pid]
        return running if running and all(t.intermediate_values for t in running) else None

    killed = wait_for(victims_trials, "the victim's trials reported an epoch", [*survivors, victim])
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)

    for process in survivors:
        process.wait(timeout=300)
    outputs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert [p.returncode for p in survivors] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)

    trials = trials_of(postgres_url)
    assert len({t.number for t in trials}) == len(trials)
    assert sum(t.state in FINISHED for t in trials) == n_trials
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # Each killed trial failed once its heartbeat was stale and was enqueued again, once, with the same
    # parameters, and the retry ran: a fresh trial that a survivor started in a killed one's place, between
    # Optuna failing the stale trials and enqueueing their retries, gave way to the retry (2 runs in 12 with
    # --fuse 2 lost a retry before that rule).
    assert len(killed) == fuse, "the victim trained its trials together"
    for trial in killed:
        assert trials[trial.number].state == TrialState.FAIL
        (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == trial.number]
        assert retry.params == trial.params
        assert retry.state in FINISHED
    # Any other failure is surplus: a trial started at the same moment as the last one, stopped before training,
    # or a fresh trial that gave way to a retry, stopped at an epoch's end.
    others = [t for t in trials if t.state == TrialState.FAIL and t.number not in {k.number for k in killed}]
    assert all(t.user_attrs.get("surplus") and "failed_trial" not in t.system_attrs for t in others)
    # The survivors both trained, and never drew the same parameters (retries aside).
    assert {p.pid for p in survivors} <= {pid_of(t) for t in trials if t.state in FINISHED}
    drawn = [tuple(sorted(t.params.items())) for t in trials if t.params and "failed_trial" not in t.system_attrs]
    assert len(set(drawn)) == len(drawn)
    # Exactly one worker wrote the report; the other said so.
    reporters = [o for o in outputs if '"best_trial"' in o]
    assert len(reporters) == 1
    assert sum("another worker finished the study's last trial" in o for o in outputs) == 1
    assert (tmp_path / "logs" / "tune" / "scale" / "report.json").is_file()
