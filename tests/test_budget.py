"""--timeout bounds the whole command: trials stop in time for the final model, which refits only what fits."""

import datetime
import json
import math
import time

import optuna
import pytest
import torch
from optuna.trial import TrialState

from mlp.budget import (
    ENSEMBLE_MAX, EVAL_EPOCHS, FINISH_SECONDS, REFIT_START_SECONDS, SKIPS_IN_A_ROW, Budget
)
from mlp.errors import UserError
from mlp.progress import StudyCounts
from mlp.final import affordable_ensemble
from mlp.fused import FusedClassifier
from tests.test_sweeps import tune, tune_args

START = datetime.datetime(2026, 1, 1)


def trial_of(seconds: float, value: float = 0.5) -> optuna.trial.FrozenTrial:
    trial = optuna.trial.create_trial(state=TrialState.COMPLETE, value=value)
    trial.datetime_start, trial.datetime_complete = START, START + datetime.timedelta(seconds=seconds)
    return trial


class Left(Budget):
    """A budget with a fixed number of seconds left."""

    def __init__(self, seconds: float, refit_scale: float = 1.0, fuse: int = 1) -> None:
        super().__init__(time.time() + seconds, refit_scale, fuse)
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds


def test_a_refit_is_estimated_from_its_trials_time_and_a_gpus_stack_lasts_as_long_as_its_longest_member():
    trials = [trial_of(10), trial_of(30), trial_of(20)]
    alone = Budget(refit_scale=1.1, parallel=True)
    assert alone.refit_seconds(trials) == pytest.approx(3 * REFIT_START_SECONDS + 1.1 * 60)
    stacked = Budget(refit_scale=1.1, fuse=2, parallel=True)  # [10, 30] together, then [20]
    assert stacked.refit_seconds(trials) == pytest.approx(2 * REFIT_START_SECONDS + 1.1 * 50)
    assert alone.refit_seconds(trials, fuse=3) == pytest.approx(REFIT_START_SECONDS + 1.1 * 30)
    # On the CPU a stack's step costs all its members' multiply-adds: stacked refits take as long as one by one.
    assert Budget(refit_scale=1.1, fuse=2).refit_seconds(trials) == alone.refit_seconds(trials)


def test_trials_are_asked_while_time_is_left_before_the_final_models_share():
    best = [trial_of(30, 0.9), trial_of(10, 0.8), trial_of(40, 0.7), trial_of(50, 0.6)]
    reserve = FINISH_SECONDS + 3 * REFIT_START_SECONDS + 80  # the three best trials' refits, not the fourth's
    assert Left(0).reserve(best) == pytest.approx(reserve)
    assert Left(reserve + 0.5).trials_may_start(best) and not Left(reserve - 0.5).trials_may_start(best)
    assert Left(FINISH_SECONDS + 1).trials_may_start([]) and not Left(FINISH_SECONDS - 1).trials_may_start([])
    assert Budget().trials_may_start(best) and not Budget().cuts(math.inf, best)  # no --timeout: nothing stops


def ended_ago(seconds_ago: float, seconds: float, value: float) -> optuna.trial.FrozenTrial:
    """A complete trial of `seconds` that ended `seconds_ago`."""
    trial = optuna.trial.create_trial(state=TrialState.COMPLETE, value=value)
    trial.datetime_complete = datetime.datetime.now() - datetime.timedelta(seconds=seconds_ago)
    trial.datetime_start = trial.datetime_complete - datetime.timedelta(seconds=seconds)
    return trial


