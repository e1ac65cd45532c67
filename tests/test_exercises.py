"""scripts/exercises.py on synthetic data: d2l's setting, selection on validation, one test, resuming."""

import json
import sys
from pathlib import Path

import pytest

from mlp import exercises
from mlp.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import exercises as exercises_script


@pytest.fixture
def sweep_args(synthetic_dir, tmp_path) -> list[str]:
    fast = ["--data.val_size=100", "--data.batch_size=32", "--trainer.max_epochs=2", "--model.width=16"]
    return ["lr", f"--save_dir={tmp_path / 'logs'}", f"--data.data_dir={synthetic_dir}", *fast]


def test_sweep_selects_on_validation_tests_the_choice_once_and_resumes(sweep_args, tmp_path, monkeypatch, capsys):
    tested = []
    real_test = exercises.test
    monkeypatch.setattr(exercises, "test", lambda run, *args: tested.append(run) or real_test(run, *args))

    partial = exercises_script.main([*sweep_args, "--only", "lr=0.01", "d2l"])
    assert list(partial["runs"]) == ["lr=0.01", "d2l"]
    assert partial["selected"] is None and partial["missing"] == ["lr=1.0", "lr=10.0"]
    assert tested == []

    outcome = exercises_script.main(sweep_args)
    runs = outcome["runs"]
    assert list(runs) == ["lr=0.01", "d2l", "lr=1.0", "lr=10.0"]
    assert outcome["selected"] == max((name for name in runs if name != "lr=10.0"), key=lambda n: runs[n]["val_acc"])
    assert [name for name, run in runs.items() if "test_acc" in run] == [outcome["selected"]]
    assert len(tested) == 1 and 0.0 < runs[outcome["selected"]]["test_acc"] <= 1.0
    for name, run in runs.items():
        # lr 10 diverges, and the divergence guard stops it after its first epoch, as fit.py's does: no epoch of it
        # ended with a finite loss, so it keeps no checkpoint to select (it had kept its NaN weights, at chance).
        assert len(run["val_acc_per_epoch"]) == (1 if name == "lr=10.0" else 2)
        assert run["diverged"] == (name == "lr=10.0")
        if name == "lr=10.0":
            assert run["val_acc"] is None and run["checkpoint"] is None
        else:
            assert run["val_acc"] == pytest.approx(max(run["val_acc_per_epoch"]))
            assert Path(run["checkpoint"]).is_file()
    table = capsys.readouterr().out
    assert "| lr=10.0 | none (diverged) |" in table
    assert f"| {outcome['selected']} ← selected |" in table
    assert f"**{runs[outcome['selected']]['test_acc']:.4f}**" in table and table.count("**") == 2

    config = (tmp_path / "logs" / "exercises" / "d2l" / "config.yaml").read_text()
    for setting in ("init: normal", "lr: 0.1", "momentum: 0.0", "nesterov: false", "schedule: constant"):
        assert setting in config

    def refuse(*args):
        raise AssertionError("a finished run was trained or tested again")

    monkeypatch.setattr(exercises, "train", refuse)
    monkeypatch.setattr(exercises, "test", refuse)
    again = exercises_script.main(sweep_args)
    assert again["runs"] == runs
    saved = json.loads((tmp_path / "logs" / "exercises" / "results.json").read_text())
    assert saved == runs
    with pytest.raises(UserError, match=r"holds lr=0.01, d2l, lr=1.0, lr=10.0 trained with the fit flags .*"
                                        r"--trainer.max_epochs=2.*, not .*--trainer.max_epochs=3"):
        exercises_script.main([*sweep_args, "--trainer.max_epochs=3"])  # a run is not taken for another's


def test_runs_are_named_by_what_differs_from_d2l_so_sweeps_share_them():
    assert exercises.run_name({"model.width": 256}) == exercises.run_name({"model.lr": 0.1}) == "d2l"
    assert exercises.run_name({"model.init": "normal", "model.depth": 4}) == exercises.run_name({"model.depth": 4})
    assert exercises.run_name({"model.init": "kaiming", "model.depth": 3}) == "init=kaiming,depth=3"


def test_unknown_run_is_rejected_before_training(sweep_args):
    with pytest.raises(UserError, match="width=300"):
        exercises_script.main([*sweep_args, "--only", "width=300"])


@pytest.mark.parametrize("flags", [["--model.lr=0.5"], ["--model.lr", "0.5"]])
def test_a_fit_flag_setting_what_the_sweep_varies_is_refused_and_never_overrides_a_run(sweep_args, flags, tmp_path):
    # It would have trained every run of the lr sweep at 0.5, under the names lr=0.01 ... lr=10.0.
    with pytest.raises(UserError, match="--model.lr: the lr sweep sets it for each run"):
        exercises_script.main([*sweep_args, *flags])
    assert not (tmp_path / "logs").exists()
    from_a_file = exercises.fit_flags({"model.lr": 10.0}, tmp_path, "lr=10.0", ["--model.lr=0.5"])
    assert from_a_file.index("--model.lr=10.0") > from_a_file.index("--model.lr=0.5")


