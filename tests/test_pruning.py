"""Pruning compares trials at the same fraction of their own schedules, whatever their epoch counts."""

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from mlp.errors import UserError
from mlp.search import SearchSpace, make_pruner, record_intermediate_values

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import pruning  # noqa: E402


def accuracy_at(fraction: float, final: float) -> float:
    """A one-cycle-like learning curve: slow, then fast, then flat near `final`, as a function of schedule done."""
    return 0.1 + (final - 0.1) * min(1.0, 1.6 * fraction) ** 0.5


def run(study: optuna.Study, epochs: int, final: float) -> tuple[optuna.Trial, int | None]:
    """Trains a pretend trial; returns it and the epoch it was pruned at (None if it finished)."""
    trial, previous = study.ask(), None
    for epoch in range(epochs):
        value = accuracy_at((epoch + 1) / epochs, final)
        prune = record_intermediate_values(trial, epoch, epochs, value, previous)
        previous = value
        if prune:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return trial, epoch
    study.tell(trial, value)
    return trial, None


def test_every_tenth_of_a_schedule_gets_a_value_interpolated_between_epochs():
    study = optuna.create_study(direction="maximize")
    _, pruned = run(study, 3, 0.9)
    values = study.trials[0].intermediate_values
    assert pruned is None and sorted(values) == list(range(10, 101, 10))
    # The first epoch's value stands back to step 10; step 50 is halfway between the ends of epochs 1 and 2.
    assert values[10] == values[30] == accuracy_at(1 / 3, 0.9) and values[100] == accuracy_at(1, 0.9)
    assert values[50] == pytest.approx((accuracy_at(1 / 3, 0.9) + accuracy_at(2 / 3, 0.9)) / 2)
    assert study.trials[0].user_attrs["epochs_trained"] == 3


def test_an_epoch_that_crosses_no_tenth_is_neither_reported_nor_judged():
    # 40 epochs of 2.5 % each: the first three cross no tenth, so the first value and the first check end epoch 4.
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    trial = study.ask()
    stops = [record_intermediate_values(trial, epoch, 40, 0.1, None if epoch == 0 else 0.1) for epoch in range(4)]
    assert stops == [False, False, False, True]
    assert study.trials[0].intermediate_values == {10: 0.1} and study.trials[0].user_attrs["epochs_trained"] == 4


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_a_long_schedule_is_judged_against_short_ones_at_the_same_fraction(pruner):
    # Hyperband judges a trial only against the trials of its bracket, which it picks from a hash of the study's
    # name and the trial's number. An unnamed study gets a random name, and 1 name in 300 put the last trial alone
    # in its bracket, never pruned; this name puts both long trials in the bracket of four of the short ones.
    study = optuna.create_study(
        study_name="long-and-short", direction="maximize", pruner=make_pruner(pruner, SearchSpace().epochs[0])
    )
    for final in (0.80, 0.82, 0.84, 0.86, 0.88):
        assert run(study, 5, final)[1] is None or pruner == "hyperband"
    # Per epoch, this trial is behind every short one until its epoch 5; per fraction of schedule it is ahead.
    _, pruned = run(study, 40, 0.89)
    assert pruned is None
    assert study.trials[-1].user_attrs["epochs_trained"] == 40
    # The same long schedule heading for a worse end is pruned, once past the warm-up.
    _, pruned = run(study, 40, 0.70)
    earliest = {"median": 0.3, "hyperband": 0.2}[pruner]  # the warm-up; Hyperband's first rung, one 5-epoch epoch
    assert pruned is not None and earliest <= (pruned + 1) / 40 < 1


def test_median_warm_up_is_a_fraction_of_the_schedule():
    study = optuna.create_study(direction="maximize", pruner=make_pruner("median", SearchSpace().epochs[0]))
    for final in (0.80, 0.82, 0.84, 0.86, 0.88):
        run(study, 10, final)
    _, pruned = run(study, 20, 0.5)
    assert pruned == 5  # the end of epoch 6 of 20 is 30 % of its schedule: the first step after the warm-up