def test_the_final_models_share_grows_with_the_epochs_of_the_checkpoints_it_evaluates():
    """Each candidate checkpoint of the ensemble is evaluated on val and test: a share of its own trial's epoch, so
    big nets, a slow machine or a loaded one keep more back, and training stops (`overdue`) that much earlier."""
    best = [trial_of(10 * (j + 1)) for j in range(ENSEMBLE_MAX + 2)]
    for trial in best:
        trial.set_user_attr("epochs_trained", 5)  # 2, 4, 6... s an epoch
    budget = Left(FINISH_SECONDS + 5)
    assert budget.finish_seconds([]) == FINISH_SECONDS and not budget.overdue()
    evaluating = EVAL_EPOCHS * sum(2 * (j + 1) for j in range(ENSEMBLE_MAX))  # the best ENSEMBLE_MAX alone
    assert budget.finish_seconds(best) == pytest.approx(FINISH_SECONDS + evaluating)
    assert budget.overdue() and budget.reserve(best) >= budget.finish
    assert Budget().finish_seconds([trial_of(10)]) == FINISH_SECONDS  # no epochs recorded: nothing to scale


def test_refits_that_did_not_fit_when_their_trials_completed_keep_no_time_back():
    budget = Budget(time.time() + 100)
    # The best trial's refit (32 s) fitted when it ended 10 s ago; with the second's (62 s more), not when it ended.
    best = [ended_ago(10, 30, 0.9), ended_ago(0, 60, 0.8)]
    assert budget.reserve(best) == pytest.approx(FINISH_SECONDS + 32, abs=0.1)
    assert budget.reserve([ended_ago(0, 100, 0.9)]) == FINISH_SECONDS  # its refit never fits: trials get the time


def test_refits_an_earlier_run_made_keep_no_time_back_so_a_rerun_trains_new_trials():
    best = [ended_ago(10, 30, 0.9), ended_ago(0, 20, 0.8)]
    for number, trial in enumerate(best):
        trial.number = number
    reserve = Budget(time.time() + 100).reserve(best)
    assert reserve == pytest.approx(FINISH_SECONDS + 2 * REFIT_START_SECONDS + 50, abs=0.1)
    rerun = Budget(time.time() + 100, refitted=frozenset({0}))
    assert rerun.reserve(best) == pytest.approx(FINISH_SECONDS + REFIT_START_SECONDS + 20, abs=0.1)
    assert Budget(time.time() + 100, refitted=frozenset({0, 1})).reserve(best) == FINISH_SECONDS


def test_a_trial_is_skipped_when_its_estimate_does_not_fit_and_a_run_of_skips_ends_the_asking():
    # 10 s for 5 epochs of 2e6 multiply-adds: 1e-6 s per epoch and multiply-add (the median of the three).
    best = [trial_of(10), trial_of(8), trial_of(40)]
    for trial, (epochs, multiply_adds) in zip(best, [(5, 2e6), (4, 2e6), (5, 2e6)]):
        trial.set_user_attr("epochs_trained", epochs)
        trial.set_user_attr("multiply_adds", multiply_adds)
    spare = 50
    budget = Left(Left(0).reserve(best) + spare)
    assert budget.no_time_for(25, 2e6, best) is None  # 50 s: just fits
    for _ in range(SKIPS_IN_A_ROW - 1):
        assert "about 52 s and 50 s were left" in budget.no_time_for(26, 2e6, best)
    assert budget.trials_may_start(best)
    assert budget.no_time_for(26, 2e6, best) and not budget.trials_may_start(best)
    assert Left(0).no_time_for(10**6, 2e6, []) is None  # nothing known yet: the trial trains, and may be cut
    assert Budget().no_time_for(10**6, 2e6, best) is None


def test_a_running_trial_is_cut_when_its_remaining_epochs_would_eat_the_final_models_time():
    best = [trial_of(10)]
    spare = Left(100).left() - Left(100).reserve(best)
    assert Left(100).cuts(spare + 1, best) and not Left(100).cuts(spare - 1, best)


def ensemble_of(k: int) -> dict:
    """An ensemble as mlp.final.ensemble gives it: four candidates, best k=3 on val, k=1 second best."""
    return {"candidates": [0, 1, 2, 3], "val_acc_by_k": [0.83, 0.82, 0.84, 0.80], "k": k, "trials": [0, 1, 2][:k]}


