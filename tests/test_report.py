"""The study's report: figures that compare across machines and --fuse."""

import datetime

import optuna
from optuna.trial import TrialState

from mlp.loading import FINAL_MODELS
from mlp.final import FINAL_CHOICES
from mlp.report import cost

START = datetime.datetime(2026, 1, 1)


def add_trial(study: optuna.Study, start: float, end: float) -> None:
    """A finished trial that ran from `start` to `end` seconds."""
    trial = optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.5)
    trial.datetime_start = START + datetime.timedelta(seconds=start)
    trial.datetime_complete = START + datetime.timedelta(seconds=end)
    study.add_trial(trial)


def test_cost_counts_trials_trained_together_once():
    # Two trials stacked from 0 to 1.5 s (one of them leaves at 1.4 s), a third alone from 2 to 3 s.
    study = optuna.create_study()
    for start, end in ((0, 1.5), (0, 1.4), (2, 3)):
        add_trial(study, start, end)
    assert cost(study)["busy_wall_seconds"] == 2.5
    # The same trials one after another take the sum of their times.
    study = optuna.create_study()
    for start, end in ((0, 1.5), (1.5, 2.9), (3, 4)):
        add_trial(study, start, end)
    assert cost(study)["busy_wall_seconds"] == 3.9


def test_the_typed_loader_of_report_json_knows_every_final_model_the_report_writes():
    assert FINAL_MODELS == FINAL_CHOICES


def test_a_study_without_a_complete_trial_plots_only_its_pruned_curves_and_warns_of_nothing(tmp_path, recwarn):
    import warnings

    from mlp.report import write_plots

    study = optuna.create_study(direction="maximize")
    for values in ([0.1, 0.1], [0.2]):
        study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, params={"lr": 0.1 * len(values)},
                                                  distributions={"lr": optuna.distributions.FloatDistribution(0, 1)},
                                                  intermediate_values=dict(enumerate(values))))
    warnings.simplefilter("always")  # Optuna's and matplotlib's, each about an empty plot
    assert write_plots(study, tmp_path) == ["intermediate_values"]
    assert [str(w.message) for w in recwarn] == []
    assert (tmp_path / "intermediate_values.png").is_file()
    assert write_plots(optuna.create_study(), tmp_path / "none") == []  # no trial: Optuna warned "set up pruning"
    # A search range of one value (--epochs 1 1) plotted as an axis of no height, which matplotlib warned about.
    one_value = {"epochs": optuna.distributions.IntDistribution(1, 1),
                 "lr": optuna.distributions.FloatDistribution(0, 1)}
    for lr in (0.1, 0.2):
        study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=lr, params={"epochs": 1, "lr": lr},
                                                  distributions=one_value, intermediate_values={0: lr}))
    assert "parallel_coordinate" in write_plots(study, tmp_path / "complete")
    assert [str(w.message) for w in recwarn] == []
