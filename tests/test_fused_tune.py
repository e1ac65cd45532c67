"""`scripts/tune.py --fuse K` on synthetic data: per-trial outcomes, runs, checkpoints, heartbeats and Ctrl-C."""

import json
import logging
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from optuna.trial import TrialState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mlp import final
from mlp.budget import Budget
from mlp.cli import MLPCLI, build_cli
from mlp.errors import UserError
from mlp.fused import FusedClassifier
from mlp.gpu_sizing import (
    AUTO_FUSE_MAX,
    CPU_FUSE,
    DATASET_BYTES,
    auto_fuse,
    check_fusable,
    check_stack_fits,
    stack_bytes,
)
from mlp.module import MLPClassifier
from mlp.search import SearchSpace
from mlp.study import Heartbeats, open_study, place
from mlp.trials import Trials
from tests.conftest import checkpoint_softmax, epoch_values
from tests.test_reliability import created_trials, start, wait_for
from tests.test_reliability import tune_args as slow_tune_args
from tests.test_sweeps import FAST_TRIAL, threshold_pruner, tune_args  # noqa: F401 (a fixture)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import tune  # noqa: E402


class RecordsRefills(FusedClassifier):
    """Notes the stacks' depths and widths at the first group's start, and at each epoch's end the trials that
    joined and whether the random stream stayed where it was."""

    refills: list[tuple[set[str], bool]] = []
    stacks_at_start: list[tuple[int, list[int]]] = []

    def on_train_start(self) -> None:
        super().on_train_start()
        if type(self).stacks_at_start:  # the study's first group's, not a later refit's (a stack of one)
            return
        type(self).stacks_at_start = [
            (stack.models[0].hparams.depth, [model.hparams.width for model in stack.models]) for stack in self.stacks
        ]

    def on_train_epoch_end(self) -> None:
        before, names = torch.get_rng_state(), set(self.names)
        super().on_train_epoch_end()
        self.refills.append((set(self.names) - names, torch.equal(before, torch.get_rng_state())))


@pytest.mark.usefixtures("threshold_pruner")
def test_fused_study_prunes_and_completes_per_trial_with_each_trials_run_and_checkpoint(
    synthetic_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr("mlp.trials.FusedClassifier", RecordsRefills)
    monkeypatch.setattr(RecordsRefills, "refills", [])
    monkeypatch.setattr(RecordsRefills, "stacks_at_start", [])
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="test", storage=url, direction="maximize")
    study.enqueue_trial({"lr": 0.1, **FAST_TRIAL})  # learns the bands
    study.enqueue_trial({"lr": 1e-7, **FAST_TRIAL})  # learns nothing: pruned after its first epoch
    study.enqueue_trial({"lr": 1e4, **FAST_TRIAL})  # blows up to NaN
    study.enqueue_trial({"lr": 0.1, **FAST_TRIAL, "epochs": 1, "width": 9})  # a shorter, narrower trial
    args = tune_args(synthetic_dir, tmp_path, n_trials=6)
    args[args.index("--depth") + 1 : args.index("--depth") + 3] = ["1", "2"]  # two depths: two groups

    summary = tune.main([*args, "--fuse=4"])

    trials = optuna.load_study(study_name="test", storage=url).trials
    assert len(trials) == 6 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    complete, pruned = TrialState.COMPLETE, TrialState.PRUNED
    assert [t.state for t in trials[:4]] == [complete, pruned, pruned, complete]
    assert trials[1].user_attrs["epochs_trained"] == 1
    assert "not finite" in trials[2].user_attrs["diverged"] and "diverged" not in trials[0].user_attrs
    # completed at its own last epoch (the end of its schedule, step 100), and told then
    assert trials[3].user_attrs["epochs_trained"] == 1 and max(trials[3].intermediate_values) == 100
    assert trials[3].datetime_complete < trials[0].datetime_complete
    # On the CPU a stack per depth and width: the narrower trial 3 is not padded to the others' 16 units.
    assert RecordsRefills.stacks_at_start == [(1, [16, 16, 16]), (1, [9])]
    # Trials 4 and 5 took places freed at the end of epoch 0, in the same Trainer, while trial 0 trained on;
    # building them (which seeds their initial weights) left the group's batch order and dropout draws alone.
    assert RecordsRefills.refills[0] == ({"4", "5"}, True) and all(same for _, same in RecordsRefills.refills)
    assert all(trial.datetime_start < trials[0].datetime_complete for trial in trials[4:])
    # An epoch's scalars are written at its last step, as Lightning writes an unfused run's (from step 0).
    steps_per_epoch = EventAccumulator(trials[0].user_attrs["log_dir"]).Reload().Scalars("val/acc")[0].step + 1
    for trial in trials:
        run = EventAccumulator(trial.user_attrs["log_dir"]).Reload()
        scalars = set(run.Tags()["scalars"])
        assert {"val/acc", "val/loss", "hp_metric", "train/loss_epoch", "train/acc"} <= scalars
        # Each run counts its own steps and epochs, from where the trial joined, as an unfused trial's does.
        epochs = range(trial.user_attrs["epochs_trained"])
        assert [e.step for e in run.Scalars("val/acc")] == [steps_per_epoch * (epoch + 1) - 1 for epoch in epochs]
        assert [e.value for e in run.Scalars("epoch")][-1] == epochs[-1]
        if trial.state == TrialState.COMPLETE:  # a pruned one may stop reporting mid-epoch, at a check
            assert [e.value for e in run.Scalars("val/acc")] == pytest.approx(epoch_values(trial))
        assert (Path(trial.user_attrs["log_dir"]) / "config.yaml").is_file()
        if trial.state == TrialState.COMPLETE:
            model = MLPClassifier.load_from_checkpoint(trial.user_attrs["best_checkpoint"])
            epoch = torch.load(trial.user_attrs["best_checkpoint"], weights_only=False)["epoch"]
            assert Path(trial.user_attrs["best_checkpoint"]).name.startswith(f"epoch{epoch:02d}-")
            assert epoch_values(trial)[epoch] == trial.value
            assert model.hparams.lr == pytest.approx(trial.params["lr"])
            assert (model.hparams.depth, model.hparams.width) == (trial.params["depth"], trial.params["width"])
            assert trial.value == max(epoch_values(trial))
            # scripts/ensemble.py's path, which rebuilds the split from the data settings the checkpoint holds
            tested = final.test_checkpoints([trial.user_attrs["best_checkpoint"]])
            assert tested["val_acc"] == pytest.approx(trial.value, abs=1e-6)
    assert summary["best_val_acc"] > 0.9 and 0.9 < summary["test_acc"] <= 1.0
    assert summary["epochs_trained"] == sum(t.user_attrs["epochs_trained"] for t in trials)
    report_dir = tmp_path / "logs" / "tune" / "test"
    assert json.loads((report_dir / "report.json").read_text()) == summary


