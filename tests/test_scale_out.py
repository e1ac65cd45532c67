"""Several tune.py workers on one study: distinct draws, an exact trial count, a killed worker's trial rerun,
one report. The workers run against a real PostgreSQL server started on loopback for the test."""

import socket
import sys

import optuna
import pytest
from optuna.trial import TrialState

from mlp.errors import UserError
from mlp.tune import SearchSpace, TrialSeededTPE, open_study, run_trials, suggest, writes_report
from tests.test_reliability import ROOT, script_command

sys.path.insert(0, str(ROOT / "scripts"))
import tune  # noqa: E402


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
    other_seed = optuna.create_study(sampler=TrialSeededTPE(seed=1))
    assert draws(other_seed) != shared[0]


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


# -- the stop rule -------------------------------------------------------------------------------------------


class Quadratic:
    """A stand-in for mlp.tune.Objective: instant trials."""

    interrupted = False

    def __call__(self, trial: optuna.Trial) -> float:
        return trial.suggest_float("x", -1, 1) ** 2


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_idle_worker_waits_for_a_dead_workers_trial_and_reruns_it(tmp_path, monkeypatch):
    monkeypatch.setattr("mlp.tune.HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr("mlp.tune.GRACE_SECONDS", 2)
    study, _ = open_study("s", f"sqlite:///{tmp_path / 'study.db'}", "none", SearchSpace(), seed=0)
    dead = study.ask()  # a worker that started a trial, beat once and died
    dead.suggest_float("x", -1, 1)
    study._storage.record_heartbeat(dead._trial_id)  # what Study.optimize does while a trial runs

    run_trials(study, Quadratic(), n_trials=1, timeout=60)

    trials = study.trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params == trials[0].params
    assert writes_report(study, ran=[1]) and not writes_report(study, ran=[0])