def study_of_quick_trials() -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    for value in (0.8, 0.7, 0.6, 0.5):
        study.add_trial(trial_of(0, value))
    return study


def test_an_ensemble_whose_refits_fit_is_refit_whole():
    assert affordable_ensemble(study_of_quick_trials(), ensemble_of(3), Budget()) == ensemble_of(3)
    left = Left(FINISH_SECONDS + 6.5)
    assert affordable_ensemble(study_of_quick_trials(), ensemble_of(3), left) == ensemble_of(3)


def test_when_the_ensembles_refits_do_not_fit_the_largest_smaller_one_that_fits_is_refit_not_the_best_on_val():
    study = study_of_quick_trials()
    two = affordable_ensemble(study, ensemble_of(3), Left(FINISH_SECONDS + 2 * REFIT_START_SECONDS + 0.5))
    assert two["trials"] == [0, 1] and two["k"] == 2  # k=1 is better on val, within noise; two refits average more
    assert "ensemble of 3 chosen on val" in two["smaller_than"] and "--timeout" in two["smaller_than"]
    study.set_user_attr("refit_1", {"cached": True})  # a refit already trained costs nothing
    three = affordable_ensemble(study, ensemble_of(3), Left(FINISH_SECONDS + 2 * REFIT_START_SECONDS + 0.5))
    assert three == ensemble_of(3)


def test_when_no_refit_fits_there_is_no_ensemble_to_refit_and_it_says_why():
    none = affordable_ensemble(study_of_quick_trials(), ensemble_of(3), Left(FINISH_SECONDS + 1))
    assert none["trials"] == [] and "--timeout were left" in none["why_none"]


@pytest.mark.parametrize("timeout, said", [("5", "--timeout 5 leaves no time for trials"),
                                           ("nan", "--timeout is a number of seconds, got nan")])  # "no time" too
def test_a_timeout_that_leaves_no_time_for_trials_is_a_clear_error(synthetic_dir, tmp_path, timeout, said):
    with pytest.raises(UserError, match=said):
        tune.main([*tune_args(synthetic_dir, tmp_path, n_trials=1), f"--timeout={timeout}"])