def test_a_log_folder_flag_is_refused_for_the_sweeps_save_dir(sweep_args, tmp_path):
    # Its runs had logged there and its results.json in --save_dir; a later sweep with --save_dir there deleted a
    # checkpoint that the first results.json recorded.
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / "logger.yaml").write_text(f"trainer:\n  logger:\n    init_args:\n      save_dir: {elsewhere}\n")
    for flags in (["--trainer.logger.init_args.save_dir", str(elsewhere)], [f"--config={tmp_path / 'logger.yaml'}"]):
        with pytest.raises(UserError, match=f"the fit flags log the run to {elsewhere}/exercises/lr=0.01, not to "):
            exercises_script.main([*sweep_args, *flags])
        assert not list((tmp_path / "logs").rglob("*.ckpt")) and not elsewhere.exists()


def test_a_users_own_checkpoint_callback_leaves_a_run_chosen_by_its_best_val_acc(sweep_args):
    # A user's ModelCheckpoint came first in the Trainer, and its best score (here a val/loss) was kept as val_acc.
    own = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor=val/loss"]
    run = exercises_script.main([*sweep_args, "--only", "d2l", *own])["runs"]["d2l"]
    assert run["val_acc"] == pytest.approx(max(run["val_acc_per_epoch"]))
    assert "val_acc" in Path(run["checkpoint"]).name


@pytest.mark.parametrize("finder", ["LearningRateFinder", "BatchSizeFinder"])
def test_a_finder_that_would_change_a_runs_setting_unsaid_is_refused_before_training(sweep_args, tmp_path, finder):
    # The lr sweep's run lr=0.01 had trained at the finder's 1.1e-07, under its name.
    with pytest.raises(UserError, match=f"drop the {finder} of --trainer.callbacks: a run is named by what differs"):
        exercises_script.main([*sweep_args, "--only", "lr=0.01", f"--trainer.callbacks+={finder}"])
    assert not list((tmp_path / "logs").rglob("*.ckpt"))


@pytest.mark.parametrize("flag", ["--trainer.fast_dev_run=true", "--trainer.enable_checkpointing=false",
                                  "--checkpoint.save_top_k=0"])
def test_a_run_that_would_keep_no_checkpoint_is_refused_before_training(sweep_args, tmp_path, flag):
    # An AttributeError traceback as the run's score was read (and the selected run would be tested untrained).
    with pytest.raises(UserError, match="a sweep tests the run it selects from its best checkpoint: drop"):
        exercises_script.main([*sweep_args, "--only", "lr=0.01", flag])


@pytest.mark.parametrize("flag", ["--data.val_size=0", "--trainer.limit_val_batches=0",
                                  "--trainer.check_val_every_n_epoch=3"])
def test_a_run_that_would_never_validate_is_refused_before_training(sweep_args, tmp_path, flag):
    # A ValueError traceback after training, as the best epoch was looked for among no val/acc.
    with pytest.raises(UserError, match="a sweep selects on each run's val/acc, which these fit flags never measure"):
        exercises_script.main([*sweep_args, "--only", "lr=0.01", flag])
    assert not list((tmp_path / "logs").rglob("*.ckpt"))


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_a_strategy_training_in_processes_of_its_own_is_refused_before_training(sweep_args, tmp_path, strategy):
    # ddp_spawn ended in a traceback after training: the recorder's val/acc stayed in the processes Lightning started.
    with pytest.raises(UserError, match="trains in processes of its own: use --trainer.strategy ddp"):
        exercises_script.main([*sweep_args, "--only", "lr=0.01", f"--trainer.strategy={strategy}",
                               "--trainer.devices=2", "--trainer.accelerator=cpu"])
    assert not list((tmp_path / "logs").rglob("*.ckpt"))


def test_a_second_sweep_in_the_same_folder_at_once_is_refused_and_one_after_runs(sweep_args, tmp_path):
    # Both had trained d2l into one run folder, the second emptying it under the first, and each rewrote
    # results.json without the other's runs.
    import fcntl

    folder = tmp_path / "logs" / "exercises"
    folder.mkdir(parents=True)
    with open(folder / "sweep.lock", "w") as running:  # as a sweep running in another process holds it
        fcntl.flock(running, fcntl.LOCK_EX)
        with pytest.raises(UserError, match=f"another exercises.py is running in {folder}: wait for it to end"):
            exercises_script.main([*sweep_args, "--only", "lr=0.01"])
    assert not (folder / "lr=0.01").exists() and not (folder / "results.json").exists()
    assert list(exercises_script.main([*sweep_args, "--only", "lr=0.01"])["runs"]) == ["lr=0.01"]


def test_under_ddp_only_rank_zero_takes_the_sweeps_lock(tmp_path, monkeypatch):
    # The lock had refused the DDP processes Lightning starts, which run the script again beside rank 0's sweep:
    # `exercises.py ... --trainer.devices 2 --trainer.strategy ddp` stopped in its first run.
    import fcntl

    from lightning.pytorch.utilities import rank_zero_only

    with open(tmp_path / "sweep.lock", "w") as rank_zeros:  # rank 0's sweep holds it
        fcntl.flock(rank_zeros, fcntl.LOCK_EX)
        monkeypatch.setattr(rank_zero_only, "rank", 1)
        with exercises.only_sweep(tmp_path):
            pass
        monkeypatch.setattr(rank_zero_only, "rank", 0)
        with pytest.raises(UserError, match="another exercises.py is running"):
            with exercises.only_sweep(tmp_path):
                pass
