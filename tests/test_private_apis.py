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


def test_max_epochs_raised_on_the_fit_loop_mid_fit_trains_the_added_epochs():
    """mlp.fused.FusedClassifier.add lengthens a running fit, for a model that joins its stack, by raising
    trainer.fit_loop.max_epochs at an epoch's end; Lightning has no public way to. An upgrade that read the limit
    once, at the fit's start, would end the fit before the joined model's epochs."""
    epochs_run = []

    class Lengthens(MLPClassifier):
        def on_train_epoch_end(self) -> None:
            super().on_train_epoch_end()
            epochs_run.append(self.current_epoch)
            if self.current_epoch == 0:
                self.trainer.fit_loop.max_epochs = max(self.trainer.max_epochs, 3)

    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Lengthens(depth=0, schedule="constant"), *loaders())
    assert epochs_run == [0, 1, 2] and trainer.max_epochs == 3


def test_a_key_popped_from_callback_metrics_is_gone_for_the_callbacks_after():
    """mlp.fused.FusedClassifier.drop pops a departed model's val/acc/<name> from trainer.callback_metrics, which
    otherwise keeps every key ever logged (and each checkpoint callback copies them all every epoch). That works
    while callback_metrics is the Trainer's own dict and Lightning does not merge the key back in from the results
    it stored; an upgrade that changed either would keep the key for every callback after."""
    seen = []  # whether a callback sees the key, at each validation's end and at the fit's end

    class Departs(MLPClassifier):
        def on_validation_epoch_end(self) -> None:
            super().on_validation_epoch_end()
            if self.current_epoch == 0:  # the sanity check's and the first epoch's validation
                self.log("val/acc/departed", 0.5, logger=False)

        def on_train_epoch_end(self) -> None:  # after the epoch's validation, as FusedClassifier drops its models
            super().on_train_epoch_end()
            if self.current_epoch == 0:
                self.trainer.callback_metrics.pop("val/acc/departed", None)

    class Sees(L.Callback):
        def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            if not trainer.sanity_checking:
                seen.append("val/acc/departed" in trainer.callback_metrics)

        on_train_end = on_validation_end

    trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Sees()])
    trainer.fit(Departs(depth=0, schedule="constant"), *loaders())
    assert seen == [True, False, False, False]


def test_optimizers_runs_torchs_step_hooks_from_the_attributes_it_sets_itself():
    """mlp.fused.Optimizers holds other optimisers and no parameters, so it skips Optimizer.__init__: it wraps its
    step in torch's profile_hook_step itself and sets the hooks' dicts that the wrapper reads. An upgrade that reads
    other attributes there fails this step, or runs no hook."""
    import torch

    from mlp.fused import Optimizers

    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))]
    for p in params:
        p.grad = torch.ones_like(p)
    both = Optimizers([torch.optim.SGD([p], lr=0.5) for p in params])
    ran = []
    both.register_step_pre_hook(lambda *_: ran.append("pre"))
    both.register_step_post_hook(lambda *_: ran.append("post"))
    both.step()
    assert ran == ["pre", "post"]
    assert all(torch.equal(p, torch.full_like(p, 0.5)) for p in params)


def test_lightnings_spike_detection_still_cannot_load_its_own_state():
    """mlp.cli refuses --trainer.callbacks SpikeDetection because Lightning 2.6's load_state_dict reads an attribute
    it never sets (Lightning-AI/pytorch-lightning#21752), which testing the best checkpoint and resuming call. This
    fails on the release that mends it: then the refusal goes."""
    from lightning.pytorch.callbacks import SpikeDetection

    with pytest.raises(AttributeError, match="running"):
        SpikeDetection().load_state_dict(SpikeDetection().state_dict())
