"""What a study searches, and how: the search space, a trial's fit flags, the sampler and the pruner."""

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from mlp.errors import check


@dataclass
class SearchSpace:
    """Ranges searched jointly; lr, width and weight_decay on a log scale. Bounds are inclusive."""

    lr: tuple[float, float] = (0.02, 0.5)
    epochs: tuple[int, int] = (5, 40)
    depth: tuple[int, int] = (1, 3)
    width: tuple[int, int] = (128, 1024)
    weight_decay: tuple[float, float] = (1e-5, 3e-3)
    dropout: tuple[float, float] = (0.0, 0.5)

    def validate(self) -> None:
        for name, (low, high) in asdict(self).items():
            check(low <= high, f"--{name.replace('_', '-')}: the low bound {low} is above the high bound {high}")
        check(self.lr[0] > 0, f"--lr: the range must be positive, got {self.lr}")
        check(self.weight_decay[0] > 0, f"--weight-decay: the range must be positive (log scale), got {self.weight_decay}")
        check(self.epochs[0] >= 1, f"--epochs: at least 1 epoch, got {self.epochs}")
        check(self.depth[0] >= 0, f"--depth: at least 0 hidden layers, got {self.depth}")
        check(self.width[0] >= 1, f"--width: at least 1 unit, got {self.width}")
        check(0 <= self.dropout[0] and self.dropout[1] < 1, f"--dropout: probabilities in [0, 1), got {self.dropout}")


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """The trial's hyperparameters, as fit flags."""
    return {
        "model.lr": trial.suggest_float("lr", *space.lr, log=True),
        "trainer.max_epochs": trial.suggest_int("epochs", *space.epochs),
        "model.depth": trial.suggest_int("depth", *space.depth),
        "model.width": trial.suggest_int("width", *space.width, log=True),
        "model.weight_decay": trial.suggest_float("weight_decay", *space.weight_decay, log=True),
        "model.dropout": trial.suggest_float("dropout", *space.dropout),
    }


def trial_args(fit_args: list[str], flags: dict[str, Any], study_name: str, version: str) -> list[str]:
    """The fit command line of one trial: the user's fit flags, then the trial's, then where it logs."""
    return [
        *fit_args,
        *(f"--{key}={value}" for key, value in flags.items()),
        f"--trainer.logger.init_args.name=tune/{study_name}",
        f"--trainer.logger.init_args.version={version}",
        "--trainer.enable_model_summary=false",
        "--progress_bar.refresh_rate=0",
    ]


def make_pruner(name: str, space: SearchSpace) -> optuna.pruners.BasePruner:
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=space.epochs[1], reduction_factor=3)
    if name == "median":
        # A trial with a long one-cycle schedule is behind a short one at the same early epoch; five epochs of
        # warm-up keep the pruner from mistaking that for a bad trial.
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=5)
    return optuna.pruners.NopPruner()


def trial_seed(seed: int, number: int) -> int:
    """A seed for trial `number` of a study seeded with `seed`.

    seed + number would alias: seed 1's trial k would draw what seed 0's trial k + 1 drew. SeedSequence
    hashes the pair, so studies with different seeds draw independently.
    """
    return int(numpy.random.SeedSequence([seed, number]).generate_state(1)[0])


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """TPE whose random draws depend only on the seed and the trial's number.

    One seeded TPESampler per process would give every worker started with the same seed the same draws, and
    a rerun would replay the first run's. Trial numbers are unique across workers (the storage assigns them),
    so seeding each trial from (seed, number) gives distinct, reproducible draws.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.tpe = self.tpe_for(0)

    def tpe_for(self, number: int) -> optuna.samplers.TPESampler:
        # constant_liar: another worker's RUNNING trial counts as a bad result, so TPE does not pile onto it.
        return optuna.samplers.TPESampler(
            seed=trial_seed(self.seed, number), n_startup_trials=5, multivariate=True, constant_liar=True
        )

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.tpe = self.tpe_for(trial.number)
        self.tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.tpe.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self.tpe.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self.tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self.tpe.after_trial(study, trial, state, values)
