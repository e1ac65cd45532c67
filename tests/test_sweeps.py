"""scripts/tune.py on synthetic data: pruning, divergence, resuming, and the final report."""

import json
import sys
import time
from pathlib import Path

import lightning as L
import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

import mlp.report
import mlp.study
from mlp.budget import Budget
from mlp.data import FILES, FashionMNISTDataModule
from mlp.errors import UserError, run_script
from mlp.module import MLPClassifier
from tests.conftest import snapshot, synthetic_split, write_idx

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
    monkeypatch.setattr("mlp.study.make_pruner", lambda *_: optuna.pruners.ThresholdPruner(lower=0.5))


def mislabel_test_split(data_dir: Path) -> None:
    """Shift a quarter of the test labels, so the test accuracy cannot reach the validation accuracy."""
    _, labels = synthetic_split(200, seed=2)  # the test split of write_synthetic_dataset
    labels[:50] = (labels[:50] + 1) % 10
    write_idx(data_dir / f"{FILES['test_labels']}.gz", labels)


def independent_test_acc(checkpoint: str, data_dir: Path) -> float:
    """test/acc of a checkpoint on the test split, measured here without any of tune.py's code."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    data = FashionMNISTDataModule(data_dir=str(data_dir), val_size=100, batch_size=32)
    (results,) = trainer.test(MLPClassifier.load_from_checkpoint(checkpoint), datamodule=data, verbose=False)
    return results["test/acc"]


def test_study_prunes_survives_divergence_resumes_reports_and_no_other_study_writes_over_it(
    synthetic_dir, tmp_path, threshold_pruner
):
    mislabel_test_split(synthetic_dir)
    study = optuna.create_study(study_name="test", storage=f"sqlite:///{tmp_path / 'study.db'}", direction="maximize")
    study.enqueue_trial({"lr": 0.1, **FAST_TRIAL})  # learns the bands
    study.enqueue_trial({"lr": 1e-7, **FAST_TRIAL})  # learns nothing: pruned after its first epoch
    study.enqueue_trial({"lr": 1e4, **FAST_TRIAL})  # blows up to NaN

    summary = tune.main(tune_args(synthetic_dir, tmp_path, n_trials=3))

    trials = optuna.load_study(study_name="test", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    assert trials[1].user_attrs["epochs_trained"] == 1
    assert sorted(trials[1].intermediate_values) == [10]  # pruned at the first check, 10 % of it
    assert "not finite" in trials[2].user_attrs["diverged"]
    assert summary["best_trial"] == 0 and summary["best_val_acc"] > 0.9
    # Test figures are accuracies on the test split, not validation figures: the best checkpoint's, and the
    # answer's, by default the refit of the one complete trial (an ensemble of one).
    assert summary["final"]["best"]["test_acc"] == independent_test_acc(summary["best_checkpoint"], synthetic_dir)
    assert summary["final"]["answer"] == "refit_ensemble" and summary["final"]["refit_ensemble"]["trials"] == [0]
    assert summary["test_acc"] == summary["final"]["refit_ensemble"]["test_acc"]
    assert summary["test_acc"] < summary["best_val_acc"] - 0.1
    assert summary["epochs_trained"] == 2 + 1 + 1
    report_dir = tmp_path / "logs" / "tune" / "test"
    assert json.loads((report_dir / "report.json").read_text()) == summary
    assert (report_dir / "optimization_history.png").stat().st_size > 0
    assert (report_dir / "trial_0" / "checkpoints").is_dir()
    # Each trial trains with its own seed, the fit flags' (0 by default) plus its number.
    configs = [yaml.safe_load((report_dir / f"trial_{n}" / "config.yaml").read_text()) for n in range(3)]
    seeds = [config["seed_everything"] for config in configs]
    assert seeds == [0, 1, 2]

    resumed = tune.main(tune_args(synthetic_dir, tmp_path, n_trials=4))

    trials = optuna.load_study(study_name="test", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 4
    assert resumed["epochs_trained"] == summary["epochs_trained"] + trials[3].user_attrs["epochs_trained"]

    # The same name in another storage is another study: it would write its trials and report over these.
    before = snapshot(tmp_path / "logs")
    another_storage = [*tune_args(synthetic_dir, tmp_path, n_trials=1), f"--storage=sqlite:///{tmp_path / 'b.db'}"]
    with pytest.raises(UserError, match=f"{report_dir} holds another study's runs .*: no trial of study 'test' in"):
        tune.main(another_storage)
    assert snapshot(tmp_path / "logs") == before


def test_trial_n_trains_with_the_fit_seed_plus_n_so_same_shaped_trials_start_apart(synthetic_dir, tmp_path):
    from mlp.budget import Budget
    from mlp.cli import build_cli
    from mlp.search import SearchSpace
    from mlp.trials import Trials

    fit_args = [f"--data.data_dir={synthetic_dir}", f"--trainer.logger.init_args.save_dir={tmp_path}",
                "--data.val_size=100", "--seed_everything=7"]
    study = optuna.create_study(direction="maximize")
    trials = Trials(SearchSpace(), fit_args, "s", n_trials=2, fuse=1, budget=Budget(), seed=7)
    built = [trials.build(study.ask(), {}) for _ in range(2)]  # two trials of fit's own configuration
    assert [cli.config.seed_everything for cli in built] == [7, 8]
    first_weights = [next(cli.model.net.parameters()) for cli in (build_cli(fit_args), *built)]
    assert torch.equal(first_weights[1], first_weights[0])  # trial 0 is fit's own run
    assert not torch.equal(first_weights[2], first_weights[1])


def test_flags_from_a_file_are_read_as_a_shell_reads_them(tmp_path):
    # Each line had been one argument: "--n-trials 40" went to LightningCLI, which refused it unrecognised.
    flags = tmp_path / "search.txt"
    flags.write_text("# the study\n--n-trials 40\n\n--lr 0.01 0.5  # peak rates\n--model.depth=2\n"
                     "--trainer.logger.init_args.name 'my runs'\n")
    options, fit_args = tune.parse([f"@{flags}", "--fuse", "2"])
    assert (options.n_trials, options.lr, options.fuse) == (40, [0.01, 0.5], 2)
    assert fit_args == ["--model.depth=2", "--trainer.logger.init_args.name", "my runs"]


@pytest.mark.parametrize("text", [b"--study-name 'unclosed\n", "--n-trials 2\n".encode("utf-16")])
def test_a_flags_file_that_is_no_text_or_leaves_a_quote_open_is_one_error_line(tmp_path, text, capsys):
    (tmp_path / "flags.txt").write_bytes(text)
    with pytest.raises(SystemExit):
        tune.parse([f"@{tmp_path / 'flags.txt'}"])
    assert "error: cannot read the flags of an @FILE: " in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("flag", ["--n-trails=5", "--model.widht=5"])
def test_a_mistyped_flag_is_one_error_line_not_fits_usage(synthetic_dir, tmp_path, flag, capsys):
    # It had printed fit.py's usage, 90 lines, under tune.py's name, and a tip pointing at tune.py --help.
    with pytest.raises(SystemExit) as exit:
        run_script(lambda: tune.main([*tune_args(synthetic_dir, tmp_path, n_trials=1), flag]), interrupted="")
    assert exit.value.code == (f"error: unrecognized arguments: {flag} (fit.py --help lists every fit flag; tune.py "
                               "--help its own)")
    assert "usage" not in capsys.readouterr().err and not (tmp_path / "study.db").exists()


def test_bad_search_range_is_rejected_before_any_trial(synthetic_dir, tmp_path):
    args = tune_args(synthetic_dir, tmp_path, n_trials=1)
    args[args.index("--epochs") + 1 : args.index("--epochs") + 3] = ["5", "2"]
    with pytest.raises(UserError, match="--epochs"):
        tune.main(args)
    assert not (tmp_path / "study.db").exists()


# A new file in a new folder, the default storage, a storage of the user's that holds another study.
@pytest.mark.parametrize("storage", ["sqlite:///{}/new/b.db", "{}/new/b.journal", None, "sqlite:///{}/their.db",
                                     "{}/their.journal"])
def test_a_study_refused_for_another_studys_folder_leaves_no_storage_or_study_behind(synthetic_dir, tmp_path, storage):
    # Refused only after Optuna had made the storage's folder and file, and the study in it: rerun with the flag
    # fixed, a study with no trial (and a file the user never asked for) stood in the way.
    (tmp_path / "logs" / "tune" / "test" / "trial_0").mkdir(parents=True)  # another study's run
    theirs = [f"sqlite:///{tmp_path / 'their.db'}", str(tmp_path / "their.journal")]
    for url in theirs:
        optuna.create_study(study_name="theirs", storage=mlp.study.connect(url))
    before = snapshot(tmp_path)
    args = [arg for arg in tune_args(synthetic_dir, tmp_path, n_trials=1) if not arg.startswith("--storage")]
    with pytest.raises(UserError, match="holds another study's runs"):
        tune.main(args + ([f"--storage={storage.format(tmp_path)}"] if storage else []))
    assert snapshot(tmp_path).keys() == before.keys() and not (tmp_path / "new").exists()
    assert snapshot(tmp_path)["their.journal"] == before["their.journal"]
    assert [optuna.get_all_study_names(mlp.study.connect(url)) for url in theirs] == [["theirs"], ["theirs"]]


# 300 letters: a study created in the storage, then "File name too long" pointing at the log folder.
# optuna.db: the study's folder would be the default storage's file.
@pytest.mark.parametrize("name", ["../../escape", "/tmp/absolute", "a/b", "..", ".hidden", "", "a" * 300, "optuna.db"])
def test_a_study_name_that_is_not_one_folder_name_is_refused_before_anything_is_written(synthetic_dir, tmp_path, name):
    args = [*tune_args(synthetic_dir, tmp_path, n_trials=1), f"--study-name={name}"]
    with pytest.raises(SystemExit) as exit:
        run_script(lambda: tune.main(args), interrupted="")
    assert len(exit.value.code.splitlines()) == 1
    assert exit.value.code.startswith(f"error: --study-name {name!r} must be one folder name of letters, digits")
    assert [path.name for path in tmp_path.iterdir()] == ["data"] and not Path("/tmp/absolute").exists()


def test_report_tests_an_ensemble_chosen_on_val_and_refits_each_once_and_falls_back(
    synthetic_dir, tmp_path, monkeypatch
):
    import torch

    import mlp.final
    from mlp.data import FashionMNISTDataModule
    from mlp.final import accuracy
    from tests.conftest import checkpoint_softmax

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="test", storage=storage, direction="maximize")
    for lr in (0.01, 0.003, 0.02, 0.005):  # barely trained, so they differ and averaging can matter
        study.enqueue_trial({**FAST_TRIAL, "lr": lr, "epochs": 1, "width": 8})
    args = [*tune_args(synthetic_dir, tmp_path, n_trials=4), "--pruner=none", "--final=ensemble"]
    tested = []  # what each test_checkpoints call averaged
    test_checkpoints = mlp.final.test_checkpoints
    monkeypatch.setattr(mlp.final, "test_checkpoints", lambda paths: tested.append(paths) or test_checkpoints(paths))

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

    # The ensemble's k configurations refit and averaged; the best trial's refit is the same run as `refit`.
    refits = final["refit_ensemble"]
    assert refits["trials"] == final["ensemble"]["trials"] and refits["val_acc"] is None
    assert refits["checkpoints"][0] == refit["checkpoint"]
    assert all(f"refit_trial_{n}" in path for n, path in zip(refits["trials"], refits["checkpoints"]))
    refit_average = torch.stack([checkpoint_softmax(path, x) for path in refits["checkpoints"]]).mean(0)
    assert refits["test_acc"] == pytest.approx(accuracy(refit_average, y), abs=1e-6)
    # On synthetic data no prediction flips between standardising by the trials' 700 training images and by the
    # refits' 800, so the figure alone cannot tell them apart: the refit ensemble goes through test_checkpoints,
    # which rebuilds the split its checkpoints were trained on.
    assert tested == [refits["checkpoints"]]
    built = []
    monkeypatch.setattr("mlp.classes.DATA",
                        lambda *args, **kwargs: built.append(FashionMNISTDataModule(*args, **kwargs)) or built[-1])
    assert test_checkpoints(refits["checkpoints"])["test_acc"] == refits["test_acc"]
    assert [len(data.train_set) for data in built] == [800]
    monkeypatch.undo()
    one_epoch_on_all_800 = (784 * 8 + 8 * 10) * 800 / ((784 * 512 + 512 * 512 + 512 * 10) * 55_000)
    assert summary["cost"]["refits_default_net_epochs"] == pytest.approx(k * one_epoch_on_all_800, abs=1e-3)

    # A rerun reuses every figure: nothing is retrained or retested.
    refit_written = Path(refit["checkpoint"]).stat().st_mtime_ns
    again = tune.main([*args, "--final=refit"])
    assert again["final"]["refit"] == refit and again["test_acc"] == refit["test_acc"]
    assert Path(refit["checkpoint"]).stat().st_mtime_ns == refit_written

    # Checkpoints deleted: the ensemble does without them, and says so; with none left there is no k chosen on
    # val to refit either, and the report falls back to the refit.
    Path(ranked[0].user_attrs["best_checkpoint"]).unlink()
    fewer = tune.main(args)["final"]
    assert fewer["ensemble"]["missing_checkpoints"] == [ranked[0].number]
    assert fewer["ensemble"]["candidates"] == [t.number for t in ranked[1:]]
    assert fewer["best"]["test_acc"] == final["best"]["test_acc"]  # measured once, before the deletion
    for trial in ranked[1:]:
        Path(trial.user_attrs["best_checkpoint"]).unlink()
    none_left = tune.main(args)
    assert none_left["final"]["ensemble"]["test_acc"] is None
    assert none_left["final"]["refit_ensemble"]["test_acc"] is None
    assert none_left["final"]["answer"] == "refit" and none_left["test_acc"] == refit["test_acc"]
    assert "ensemble has no test figure" in none_left["final"]["fallback"]
    assert none_left["cost"]["default_net_epochs"] == pytest.approx(
        4 * (784 * 8 + 8 * 10) / (784 * 512 + 512 * 512 + 512 * 10), abs=1e-3
    )  # four one-epoch trials of 784-8-10


def test_refits_and_the_best_checkpoints_test_rebuild_each_trial_from_its_own_saved_config(synthetic_dir, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="test", storage=storage, direction="maximize")
    study.enqueue_trial({"lr": 0.1, **FAST_TRIAL})
    args = [*tune_args(synthetic_dir, tmp_path, n_trials=1), "--final=refit"]
    tune.main([*args, "--model.activation=tanh"])
    for cached in ("refit_0", "test_trial", "ensemble", "refit_ensemble"):  # as if the report had not been written
        study.set_user_attr(cached, None)

    # Resumed with other flags: the refit is still trial 0's tanh net, tested on trial 0's split.
    summary = tune.main([*args, "--data.val_size=200"])

    assert MLPClassifier.load_from_checkpoint(summary["final"]["refit"]["checkpoint"]).hparams.activation == "tanh"
    tested = (tmp_path / "logs" / "tune" / "test" / "best_trial_test" / "hparams.yaml").read_text()
    assert "val_size: 100" in tested and "activation: tanh" in tested


def test_the_report_writes_the_best_trials_refit_as_a_fit_config_that_trains_the_same_model(synthetic_dir, tmp_path):
    import fit

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="test", storage=storage, direction="maximize")
    for lr in (0.1, 0.02):
        study.enqueue_trial({**FAST_TRIAL, "lr": lr, "label_smoothing": 0.1})
    summary = tune.main([*tune_args(synthetic_dir, tmp_path, n_trials=2), "--pruner=none", "--final=refit"])

    recipe = yaml.safe_load(Path(summary["best_config"]).read_text())
    best = optuna.load_study(study_name="test", storage=storage).best_trial
    assert recipe["model"]["lr"] == best.params["lr"] and recipe["trainer"]["max_epochs"] == best.params["epochs"]
    assert recipe["data"]["val_size"] == 0 and recipe["seed_everything"] == best.number  # the fit seed 0 plus n
    assert "data_dir" not in recipe["data"] and set(recipe["trainer"]) == {"max_epochs"}  # nothing of this machine
    # fit.py with the file trains the refit again: the same weights, to the rounding by which a trial's stack of one
    # differs from a run alone (tests/test_fused.py), so the same test figure up to one image in 200.
    results = fit.main([f"--config={summary['best_config']}", f"--data.data_dir={synthetic_dir}",
                        f"--trainer.logger.init_args.save_dir={tmp_path / 'fit'}"])
    assert results["test/acc"] == pytest.approx(summary["final"]["refit"]["test_acc"], abs=0.005)
    (fitted,) = (tmp_path / "fit").rglob("epoch*.ckpt")  # beside last.ckpt, for --ckpt_path last
    fitted = torch.load(fitted, weights_only=True)["state_dict"]
    refit = torch.load(summary["final"]["refit"]["checkpoint"], weights_only=True)["state_dict"]
    assert list(fitted) == list(refit)
    assert all(torch.allclose(fitted[key], refit[key], rtol=0, atol=1e-5) for key in refit)


def test_trial_keeps_the_val_acc_checkpoint_when_the_user_adds_another(synthetic_dir, tmp_path):
    """The first ModelCheckpoint in the Trainer is the user's here; the trial must still use --checkpoint's."""
    study = optuna.create_study(study_name="test", storage=f"sqlite:///{tmp_path / 'study.db'}", direction="maximize")
    study.enqueue_trial({"lr": 0.1, **FAST_TRIAL})
    user_checkpoint = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor=val/loss"]

    summary = tune.main([*tune_args(synthetic_dir, tmp_path, n_trials=1), *user_checkpoint])

    (trial,) = optuna.load_study(study_name="test", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert trial.value == max(trial.intermediate_values.values())  # the best val/acc, not a val/loss
    assert "val_acc" in Path(summary["best_checkpoint"]).name


def test_tune_without_a_logger_is_a_clear_error(synthetic_dir, tmp_path):
    with pytest.raises(UserError, match="--trainer.logger=false"):
        tune.main([*tune_args(synthetic_dir, tmp_path, n_trials=1), "--trainer.logger=false"])
    assert not (tmp_path / "study.db").exists()


@pytest.mark.parametrize("val_size", [0, 60000])  # 60000: a ZeroDivisionError's traceback, the study made first
def test_tune_without_a_validation_split_or_training_images_is_a_clear_error(synthetic_dir, tmp_path, val_size):
    with pytest.raises(UserError, match="--data.val_size must be > 0 and below the 60000 training images, got"):
        tune.main([*tune_args(synthetic_dir, tmp_path, n_trials=1), f"--data.val_size={val_size}"])
    assert not (tmp_path / "study.db").exists()


def test_a_study_whose_first_run_had_no_time_for_a_trial_says_so_and_its_rerun_continues_it(
    synthetic_dir, tmp_path, monkeypatch, capsys
):
    """Its report (no trial, the plots' folder) had made its folder another study's, so no rerun could use it; and
    the report's wall time had left out the report itself."""
    write_plots = mlp.report.write_plots
    with monkeypatch.context() as patch:
        patch.setattr(Budget, "trials_may_start", lambda self, best_first: False)
        patch.setattr("mlp.report.write_plots", lambda *args: time.sleep(1) or write_plots(*args))
        summary = tune.main([*tune_args(synthetic_dir, tmp_path, n_trials=2), "--quiet"])
    assert summary["unfinished"] == 2 and summary["wall_seconds_this_run"] >= 1
    assert "study test: no trial; --timeout left 2 of --n-trials unfinished" in capsys.readouterr().out
    summary = tune.main([*tune_args(synthetic_dir, tmp_path, n_trials=2), "--quiet", "--final=best"])
    assert summary["trials"] and summary["unfinished"] == 0 and summary["test_acc"] is not None


def test_worker_stopped_by_timeout_says_so_while_others_still_run(synthetic_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("mlp.study.HEARTBEAT_SECONDS", 0.2)
    for module in ("mlp.budget", "mlp.tune"):  # a one-second budget, with no final model to keep time for
        monkeypatch.setattr(f"{module}.FINISH_SECONDS", 0)
    study = optuna.create_study(study_name="test", storage=f"sqlite:///{tmp_path / 'study.db'}", direction="maximize")
    study.ask()  # another worker's trial, running: the study needs no more, so this worker waits for it

    assert tune.main([*tune_args(synthetic_dir, tmp_path, n_trials=1), "--timeout=1"]) is None

    printed = capsys.readouterr().out
    assert "--timeout" in printed and "1 trial still running" in printed
    assert "finished the study's last trial" not in printed


def test_the_wide_space_searches_augmentation_and_batch_norm_and_stacked_trials_each_train_with_their_own(
    synthetic_dir, tmp_path
):
    args = tune_args(synthetic_dir, tmp_path, n_trials=4)
    args[args.index("--width") + 1 : args.index("--width") + 3] = ["8", "8"]  # one width: the trials stack by 2
    tune.main([*args, "--space=wide", "--fuse=2", "--pruner=none", "--quiet"])
    trials = optuna.load_study(study_name="test", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    drawn = {(t.params["augment_shift"], t.params["augment_flip"]) for t in trials}
    assert len(drawn) == 4 and all(0 <= shift <= 3 and 0 <= flip <= 0.5 for shift, flip in drawn)
    for trial in trials:  # each trial's run trained with its own
        config = yaml.safe_load((Path(trial.user_attrs["log_dir"]) / "config.yaml").read_text())["model"]
        assert (config["augment_shift"], config["augment_flip"], config["batch_norm"]) == (
            trial.params["augment_shift"], trial.params["augment_flip"], trial.params["batch_norm"])
    assert {trial.params["batch_norm"] for trial in trials} == {False, True}  # with and without, stacked apart
    assert "augment_shift" not in tune.SearchSpace().searched()  # not in the default space


def test_fit_flags_pin_searched_hyperparameters_in_every_trial(synthetic_dir, tmp_path, capsys):
    config = tmp_path / "fit.yaml"
    config.write_text("model:\n  dropout: 0.25\n")  # a config file pins too
    args = tune_args(synthetic_dir, tmp_path, n_trials=2)
    del args[args.index("--epochs") : args.index("--epochs") + 3]
    del args[args.index("--depth") : args.index("--depth") + 3]
    del args[args.index("--width") : args.index("--width") + 3]
    args[args.index("--lr") + 1 : args.index("--lr") + 3] = ["0.05", "0.2"]  # every trial learns
    args += ["--pruner=none", "--trainer.max_epochs", "1", "--model.width=12", f"--config={config}"]

    tune.main(args)

    assert "pinned by the fit flags, not searched: epochs=1, width=12, dropout=0.25" in capsys.readouterr().out
    trials = optuna.load_study(study_name="test", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    # The first trial is fit's defaults for what is still searched.
    assert trials[0].params == {"lr": 0.1, "depth": 2, "weight_decay": 5e-4, "label_smoothing": 0.0}
    for trial in trials:
        assert set(trial.params) == {"lr", "depth", "weight_decay", "label_smoothing"}
        assert trial.user_attrs["epochs_trained"] == 1  # the pinned --trainer.max_epochs
        hparams = torch.load(trial.user_attrs["best_checkpoint"], weights_only=False)["hyper_parameters"]
        assert (hparams["width"], hparams["dropout"]) == (12, 0.25)


def test_a_search_range_and_a_fit_flag_pinning_it_are_refused_together(synthetic_dir, tmp_path):
    args = [*tune_args(synthetic_dir, tmp_path, n_trials=1), "--model.depth", "2"]  # tune_args gives --depth 1 1
    with pytest.raises(UserError, match="--depth searches depth but --model.depth pins it to 2"):
        tune.main(args)
    assert not (tmp_path / "study.db").exists()


def test_the_wide_space_starts_from_fits_own_configuration(tmp_path):
    from mlp.cli import build_cli
    from mlp.study import fit_defaults

    fit = build_cli([f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert fit_defaults(fit, tune.SearchSpace.preset("wide")) == {
        "lr": 0.1, "epochs": 20, "depth": 2, "width": 512, "weight_decay": 5e-4, "dropout": 0.0,
        "label_smoothing": 0.0, "augment_shift": 0, "augment_flip": 0.0, "batch_norm": False,
    }
    with pytest.raises(UserError, match="--space must be one of default, wide"):
        tune.SearchSpace.preset("huge")