@pytest.mark.parametrize("fuse", ["1", "2"])
def test_trials_that_cannot_finish_in_time_are_cut_after_their_epoch_and_counted_as_pruned(
    synthetic_dir, tmp_path, monkeypatch, fuse
):
    monkeypatch.setattr(Budget, "cuts", lambda self, seconds, best_first: True)  # never time for one more epoch
    args = tune_args(synthetic_dir, tmp_path, n_trials=2)
    args[args.index("--epochs") + 1 : args.index("--epochs") + 3] = ["3", "3"]
    args[args.index("--lr") + 1 : args.index("--lr") + 3] = ["0.05", "0.2"]  # no trial diverges
    summary = tune.main([*args, "--pruner=none", f"--fuse={fuse}", "--quiet"])
    trials = optuna.load_study(study_name="test", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    assert [t.user_attrs["epochs_trained"] for t in trials] == [1, 1]
    assert summary["cut"] == {str(t.number): "after epoch 1 of 3: the --timeout budget left no time for the rest"
                              for t in trials}


def test_places_that_a_budget_cut_frees_are_not_refilled_and_the_next_stack_is_half_as_large(
    synthetic_dir, tmp_path, monkeypatch
):
    """Trials joining a stack whose pace a cut showed too slow would be cut in turn after an epoch, each using up a
    trial of the study's --n-trials: a stack of 8 at --timeout 90 went through all 30 that way."""
    monkeypatch.setattr(Budget, "cuts", lambda self, seconds, best_first: True)  # never time for one more epoch
    joined = []
    add = FusedClassifier.add
    monkeypatch.setattr(FusedClassifier, "add", lambda module, model, epochs, name, logger=None: (
        joined.append(name), add(module, model, epochs, name, logger)))
    args = tune_args(synthetic_dir, tmp_path, n_trials=4)
    args[args.index("--epochs") + 1 : args.index("--epochs") + 3] = ["3", "3"]
    args[args.index("--lr") + 1 : args.index("--lr") + 3] = ["0.05", "0.2"]  # no trial diverges
    summary = tune.main([*args, "--pruner=none", "--fuse=2", "--quiet"])
    assert summary["trials"] == {"pruned": 4} and len(summary["cut"]) == 4
    assert joined == []  # each stack was asked afresh, and half as large after the budget cut its trials:
    trials = optuna.load_study(study_name="test", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert trials[1].datetime_start < trials[0].datetime_complete  # 0 and 1 together
    assert trials[2].datetime_complete <= trials[3].datetime_start  # then one at a time


@pytest.mark.parametrize("timeout", [None, "100000"])
def test_with_a_timeout_the_first_trial_trains_alone_until_one_completes(synthetic_dir, tmp_path, timeout):
    """In a stack a trial trains at the stack's pace (on the CPU K times slower): fit's own run, trial 0, was cut in
    a stack of 8 at --timeout 90 that it fitted in alone, and the study answered below fit."""
    args = tune_args(synthetic_dir, tmp_path, n_trials=3)
    args[args.index("--lr") + 1 : args.index("--lr") + 3] = ["0.05", "0.2"]  # no trial diverges
    summary = tune.main([*args, "--pruner=none", "--fuse=2", "--quiet", *([f"--timeout={timeout}"] if timeout else [])])
    assert summary["trials"] == {"complete": 3}
    first, second, _ = optuna.load_study(study_name="test", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert (second.datetime_start >= first.datetime_complete) == bool(timeout)


def test_when_the_refits_do_not_fit_the_answer_falls_back_to_the_ensemble_and_the_report_says_why(
    synthetic_dir, tmp_path, monkeypatch
):
    # Every refit would take longer than any budget: no time is kept back for them, and all the trials run.
    monkeypatch.setattr("mlp.budget.REFIT_START_SECONDS", 1e6)
    summary = tune.main([*tune_args(synthetic_dir, tmp_path, n_trials=3), "--timeout=100000", "--quiet"])
    final = summary["final"]
    assert sum(summary["trials"].values()) == 3 and final["answer"] == "ensemble"
    assert final["fallback"].startswith("refit_ensemble has no test figure (its refits would take about 1000")
    assert "--timeout were left" in final["refit"]["why_no_test"]
    assert not any(key.startswith("refit_") for key in optuna.load_study(
        study_name="test", storage=f"sqlite:///{tmp_path / 'study.db'}").user_attrs)
    report = json.loads((tmp_path / "logs" / "tune" / "test" / "report.json").read_text())
    assert report["final"]["answer"] == "ensemble"


@pytest.mark.parametrize("fuse", ["1", "2"])
def test_past_the_time_for_trials_every_running_trial_stops_at_once_mid_epoch(synthetic_dir, tmp_path, monkeypatch,
                                                                               fuse, capsys):
    monkeypatch.setattr(Budget, "overdue", lambda self: True)
    args = tune_args(synthetic_dir, tmp_path, n_trials=2)
    args[args.index("--lr") + 1 : args.index("--lr") + 3] = ["0.05", "0.2"]  # no trial diverges
    summary = tune.main([*args, "--pruner=none", f"--fuse={fuse}", "--quiet"])
    trials = optuna.load_study(study_name="test", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    assert all("epochs_trained" not in t.user_attrs and not t.intermediate_values for t in trials)  # no epoch ended
    assert set(summary["cut"].values()) == {"in an epoch: the --timeout budget's time for trials was over"}
    assert ("no trial completed, so there is no answer: --timeout cut or skipped 2 trials; give it more seconds"
            in capsys.readouterr().out)


@pytest.mark.parametrize("fuse", ["1", "2"])
def test_trials_too_long_for_the_time_left_are_skipped_as_no_failure_until_a_run_of_them_ends_the_study(
    synthetic_dir, tmp_path, monkeypatch, fuse
):
    def too_long(budget: Budget, epochs: int, multiply_adds: int, best_first: list) -> str:
        budget.skipped_in_a_row += 1
        return "too long"

    monkeypatch.setattr(Budget, "no_time_for", too_long)
    summary = tune.main([*tune_args(synthetic_dir, tmp_path, n_trials=30), f"--fuse={fuse}", "--quiet"])
    trials = optuna.load_study(study_name="test", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    # Trials are asked a stack's free places at a time.
    assert SKIPS_IN_A_ROW <= len(trials) < SKIPS_IN_A_ROW + int(fuse)
    assert all(t.state == TrialState.FAIL for t in trials)
    assert summary["skipped"] == {str(t.number): "too long" for t in trials}
    assert summary["trials"] == {"skipped (budget)": len(trials)}  # not counted as failures in the report either
    assert str(StudyCounts.of(trials)).startswith("pruned 0, failed 0,")
    assert not (tmp_path / "logs" / "tune" / "test" / "trial_0").exists()  # a skipped trial leaves no run


def test_a_rerun_of_a_finished_study_with_more_trials_and_a_timeout_adds_them(synthetic_dir, tmp_path):
    """The README's "rerun to continue": the first run's refits and tests are reused, not kept back for, so the
    second run's budget goes to its new trials (it once ran none, keeping its time for refits that existed)."""
    tune.main([*tune_args(synthetic_dir, tmp_path, n_trials=2), "--quiet"])
    summary = tune.main([*tune_args(synthetic_dir, tmp_path, n_trials=4), "--timeout=120", "--quiet"])
    trials = optuna.load_study(study_name="test", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 4
    assert summary["wall_seconds_this_run"] > 0 and summary["test_acc"] is not None


def test_time_the_trials_could_not_use_goes_to_more_seeds_of_the_ensembles_configurations(
    synthetic_dir, tmp_path, monkeypatch
):
    """Once the budget stops the trials, the refit ensemble averages further runs of its configurations, each
    seeded apart, while they fit in the time left (here up to 4 runs); a study that ends on --n-trials adds none."""
    monkeypatch.setattr("mlp.final.REFIT_MEMBERS_MAX", 4)
    monkeypatch.setattr(Budget, "trials_may_start", lambda self, best_first: len(best_first) < 2)
    args = tune_args(synthetic_dir, tmp_path, n_trials=30)
    args[args.index("--lr") + 1 : args.index("--lr") + 3] = ["0.05", "0.2"]  # no trial diverges
    final = tune.main([*args, "--pruner=none", "--timeout=100000", "--quiet"])["final"]
    members = final["refit_ensemble"]
    assert final["answer"] == "refit_ensemble" and len(members["trials"]) < len(members["checkpoints"]) == 4
    assert sum(members["seeds_per_trial"].values()) == 4 and set(members["seeds_per_trial"]) == {
        str(n) for n in members["trials"]}
    study = optuna.load_study(study_name="test", storage=f"sqlite:///{tmp_path / 'study.db'}")
    first = members["trials"][0]
    runs = [study.user_attrs[key] for key in (f"refit_{first}", f"refit_{first}_seed1")]
    assert all(run["test_acc"] is not None for run in runs) and runs[1]["seed_round"] == 1
    weights = [torch.load(run["checkpoint"], weights_only=True)["state_dict"] for run in runs]
    assert any(not torch.equal(weights[0][name], weights[1][name]) for name in weights[0])  # another seed

    monkeypatch.setattr(Budget, "trials_may_start", lambda self, best_first: True)
    ended_on_n_trials = tune.main([*tune_args(synthetic_dir, tmp_path / "n", n_trials=2), "--timeout=100000",
                                   "--quiet"])["final"]["refit_ensemble"]
    assert len(ended_on_n_trials["checkpoints"]) == len(ended_on_n_trials["trials"])