@pytest.mark.parametrize("refill", [True, False])
def test_a_freed_place_is_refilled_only_while_may_refill_allows(synthetic_dir, tmp_path, monkeypatch, refill):
    if not refill:  # as at --timeout's deadline
        start_trials = Trials.start_trials
        never = lambda self, study, _: start_trials(self, study, lambda: False)  # noqa: E731
        monkeypatch.setattr(Trials, "start_trials", never)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="test", storage=url, direction="maximize")
    study.enqueue_trial({"lr": 0.1, **FAST_TRIAL, "epochs": 1})  # leaves after epoch 0
    study.enqueue_trial({"lr": 0.1, **FAST_TRIAL})  # 2 epochs
    tune.main([*tune_args(synthetic_dir, tmp_path, n_trials=3), "--pruner=none", "--fuse=2"])
    trials = optuna.load_study(study_name="test", storage=url).trials
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    # Trial 2 joins trial 1's Trainer for its epoch 1, or waits for it to finish and starts a Trainer of its own.
    assert (trials[2].datetime_start < trials[1].datetime_complete) == refill


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_worker_whose_free_place_another_took_first_trains_nothing_and_looks_again(tmp_path):
    """run_trials saw a place free, and another worker took it before this one asked (as a retry taken by
    another survivor in the three-worker PostgreSQL test): start_trials returns, with no trial and no error."""
    study = open_study("s", f"sqlite:///{tmp_path / 'study.db'}", "none", SearchSpace().epochs[0], seed=0)
    taken = study.ask()  # the other worker's trial, in the study's only place
    objective = Trials(SearchSpace(), [], "s", n_trials=1, fuse=2, budget=Budget())
    objective.start_trials(study, may_refill=lambda: True)
    assert [t.number for t in study.trials] == [taken.number] and objective.ran == []


