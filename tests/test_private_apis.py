"""Each private API of Lightning, torch or Optuna the project relies on, used in one place where no public one
serves: each test fails on the upgrade that breaks what the project assumes of it."""

import optuna

from mlp.study import storage_of


def test_storage_of_is_the_storage_the_study_was_opened_with(tmp_path):
    storage = optuna.storages.InMemoryStorage()
    assert storage_of(optuna.create_study(storage=storage)) is storage
    # An RDB study's storage records heartbeats, as mlp.study.Heartbeats needs.
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert isinstance(storage_of(study), optuna.storages.BaseStorage) and callable(storage_of(study).record_heartbeat)
