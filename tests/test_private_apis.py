"""Each private API of Lightning, torch or Optuna the project relies on, used in one place where no public one
serves: each test fails on the upgrade that breaks what the project assumes of it."""

import inspect

import lightning as L
import optuna
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from mlp.module import MLPClassifier
from mlp.study import storage_of
from tests.test_fused import loaders


def test_storage_of_is_the_storage_the_study_was_opened_with(tmp_path):
    storage = optuna.storages.InMemoryStorage()
    assert storage_of(optuna.create_study(storage=storage)) is storage
    # An RDB study's storage records heartbeats, as mlp.study.Heartbeats needs.
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert isinstance(storage_of(study), optuna.storages.BaseStorage) and callable(storage_of(study).record_heartbeat)


@pytest.mark.parametrize("validates", [True, False])
def test_every_save_of_a_model_checkpoint_goes_through_its_save_checkpoint(tmp_path, validates):
    """mlp.fused.ModelInStackCheckpoint overrides ModelCheckpoint._save_checkpoint to write one model of a stack,
    its best by val/acc or, without validation (a refit), its latest; an upgrade that saved any other way would
    write whole stacks, or nothing, under the model's name."""
    assert list(inspect.signature(ModelCheckpoint._save_checkpoint).parameters) == ["self", "trainer", "filepath"]
    saved = []

    class Records(ModelCheckpoint):
        def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
            saved.append(filepath)

    checkpoint = Records(dirpath=tmp_path, monitor="val/acc" if validates else None, mode="max",
                         save_on_train_epoch_end=not validates)
    train, val = loaders()
    L.Trainer(
        max_epochs=2, logger=False, callbacks=[checkpoint], enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=1.0 if validates else 0,
    ).fit(MLPClassifier(depth=0), train, val)
    assert saved and checkpoint.best_model_path in saved and list(tmp_path.iterdir()) == []
    assert validates or len(saved) == 2  # without validation, at each epoch's end
