"""What a study keeps about each trial in Optuna's user attributes, every name declared once here: written by
`record`, read as a typed `TrialRecord`; and how a run ends (`Ending`)."""

from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

import optuna
from optuna.trial import FrozenTrial


class Ending(StrEnum):
    """How a trial's or a refit's run ended."""

    FINISHED = "finished"  # trained all its epochs; its value is its best val/acc
    PRUNED = "pruned"  # stopped by the pruner
    DIVERGED = "diverged"  # its loss was not finite
    CUT = "cut"  # stopped for the --timeout budget
    SURPLUS = "surplus"  # the study had no place for it: another worker's trial, or a retry, took it
    STALE = "stale"  # another worker failed it (its heartbeat late) and its retry has its place


@dataclass(frozen=True)
class TrialRecord:
    """A trial's user attributes; each is absent (its default here) until the trial writes it."""

    log_dir: str = ""  # its TensorBoard folder, with its config.yaml and checkpoints/
    multiply_adds: int = 0  # its net's per example, the unit of its cost
    worker: str = ""  # the host:pid that trained it
    epochs_trained: int = 0
    best_checkpoint: str = ""  # its best by val/acc, once it finished
    interrupted: bool = False  # failed by Ctrl-C
    surplus: bool = False  # failed, as no place in the study was left for it: counts as no failure
    skipped: str = ""  # failed before training, as too long for the --timeout budget: why
    diverged: str = ""  # pruned when its loss was not finite: when and what
    cut: str = ""  # pruned for the --timeout budget: when

    @classmethod
    def of(cls, trial: FrozenTrial | optuna.Trial) -> "TrialRecord":
        return cls(**{name: value for name, value in trial.user_attrs.items() if name in FIELDS})

    @property
    def counts_as_failure(self) -> bool:
        """Whether, if the trial failed, that was a failure: not when it had no place, or no time."""
        return not (self.surplus or self.skipped)


FIELDS = frozenset(field.name for field in fields(TrialRecord))


def record(trial: optuna.Trial, **values: Any) -> None:
    TrialRecord(**values)  # a name that is not a field is a TypeError here, before anything is written
    for name, value in values.items():
        trial.set_user_attr(name, value)