def test_a_trial_another_worker_failed_as_stale_stops_and_is_told_nothing_more(tmp_path):
    """Its heartbeat came late (a loaded machine, a journal file's lock), so another worker failed it and retried
    it; the worker still training it stops it at the epoch's end and tells the study nothing, with no traceback."""
    from mlp.trials import EpochEnds, RunEnd

    study = open_study("s", f"sqlite:///{tmp_path / 'study.db'}", "none", SearchSpace().epochs[0], seed=0)
    trial = study.ask()
    study.tell(trial.number, state=TrialState.FAIL)  # the other worker's doing
    assert EpochEnds(trial).judge(0, 3, 0.5, set(), lambda seconds: False) == "stale"
    for end in (RunEnd("stale", "", "", None), RunEnd("finished", "", "x.ckpt", 0.5)):  # also if it ended then
        running = [trial]
        Trials.tell(study, trial, end, running)
        assert running == [] and study.trials[0].state == TrialState.FAIL and study.trials[0].value is None


def test_a_trial_failed_by_ctrl_c_is_asked_again_once_in_its_place_with_its_parameters(tmp_path, monkeypatch):
    """The docs' "marked failed at once (Ctrl-C), then retried once": trial 0, fit's own configuration, was lost to a
    Ctrl-C in its first minute, and never trained on the rerun."""
    study = open_study("s", f"sqlite:///{tmp_path / 'study.db'}", "none", SearchSpace().epochs[0], seed=0,
                       first={"lr": 0.1})
    objective = Trials(SearchSpace(), [], "s", n_trials=2, fuse=1, budget=Budget())

    def ctrl_c(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(objective, "train", ctrl_c)
    for _ in range(2):  # the trial, then its retry: interrupted again, it is not queued a third time
        objective.start_trials(study, may_refill=lambda: True)
        assert objective.interrupted
    original, retry = study.trials
    assert original.params["lr"] == 0.1 and original.state == TrialState.FAIL and original.user_attrs["interrupted"]
    assert retry.params == original.params and retry.state == TrialState.FAIL
    assert place(retry) == 0


@pytest.mark.parametrize("fuse", ["0", "-2"])
def test_fuse_below_one_is_a_clear_error_before_any_trial(synthetic_dir, tmp_path, fuse):
    with pytest.raises(UserError, match="--fuse must be >= 1"):
        tune.main([*tune_args(synthetic_dir, tmp_path, n_trials=1), f"--fuse={fuse}"])
    assert not (tmp_path / "study.db").exists()


def test_a_loss_scaler_with_fuse_is_refused_with_the_reason_and_auto_trains_one_at_a_time(synthetic_dir, tmp_path):
    """16-mixed on a GPU scales the loss: torch's GradScaler skips the optimiser's whole step when any gradient
    overflows, so one stacked trial's overflow would skip every other trial's step too. Lightning gives the CPU
    bf16-mixed, which has no scaler, so a CPU scaler stands in for the GPU's here."""
    cli = build_cli([f"--data.data_dir={synthetic_dir}", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    cli.trainer.strategy.precision_plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    space = SearchSpace().pin(["width"])
    with pytest.raises(UserError, match="16-mixed with --fuse: its one loss scaler would skip every stacked trial"):
        check_fusable(2, space, cli)
    assert auto_fuse(space, cli, None, 1000)[0] == 1


@pytest.mark.parametrize("fuse", [1, 2])
def test_gradient_clipping_is_refused_with_the_reason_whatever_the_fuse(synthetic_dir, tmp_path, fuse):
    # One trial is a stack of one: Lightning clips no gradient of an optimiser the module steps itself.
    args = [*tune_args(synthetic_dir, tmp_path, n_trials=1), f"--fuse={fuse}", "--trainer.gradient_clip_val=1"]
    with pytest.raises(UserError, match="tune.py steps each stacked trial's optimiser itself"):
        tune.main(args)
    assert not (tmp_path / "study.db").exists()


def test_a_stack_too_big_for_the_gpu_is_refused_naming_a_k_that_fits(synthetic_dir, tmp_path):
    cli = build_cli([f"--data.data_dir={synthetic_dir}", f"--trainer.logger.init_args.save_dir={tmp_path}",
                     "--data.batch_size=256"])
    space = SearchSpace()
    per_model = stack_bytes(1, space.depth[1], space.width[1], 256, "sgd", 4)
    assert stack_bytes(8, space.depth[1], space.width[1], 256, "sgd", 4) == 8 * per_model
    free = 10 * per_model + DATASET_BYTES
    check_stack_fits(10, space, cli, free)
    with pytest.raises(UserError, match="--fuse 16: .* --fuse 10 fits"):
        check_stack_fits(16, space, cli, free)
    with pytest.raises(UserError, match="even one does not fit"):
        check_stack_fits(2, space, cli, 1000)
    check_stack_fits(1024, space, cli, None)  # on the CPU: no estimate


def test_fuse_auto_picks_as_many_trials_as_the_gpu_holds_up_to_128_and_a_quarter_of_the_study(synthetic_dir, tmp_path):
    cli = build_cli([f"--data.data_dir={synthetic_dir}", f"--trainer.logger.init_args.save_dir={tmp_path}",
                     "--data.batch_size=256"])
    space = SearchSpace()
    per_model = stack_bytes(1, space.depth[1], space.width[1], 256, "sgd", 4)
    assert auto_fuse(space, cli, 10 * per_model + DATASET_BYTES, 1000)[0] == 10
    assert auto_fuse(space, cli, 1000 * per_model + DATASET_BYTES, 1000)[0] == AUTO_FUSE_MAX == 128
    assert auto_fuse(space, cli, 1000, 1000)[0] == 1  # not even one: trials go unfused (and the first one says why)
    # At most a quarter of the study's trials at once, rounded up, so that TPE learns from finished ones.
    assert auto_fuse(space, cli, 1000 * per_model + DATASET_BYTES, 30) == (
        8, "128 at most, and as many as fit in the GPU's free memory; at most a quarter of the 30 trials, so that "
        "TPE learns from finished ones")
    # On the CPU: one at a time while widths are searched, CPU_FUSE when all trials have one width.
    assert auto_fuse(space, cli, None, 1000)[0] == 1
    assert auto_fuse(space.pin(["width"]), cli, None, 1000)[0] == CPU_FUSE == 8
    assert auto_fuse(replace(space, width=(64, 64)), cli, None, 1000)[0] == CPU_FUSE
    assert auto_fuse(replace(space, width=(64, 65)), cli, None, 1000)[0] == 1
    assert auto_fuse(space.pin(["width"]), cli, None, 30)[0] == 8
    assert auto_fuse(space.pin(["width"]), cli, None, 8)[0] == 2


def test_by_default_trials_of_searched_widths_train_one_at_a_time_on_the_cpu_and_it_says_so(
    synthetic_dir, tmp_path, capsys
):
    summary = tune.main(tune_args(synthetic_dir, tmp_path, n_trials=1))  # searches widths 8 to 16
    assert "--fuse auto: 1 (one trial at a time on the CPU" in capsys.readouterr().out
    assert summary["fuse_this_run"] == 1
    assert summary["trials"] == {"complete": 1} or summary["trials"] == {"pruned": 1}


def test_by_default_trials_of_one_width_train_stacked_on_the_cpu(synthetic_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("mlp.trials.FusedClassifier", RecordsRefills)
    monkeypatch.setattr(RecordsRefills, "refills", [])
    monkeypatch.setattr(RecordsRefills, "stacks_at_start", [])
    args = tune_args(synthetic_dir, tmp_path, n_trials=5)
    args[args.index("--width") + 1 : args.index("--width") + 3] = ["12", "12"]
    args[args.index("--lr") + 1 : args.index("--lr") + 3] = ["0.05", "0.2"]  # every trial learns
    args[args.index("--epochs") + 1 : args.index("--epochs") + 3] = ["1", "1"]

    summary = tune.main([*args, "--pruner=none"])

    out = capsys.readouterr().out
    assert "--fuse auto: 2 (on the CPU, trials of one width share stacks; 8 at once measured 1.4-1.6x as fast as one " \
           "at a time; at most a quarter of the 5 trials" in out
    assert summary["fuse_this_run"] == 2 and summary["trials"] == {"complete": 5}
    assert RecordsRefills.stacks_at_start == [(1, [12, 12])]  # two trials in one stack, refilled as they finish


def test_a_fuse_that_is_neither_a_number_nor_auto_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        tune.main(["--fuse=many"])
    assert "--fuse: K is a whole number of trials or auto, got 'many'" in capsys.readouterr().err


def test_heartbeats_keep_every_running_trial_of_a_group_alive(tmp_path, monkeypatch):
    monkeypatch.setattr("mlp.study.HEARTBEAT_SECONDS", 0.2)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'beat.db'}", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage)
    trials = [study.ask() for _ in range(3)]
    with Heartbeats(study, trials):
        time.sleep(3)  # past the grace period, which SQLite's clock counts in whole seconds
        assert storage._get_stale_trial_ids(study._study_id) == []
    time.sleep(4)
    assert sorted(storage._get_stale_trial_ids(study._study_id)) == sorted(t._trial_id for t in trials)


def test_a_trial_that_joins_a_running_group_beats_at_once(tmp_path, monkeypatch):
    """A freed place's trial is asked while the others train; a worker killed before the thread's next beat must
    not leave it unbeaten, as SQLite and PostgreSQL never count a trial that never beat as stale."""
    monkeypatch.setattr("mlp.study.HEARTBEAT_SECONDS", 60)  # the thread beats once, at the start
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'beat.db'}", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage)
    with Heartbeats(study, [study.ask()]) as beats:
        joining = study.ask()
        beats.join([joining])
        assert beats.trials[-1] is joining
        time.sleep(3.5)  # past the grace period, in SQLite's whole seconds: as if the worker had died
        assert joining._trial_id in storage._get_stale_trial_ids(study._study_id)


def test_a_failed_heartbeat_is_logged_and_tried_again_and_the_trials_stay_alive(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("mlp.study.HEARTBEAT_SECONDS", 0.2)
    monkeypatch.setattr("mlp.study.RETRY_SECONDS", 0.1)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'beat.db'}", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage)
    trials = [study.ask() for _ in range(2)]
    record_heartbeat, failures = storage.record_heartbeat, []

    def unreachable_once(trial_id: int) -> None:
        if not failures:
            failures.append(trial_id)
            raise optuna.exceptions.StorageInternalError("the database is unreachable")
        record_heartbeat(trial_id)

    monkeypatch.setattr(storage, "record_heartbeat", unreachable_once)
    monkeypatch.setattr(logging.getLogger("optuna"), "propagate", True)  # to caplog
    with Heartbeats(study, trials) as beats:
        time.sleep(3)  # past the grace period, which SQLite's clock counts in whole seconds
        assert beats.thread.is_alive()
        assert storage._get_stale_trial_ids(study._study_id) == []
    assert failures and "Heartbeat of trial 0 failed (the database is unreachable); trying again." in caplog.text


def group_training(tmp_path: Path) -> bool:
    """True once three trials are running together and have each reported an epoch."""
    if not (tmp_path / "study.db").exists():  # connecting would create the file before the tune process does
        return False
    trials = created_trials(f"sqlite:///{tmp_path / 'study.db'}", "faults")
    return len(trials) == 3 and all(t.state == TrialState.RUNNING and t.intermediate_values for t in trials)


def test_sigint_of_a_fused_study_fails_and_queues_again_every_running_trial(synthetic_dir, tmp_path):
    process = start("tune.py", [*slow_tune_args(synthetic_dir, tmp_path, n_trials=3), "--fuse=3"])
    url = f"sqlite:///{tmp_path / 'study.db'}"
    wait_for(process, lambda: group_training(tmp_path), "three trials training together")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0 and "Traceback" not in stderr
    assert "run the same command again to continue" in stderr
    trials = created_trials(url, "faults")
    assert [t.state for t in trials] == [TrialState.FAIL] * 3 + [TrialState.WAITING] * 3
    assert all(t.user_attrs["interrupted"] for t in trials[:3])
    retries = [(t.params, t.system_attrs["failed_trial"]) for t in trials[3:]]
    assert retries == [(t.params, t.number) for t in trials[:3]]


def test_sigkill_of_a_fused_worker_fails_and_retries_each_of_its_trials_once(synthetic_dir, tmp_path, monkeypatch):
    quick_heartbeat = "import mlp.study; mlp.study.HEARTBEAT_SECONDS = 1; mlp.study.GRACE_SECONDS = 2"
    args = [*slow_tune_args(synthetic_dir, tmp_path, n_trials=3), "--fuse=3"]
    process = start("tune.py", args, patch=quick_heartbeat)
    wait_for(process, lambda: group_training(tmp_path), "three trials training together")
    process.kill()
    process.communicate(timeout=300)
    time.sleep(3)  # let their heartbeats go stale

    monkeypatch.setattr("mlp.study.HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr("mlp.study.GRACE_SECONDS", 2)
    tune.main([*args, "--quiet"])  # the same study again, in this process
    trials = created_trials(f"sqlite:///{tmp_path / 'study.db'}", "faults")
    killed = trials[:3]
    assert [t.state for t in killed] == [TrialState.FAIL] * 3
    for trial in killed:
        retries = [t for t in trials if t.system_attrs.get("failed_trial") == trial.number]
        assert len(retries) == 1 and retries[0].params == trial.params
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 3
    assert TrialState.RUNNING not in [t.state for t in trials]


def test_hyperband_judges_fused_trials_each_on_its_own_with_depth_and_width_pinned(synthetic_dir, tmp_path):
    args = tune_args(synthetic_dir, tmp_path, n_trials=3)
    for flag in ("--depth", "--width"):  # pinned by fit flags instead: all trials share one group
        del args[args.index(flag) : args.index(flag) + 3]
    summary = tune.main([*args, "--model.depth=1", "--model.width=12", "--fuse=3", "--pruner=hyperband"])
    study = optuna.load_study(study_name="test", storage=f"sqlite:///{tmp_path / 'study.db'}")
    trials = study.trials
    assert len(trials) == 3 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert all("depth" not in t.params for t in trials)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    runs = [MLPClassifier.load_from_checkpoint(t.user_attrs["best_checkpoint"]) for t in complete]
    assert runs and all((m.hparams.depth, m.hparams.width) == (1, 12) for m in runs)
    assert all(1 <= t.user_attrs["epochs_trained"] <= t.params["epochs"] for t in trials)
    assert summary["trials"] == {state.name.lower(): sum(t.state == state for t in trials) for state in
                                 {t.state for t in trials}}


REFIT_SPACE = SearchSpace(lr=(1e-3, 1e30), epochs=(1, 3), depth=(1, 2), width=(8, 16), weight_decay=(1e-5, 1e-3),
                          dropout=(0.0, 0.5), label_smoothing=(0.0, 0.2))


def refit_study(name: str, configs: list[dict], tmp_path: Path, synthetic_dir: Path, monkeypatch) -> optuna.Study:
    """A study whose trial k completed with value k / 10 after training `configs[k]` (its config.yaml saved, as its
    own fit saves it, which its refit rebuilds; a config's `backward` is its --model.backward), every run of the
    test drawing the same batches."""
    from optuna.distributions import FloatDistribution, IntDistribution

    from mlp.data import IndexBatches
    from mlp.search import LOG_SCALE, suggest, trial_args
    from mlp.trials import save_config

    distributions = {  # what search.suggest draws from
        name: (IntDistribution if isinstance(low, int) else FloatDistribution)(low, high, log=name in LOG_SCALE)
        for name, (low, high) in REFIT_SPACE.searched().items()
    }
    fit_args = [f"--data.data_dir={synthetic_dir}", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
                "--data.val_size=100", "--data.batch_size=32", "--trainer.precision=64-true"]
    # A stack draws one batch order for all its models, after other random draws than a lone run makes; to
    # compare weights, every run here gets the same batches: one fixed permutation, every epoch.
    monkeypatch.setattr(IndexBatches, "__iter__", lambda self: iter(
        torch.randperm(self.size, generator=torch.Generator().manual_seed(0)).split(self.batch_size)
        if self.shuffle else torch.arange(self.size).split(self.batch_size)))
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{tmp_path / 'study.db'}", direction="maximize")
    for value, config in enumerate(configs):
        params = {key: v for key, v in config.items() if key != "backward"} | {"dropout": 0.0}
        flags = suggest(optuna.trial.FixedTrial(params), REFIT_SPACE)
        if "backward" in config:
            flags["model.backward"] = config["backward"]
        trained = build_cli(trial_args(fit_args, flags, name, f"trial_{value}"))
        save_config(trained)
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value / 10,
                                                  user_attrs={"log_dir": trained.trainer.log_dir}))
    return study


def test_fused_refits_train_each_configuration_exactly_as_its_unfused_refit(synthetic_dir, tmp_path, monkeypatch):
    from mlp.data import FashionMNISTDataModule
    from mlp.final import accuracy, refit_trials

    configs = [  # lr, epochs, width, weight decay and label smoothing differ; one has another depth
        {"lr": 0.05, "epochs": 2, "depth": 1, "width": 8, "weight_decay": 1e-4, "label_smoothing": 0.1},
        {"lr": 0.2, "epochs": 3, "depth": 1, "width": 16, "weight_decay": 1e-5, "label_smoothing": 0.0},
        {"lr": 0.1, "epochs": 1, "depth": 2, "width": 12, "weight_decay": 1e-3, "label_smoothing": 0.0},
        {"lr": 0.3, "epochs": 2, "depth": 1, "width": 10, "weight_decay": 1e-4, "label_smoothing": 0.0},
    ]
    results = {}
    for name, fuse in (("alone", 1), ("stacked", 2)):
        study = refit_study(name, configs, tmp_path, synthetic_dir, monkeypatch)
        results[name] = refit_trials(study, [0, 1, 2, 3], fuse)
        assert [r["trial"] for r in results[name]] == [0, 1, 2, 3]
        assert study.user_attrs["refit_1"] == results[name][1]  # cached in the study

    # At most 2 at once: trials 0 and 1 (depth 1), then 2 (depth 2) and 3 (depth 1), a stack per depth.
    assert [r.get("stacked_with") for r in results["stacked"]] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    everything = FashionMNISTDataModule(str(synthetic_dir), val_size=0)
    everything.setup("test")
    x, y = everything.test_set.tensors
    for alone, stacked, config in zip(results["alone"], results["stacked"], configs):
        # The unfused refit's run, file name and figures; its weights at the end of its own last epoch.
        last = f"epoch{config['epochs'] - 1:02d}.ckpt"
        assert Path(alone["checkpoint"]).name == Path(stacked["checkpoint"]).name == last
        assert f"stacked/refit_trial_{stacked['trial']}" in stacked["checkpoint"]
        assert (Path(stacked["checkpoint"]).parent.parent / "config.yaml").is_file()
        assert stacked["epochs"] == alone["epochs"] == config["epochs"] and stacked["train_images"] == 800
        model = MLPClassifier.load_from_checkpoint(stacked["checkpoint"])
        searched = ("lr", "depth", "width")
        assert {k: model.hparams[k] for k in searched} == {k: config[k] for k in searched}
        assert stacked["test_acc"] == pytest.approx(accuracy(checkpoint_softmax(stacked["checkpoint"], x), y), abs=1e-6)
        assert stacked["test_acc"] == alone["test_acc"] > 0.5  # it learned: chance is 0.1
        weights = [MLPClassifier.load_from_checkpoint(r["checkpoint"]).net.state_dict() for r in (alone, stacked)]
        for key, value in weights[0].items():
            torch.testing.assert_close(weights[1][key], value, rtol=1e-6, atol=1e-6)
    # The refit ensemble is tested through test_checkpoints, which rebuilds the all-training-images split from
    # the data settings each checkpoint holds: stacked refits hold them as unfused ones do.
    ensembles = {name: final.test_checkpoints([r["checkpoint"] for r in results[name]]) for name in results}
    assert ensembles["stacked"]["test_acc"] == ensembles["alone"]["test_acc"] > 0.5


def test_a_refit_trained_again_after_an_interruption_logs_beside_the_folder_the_interrupted_one_left(
    synthetic_dir, tmp_path, monkeypatch
):
    """A refit cut off by Ctrl-C is not done, so the rerun trains it again: into a folder of its own, the interrupted
    run's files left as they were, so that TensorBoard and the checkpoints show two runs rather than one mixed."""
    from mlp.final import refit_trials

    configs = [{"lr": 0.1, "epochs": 2, "depth": 1, "width": 8, "weight_decay": 1e-4, "label_smoothing": 0.0}]
    study = refit_study("again", configs, tmp_path, synthetic_dir, monkeypatch)
    interrupted = tmp_path / "logs" / "tune" / "again" / "refit_trial_0"
    (interrupted / "checkpoints").mkdir(parents=True)
    (interrupted / "checkpoints" / "epoch00.ckpt").write_bytes(b"the interrupted run's")
    (refit,) = refit_trials(study, [0], fuse=1)
    folder = Path(refit["checkpoint"]).parent.parent
    assert folder == interrupted.with_name("refit_trial_0.2") and refit["test_acc"] > 0.5  # chance is 0.1
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    assert [p.name for p in interrupted.rglob("*")] == ["checkpoints", "epoch00.ckpt"]
    assert (interrupted / "checkpoints" / "epoch00.ckpt").read_bytes() == b"the interrupted run's"


def test_a_diverged_refit_has_no_test_figure_and_its_refit_ensemble_none_alone_and_stacked_alike(
    synthetic_dir, tmp_path, monkeypatch
):
    """A refit that diverges is not tested and says why; the other refit of its stack is tested as it would be
    alone; and a refit ensemble with a diverged member has no test figure, rather than one validation did not
    choose."""
    from mlp.final import refit_ensemble, refit_trials

    configs = [{"lr": 0.1, "epochs": 2, "depth": 1, "width": 8, "weight_decay": 1e-4, "label_smoothing": 0.0},
               {"lr": 1e30, "epochs": 2, "depth": 1, "width": 8, "weight_decay": 1e-4, "label_smoothing": 0.0}]
    results = {}
    for name, fuse in (("alone", 1), ("stacked", 2)):
        study = refit_study(name, configs, tmp_path, synthetic_dir, monkeypatch)
        results[name] = refit_trials(study, [0, 1], fuse)
        learns, diverged = results[name]
        assert learns["test_acc"] > 0.5  # chance is 0.1
        assert diverged["test_acc"] is None
        assert diverged["why_no_test"] == "the refit diverged (epoch 0: train/loss_epoch = nan is not finite)"
        assert Path(diverged["checkpoint"]).name == "epoch00.ckpt"  # it stopped at the epoch it diverged in
        ensemble = refit_ensemble(study, {"trials": [0, 1]}, Budget(fuse=fuse))
        assert ensemble["diverged"] == [1] and ensemble["test_acc"] is None
        assert ensemble["why_no_test"] == "the refits of trials [1] diverged"
    assert results["stacked"][1]["stacked_with"] == [0, 1]
    assert results["stacked"][0]["test_acc"] == results["alone"][0]["test_acc"]


def test_refits_of_trials_trained_with_different_backwards_train_stacked_as_alone(
    synthetic_dir, tmp_path, monkeypatch
):
    """A study resumed with another --model.backward holds trials of both; their refits share one Trainer (the data
    settings are the same), each model in its own stack, stepped by its own backward."""
    from mlp.final import refit_trials

    config = {"lr": 0.1, "epochs": 2, "depth": 1, "width": 8, "weight_decay": 1e-4, "label_smoothing": 0.1}
    configs = [config | {"backward": "manual"}, config | {"width": 12}]
    results = {}
    for name, fuse in (("alone", 1), ("stacked", 2)):
        study = refit_study(name, configs, tmp_path, synthetic_dir, monkeypatch)
        results[name] = refit_trials(study, [0, 1], fuse)
    assert [r.get("stacked_with") for r in results["stacked"]] == [[0, 1], [0, 1]]
    for alone, stacked, backward in zip(results["alone"], results["stacked"], ["manual", "autograd"]):
        assert stacked["test_acc"] == alone["test_acc"] > 0.5  # chance is 0.1
        weights = [MLPClassifier.load_from_checkpoint(r["checkpoint"]) for r in (alone, stacked)]
        assert [model.hparams.backward for model in weights] == [backward, backward]
        for key, value in weights[0].net.state_dict().items():
            torch.testing.assert_close(weights[1].net.state_dict()[key], value, rtol=1e-6, atol=1e-6)


def test_a_run_without_validation_that_diverges_stops_there_alone_and_stacked_alike(synthetic_dir, tmp_path):
    """A refit holds no validation split: its training loss shows a divergence, to its own guard alone and to
    the stack, which both stop it at that epoch and keep that epoch's weights under the name a refit's has."""
    from mlp.trials import train_runs

    args = [f"--data.data_dir={synthetic_dir}", "--data.val_size=0", "--trainer.max_epochs=3", "--model.depth=1",
            "--model.width=8"]

    def run(version: str, lr: float) -> MLPCLI:
        return build_cli([*args, f"--trainer.logger.init_args.save_dir={tmp_path}",
                          f"--trainer.logger.init_args.version={version}", f"--model.lr={lr}"])

    ends = {}
    train_runs({"alone": run("alone", 1e30)}, args, 1, ends.__setitem__)  # the group's flags, as callers give them
    data = train_runs({"stacked": run("stacked", 1e30), "learns": run("learns", 0.1)}, args, 2, ends.__setitem__)
    for name in ("alone", "stacked"):
        assert ends[name].how == "diverged" and ends[name].detail.startswith("epoch 0: ")
        assert "train/loss_epoch = nan is not finite" in ends[name].detail
        assert ends[name].checkpoint == str(tmp_path / "fit" / name / "checkpoints" / "epoch00.ckpt")
    # The other model of the stack trains on to its last epoch, whose weights it keeps.
    assert ends["learns"] == ("finished", "", str(tmp_path / "fit" / "learns" / "checkpoints" / "epoch02.ckpt"), None)
    assert len(data.train_set) == 800


def test_fuse_auto_stacks_only_a_net_that_stacks_and_fuse_k_refuses_another(synthetic_dir, tmp_path, monkeypatch):
    """A fork's own net (not mlp.net.MLP) trains one trial at a time under auto, and --fuse K says why not."""
    cli = build_cli([f"--data.data_dir={synthetic_dir}", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    space = SearchSpace().pin(["width"])
    assert auto_fuse(space, cli, None, 1000)[0] == CPU_FUSE

    class OwnNet(torch.nn.Module):
        pass

    cli.model.net = OwnNet()
    fuse, why = auto_fuse(space, cli, None, 1000)
    assert fuse == 1 and "OwnNet" in why and "does not run under torch.func.vmap" in why
    with pytest.raises(UserError, match="OwnNet.*use --fuse 1"):
        check_fusable(2, space, cli)
