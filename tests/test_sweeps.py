"""scripts/tune.py on synthetic data: pruning, divergence, resuming, and the final report."""

import json
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mlp.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import tune  # noqa: E402

FAST_TRIAL = {"epochs": 2, "depth": 1, "width": 16, "weight_decay": 1e-4, "dropout": 0.0, "label_smoothing": 0.0}


def tune_args(synthetic_dir: Path, tmp_path: Path, n_trials: int) -> list[str]:
    return [
        f"--n-trials={n_trials}",
        f"--storage=sqlite:///{tmp_path / 'study.db'}",
        "--study-name=test",
        "--lr", "1e-7", "1e4",
        "--epochs", "1", "2",
        "--depth", "1", "1",
        "--width", "8", "16",
        f"--data.data_dir={synthetic_dir}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--data.val_size=100",
        "--data.batch_size=32",
    ]


@pytest.fixture
def threshold_pruner(monkeypatch):
    """Prune any trial whose val/acc is below 0.5 after an epoch: deterministic, unlike the real pruners."""
    monkeypatch.setattr("mlp.study.make_pruner", lambda name, space: optuna.pruners.ThresholdPruner(lower=0.5))


def test_study_prunes_survives_divergence_resumes_and_reports(synthetic_dir, tmp_path, threshold_pruner):
    study = optuna.create_study(study_name="test", storage=f"sqlite:///{tmp_path / 'study.db'}", direction="maximize")
    study.enqueue_trial({"lr": 0.1, **FAST_TRIAL})  # learns the bands
    study.enqueue_trial({"lr": 1e-7, **FAST_TRIAL})  # learns nothing: pruned after its first epoch
    study.enqueue_trial({"lr": 1e4, **FAST_TRIAL})  # blows up to NaN

    summary = tune.main(tune_args(synthetic_dir, tmp_path, n_trials=3))

    trials = optuna.load_study(study_name="test", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    assert trials[1].user_attrs["epochs_trained"] == 1
    assert sorted(trials[1].intermediate_values) == list(range(1, 11))  # pruned at the first check, 10 % of it
    assert "not finite" in trials[2].user_attrs["diverged"]
    assert summary["best_trial"] == 0 and summary["best_val_acc"] > 0.9
    assert 0.9 < summary["test_acc"] <= 1.0
    assert summary["epochs_trained"] == 2 + 1 + 1
    report_dir = tmp_path / "logs" / "tune" / "test"
    assert json.loads((report_dir / "report.json").read_text()) == summary
    assert (report_dir / "optimization_history.png").stat().st_size > 0
    assert (report_dir / "trial_0" / "checkpoints").is_dir()

    resumed = tune.main(tune_args(synthetic_dir, tmp_path, n_trials=4))

    trials = optuna.load_study(study_name="test", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 4
    assert resumed["epochs_trained"] == summary["epochs_trained"] + trials[3].user_attrs["epochs_trained"]


def test_bad_search_range_is_rejected_before_any_trial(synthetic_dir, tmp_path):
    args = tune_args(synthetic_dir, tmp_path, n_trials=1)
    args[args.index("--epochs") + 1 : args.index("--epochs") + 3] = ["5", "2"]
    with pytest.raises(UserError, match="--epochs"):
        tune.main(args)
    assert not (tmp_path / "study.db").exists()


def test_report_tests_an_ensemble_chosen_on_val_and_a_refit_each_once_and_falls_back(synthetic_dir, tmp_path):
    import torch

    from mlp.data import FashionMNISTDataModule
    from mlp.final import accuracy, checkpoint_softmax

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="test", storage=storage, direction="maximize")
    for lr in (0.01, 0.003, 0.02, 0.005):  # barely trained, so they differ and averaging can matter
        study.enqueue_trial({**FAST_TRIAL, "lr": lr, "epochs": 1, "width": 8})
    args = [*tune_args(synthetic_dir, tmp_path, n_trials=4), "--pruner=none"]

    summary = tune.main(args)

    final = summary["final"]
    assert final["answer"] == "ensemble"
    assert summary["test_acc"] == final["ensemble"]["test_acc"]
    trials = {t.number: t for t in optuna.load_study(study_name="test", storage=storage).trials}
    ranked = sorted(trials.values(), key=lambda t: -t.value)
    by_k = final["ensemble"]["val_acc_by_k"]
    k = final["ensemble"]["k"]
    assert len(by_k) == 4 and by_k[k - 1] == max(by_k) and all(v < max(by_k) for v in by_k[: k - 1])
    assert final["ensemble"]["trials"] == [t.number for t in ranked[:k]]
    # Recomputed by hand: the k checkpoints' softmax averaged on the test split, the same split tests use.
    data = FashionMNISTDataModule(str(synthetic_dir), val_size=100)
    data.setup("test")
    test_x, test_y = data.test_set.tensors
    average = torch.stack([checkpoint_softmax(t.user_attrs["best_checkpoint"], test_x) for t in ranked[:k]]).mean(0)
    assert final["ensemble"]["test_acc"] == pytest.approx(accuracy(average, test_y), abs=1e-6)
    val_x, val_y = data.val_set.tensors
    val_average = torch.stack([checkpoint_softmax(t.user_attrs["best_checkpoint"], val_x) for t in ranked[:k]]).mean(0)
    assert final["ensemble"]["val_acc"] == pytest.approx(accuracy(val_average, val_y), abs=1e-6)

    refit = final["refit"]
    assert refit["trial"] == ranked[0].number and refit["val_acc"] is None
    everything = FashionMNISTDataModule(str(synthetic_dir), val_size=0)
    everything.setup("test")
    assert len(everything.train_set) == 800
    x, y = everything.test_set.tensors
    assert refit["test_acc"] == pytest.approx(accuracy(checkpoint_softmax(refit["checkpoint"], x), y), abs=1e-6)
    assert final["best"]["val_acc"] == ranked[0].value and 0 < final["best"]["test_acc"] <= 1

    # A rerun reuses every figure: nothing is retrained or retested.
    refit_written = Path(refit["checkpoint"]).stat().st_mtime_ns
    again = tune.main([*args, "--final=refit"])
    assert again["final"]["refit"] == refit and again["test_acc"] == refit["test_acc"]
    assert Path(refit["checkpoint"]).stat().st_mtime_ns == refit_written

    # Checkpoints deleted: the ensemble does without them, and says so; with none left it falls back to the refit.
    Path(ranked[0].user_attrs["best_checkpoint"]).unlink()
    fewer = tune.main(args)["final"]
    assert fewer["ensemble"]["missing_checkpoints"] == [ranked[0].number]
    assert fewer["ensemble"]["candidates"] == [t.number for t in ranked[1:]]
    assert fewer["best"]["test_acc"] == final["best"]["test_acc"]  # measured once, before the deletion
    for trial in ranked[1:]:
        Path(trial.user_attrs["best_checkpoint"]).unlink()
    none_left = tune.main(args)
    assert none_left["final"]["ensemble"]["test_acc"] is None
    assert none_left["final"]["answer"] == "refit" and none_left["test_acc"] == refit["test_acc"]
    assert "ensemble has no test figure" in none_left["final"]["fallback"]
    assert none_left["cost"]["default_net_epochs"] == pytest.approx(
        4 * (784 * 8 + 8 * 10) / (784 * 512 + 512 * 512 + 512 * 10), abs=1e-3
    )  # four one-epoch trials of 784-8-10