def test_a_trial_that_trained_all_its_epochs_is_never_pruned():
    # Every value is below the threshold: the first epoch's end is pruned, the last epoch's end never is.
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    trial = study.ask()
    assert record_intermediate_values(trial, 0, 2, 0.1, None)
    assert not record_intermediate_values(trial, 1, 2, 0.1, 0.1)
    assert trial.should_prune()  # the pruner would still prune it: only the finished schedule spares it


def test_the_fairness_table_counts_each_group_pruned_at_a_tenth_and_ranks_completed_trials_early_and_late(
    tmp_path, capsys
):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    shift = {"augment_shift": optuna.distributions.IntDistribution(0, 3)}
    steps = range(10, 101, 10)
    for shifted, early, late, pruned_at in [(2, 0.5, 0.9, None), (0, 0.8, 0.85, None), (2, 0.4, 0.4, 30),
                                            (0, 0.7, 0.8, None)]:
        values = {step: early if step < 100 else late for step in steps if pruned_at is None or step <= pruned_at}
        state = optuna.trial.TrialState.PRUNED if pruned_at else optuna.trial.TrialState.COMPLETE
        study.add_trial(optuna.trial.create_trial(
            params={"augment_shift": shifted}, distributions=shift, intermediate_values=values, state=state,
            value=None if pruned_at else late,
        ))

    pruning.main(["--storage", storage, "--study-name", "s"])

    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in capsys.readouterr().out.splitlines()}
    # At 10 %, the shifted trial that completed ranks last of the three and ends first: a slow starter.
    assert rows["10"] == ["2 / 0", "2 / 0", "17 then 83", "67 then 33 |"]
    assert rows["30"][:2] == ["2 / 1", "2 / 0"]  # the shifted trial pruned at 30 %
    assert rows["40"][:2] == ["1 / 0", "2 / 0"]
    pruning.main(["--storage", storage, "--study-name", "s", "--first-trial", "2"])  # the last two trials only
    assert capsys.readouterr().out.splitlines()[4].startswith("| 30 | 1 / 1 | 1 / 0 |")
    # Every trial's number is above -1: all four, where it had taken the last trial alone (a list's [-1:]).
    pruning.main(["--storage", storage, "--study-name", "s", "--first-trial", "-1"])
    assert capsys.readouterr().out.splitlines()[2] == "| 10 | 2 / 0 | 2 / 0 | 17 then 83 | 67 then 33 |"
    for args, said in [(["--storage", str(tmp_path / "none.db")], "no study storage at"),
                       (["--storage", storage, "--study-name", "other"], "no study named 'other'")]:
        with pytest.raises(UserError, match=said):
            pruning.main(args)
    assert not (tmp_path / "none.db").exists()


@pytest.mark.parametrize("slow_starters, pruned_at", [(False, 30), (True, 50)])
def test_where_augmented_trials_compete_with_others_the_median_pruner_judges_from_half_the_schedule(
    slow_starters, pruned_at
):
    study = optuna.create_study(direction="maximize", pruner=make_pruner("median", 5, slow_starters))
    for _ in range(5):
        study.add_trial(optuna.trial.create_trial(
            value=0.8, intermediate_values={step: 0.8 for step in range(10, 101, 10)},
            state=optuna.trial.TrialState.COMPLETE,
        ))
    behind = study.ask()
    judged = []
    for step in range(10, 101, 10):
        behind.report(0.5, step)
        judged.append(behind.should_prune())
    assert judged.index(True) == pruned_at // 10 - 1
    assert SearchSpace.preset("wide").has_slow_starters and not SearchSpace().has_slow_starters


def test_an_output_whose_reader_left_ends_the_script_without_a_word(tmp_path):
    # `pruning.py ... | head -3`: the table's rest meets a closed pipe, which is no error of the user's. The line had
    # said "error: [Errno 32] Broken pipe" and to choose another path with a flag pruning.py does not have.
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=storage)
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w") as closed:
        done = subprocess.run([sys.executable, pruning.__file__, "--storage", storage, "--study-name", "s"],
                              stdout=closed, stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr == ""
