"""A trial writes the same TensorBoard run whether it trained alone or stacked with others (--fuse)."""

import optuna
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from mlp.data import IndexBatches
from tests.test_sweeps import FAST_TRIAL, tune, tune_args


def hparams_of(run: EventAccumulator) -> dict:
    """The hyperparameters of a run as the HParams tab shows them, with their values."""
    (content,) = [content for tag, content in run.PluginTagToContent("hparams").items() if "session_start" in tag]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {name: getattr(value, value.WhichOneof("kind")) for name, value in start.hparams.items()}


def trial_run(synthetic_dir, tmp_path, fuse: int) -> EventAccumulator:
    """Trial 0's run, from a study of two trials of one configuration trained `fuse` at a time."""
    tmp_path.mkdir()
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="test", storage=storage, direction="maximize")
    for _ in range(2):
        study.enqueue_trial({"lr": 0.1, **FAST_TRIAL})
    tune.main([*tune_args(synthetic_dir, tmp_path, n_trials=2), "--pruner=none", f"--fuse={fuse}",
               "--trainer.log_every_n_steps=5", "--final=best"])
    trial = optuna.load_study(study_name="test", storage=storage).trials[0]
    return EventAccumulator(trial.user_attrs["log_dir"]).Reload()


def test_a_trial_alone_and_stacked_writes_the_same_hyperparameters_scalars_and_images(
    synthetic_dir, tmp_path, monkeypatch
):
    # A stack draws its batch order after other random draws than a lone run makes; to compare values, every run
    # here gets the same batches: one fixed permutation, every epoch.
    monkeypatch.setattr(IndexBatches, "__iter__", lambda self: iter(
        torch.randperm(self.size, generator=torch.Generator().manual_seed(0)).split(self.batch_size)
        if self.shuffle else torch.arange(self.size).split(self.batch_size)))
    alone = trial_run(synthetic_dir, tmp_path / "alone", fuse=1)
    stacked = trial_run(synthetic_dir, tmp_path / "stacked", fuse=2)
    assert hparams_of(alone) == hparams_of(stacked)
    assert "max_epochs" in hparams_of(alone) and not any(name.startswith("_") for name in hparams_of(alone))
    assert alone.Tags()["scalars"] and sorted(alone.Tags()["scalars"]) == sorted(stacked.Tags()["scalars"])
    assert {"train/loss_step", "train/examples_per_sec", "val/acc", "hp_metric"} <= set(stacked.Tags()["scalars"])
    assert alone.Tags()["images"] == stacked.Tags()["images"] == ["activations"]
    # The same steps, and the same values where they do not depend on timing.
    for tag in ("train/loss_step", "train/loss_epoch", "val/acc", "epoch"):
        steps = [[event.step for event in run.Scalars(tag)] for run in (alone, stacked)]
        assert steps[0] == steps[1], tag
        values = [[event.value for event in run.Scalars(tag)] for run in (alone, stacked)]
        assert values[0] == pytest.approx(values[1], abs=1e-5), tag
