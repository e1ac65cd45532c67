"""What a study searches, and how: the search space, a trial's fit flags, the sampler and the pruner."""

import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy
import optuna
from jsonargparse import Namespace
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from mlp.errors import UserError, check
from mlp.module import MLPClassifier, check_hyperparameters
from mlp.records import record


def searched(low: float | None, high: float | None, flag: str, log: bool = False, wide: tuple | None = None) -> Any:
    """A SearchSpace field: its default inclusive range (None: not searched unless asked), the fit flag that sets it
    (a trial's value, the user's pin, fit's own value for trial 0), log scale or not, and `--space wide`'s range."""
    default = None if low is None else (low, high)
    return field(default=default, metadata={"flag": flag, "log": log, "wide": wide or default, "choices": False})


def chosen(flag: str, wide: tuple) -> Any:
    """A SearchSpace field of choices, not searched unless asked; `--space wide` tries `wide`."""
    return field(default=None, metadata={"flag": flag, "log": False, "wide": wide, "choices": True})


@dataclass
class SearchSpace:
    """Ranges searched jointly; one of None is not searched (pinned by the user's fit flag, `pinned_by`). Each field
    is the whole declaration: tune.py's `--<name> LOW HIGH` flag, the fit flag a trial sets, pinning, the first trial
    (`mlp.study.fit_defaults`). Integer bounds give integers; a `chosen` field holds the values tried."""

    lr: tuple[float, float] | None = searched(0.02, 0.5, "model.lr", log=True)
    epochs: tuple[int, int] | None = searched(5, 40, "trainer.max_epochs", wide=(5, 200))
    depth: tuple[int, int] | None = searched(1, 3, "model.depth")
    width: tuple[int, int] | None = searched(128, 1024, "model.width", log=True, wide=(128, 2048))
    weight_decay: tuple[float, float] | None = searched(1e-5, 3e-3, "model.weight_decay", log=True)
    dropout: tuple[float, float] | None = searched(0.0, 0.5, "model.dropout")
    label_smoothing: tuple[float, float] | None = searched(0.0, 0.2, "model.label_smoothing")
    # Augmentation slows a short run's learning (docs/tuning.md): searched by --space wide, for long budgets.
    augment_shift: tuple[int, int] | None = searched(None, None, "model.augment_shift", wide=(0, 3))
    augment_flip: tuple[float, float] | None = searched(None, None, "model.augment_flip", wide=(0.0, 0.5))
    batch_norm: tuple[bool, ...] | None = chosen("model.batch_norm", wide=(False, True))

    @classmethod
    def preset(cls, name: str) -> "SearchSpace":
        """tune.py's --space: `default`, the ranges above, or `wide`: schedules up to 200 epochs, widths up to 2048
        and augmentation, what the best published MLPs train with, worth it at budgets of hours."""
        check(name in SPACES, f"--space must be one of {', '.join(SPACES)}, got {name!r}")
        return cls() if name == "default" else cls(**{f.name: f.metadata["wide"] for f in fields(cls)})

    @property
    def has_slow_starters(self) -> bool:
        """Whether augmentation is searched: augmented trials, slower to learn early, compete with others."""
        return self.augment_shift is not None or self.augment_flip is not None

    def searched(self) -> dict[str, tuple]:
        return {name: bounds for name, bounds in asdict(self).items() if bounds is not None}

    def pin(self, names: Iterable[str]) -> "SearchSpace":
        return replace(self, **{name: None for name in names})

    def holds(self, name: str, value: Any) -> bool:
        """Whether the searched hyperparameter `name` may take `value`."""
        bounds = getattr(self, name)
        return value in bounds if name in CHOICES else bounds[0] <= value <= bounds[1]

    def validate(self, model: Mapping[str, Any] | None = None) -> None:
        """A clear error for a range no trial could train with: each bound is checked as the model checks a value,
        beside the `model`'s other hyperparameters (the fit flags'; by default MLPClassifier's defaults)."""
        for name, bounds in self.searched().items():
            if name in CHOICES:
                continue  # the flag's parser takes only the hyperparameter's values
            flag = f"--{name.replace('_', '-')} {' '.join(map(str, bounds))}"
            for bound in bounds if FIT_FLAGS[name].startswith("model.") else ():  # first: NaN is no bound to order
                try:
                    check_hyperparameters({**(model or MODEL_DEFAULTS), FIT_FLAGS[name].removeprefix("model."): bound})
                except UserError as error:
                    raise UserError(f"{flag}: {error}") from None
            check(bounds[0] <= bounds[1], f"{flag}: the low bound is above the high bound")
            check(name not in LOG_SCALE or bounds[0] > 0, f"{flag}: the range must be positive (log scale)")
            check(name != "epochs" or bounds[0] >= 1, f"{flag}: at least 1 epoch")


SPACES = ("default", "wide")
FIT_FLAGS = {f.name: f.metadata["flag"] for f in fields(SearchSpace)}
LOG_SCALE = {f.name for f in fields(SearchSpace) if f.metadata["log"]}
CHOICES = {f.name for f in fields(SearchSpace) if f.metadata["choices"]}
MODEL_DEFAULTS = {name: p.default for name, p in inspect.signature(MLPClassifier).parameters.items()}


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """The trial's hyperparameters as fit flags, in SearchSpace's order, so that draws stay as they were."""
    flags: dict[str, Any] = {}
    for name, bounds in space.searched().items():
        if name in CHOICES:
            flags[FIT_FLAGS[name]] = trial.suggest_categorical(name, bounds)
        else:
            suggest_one = trial.suggest_int if isinstance(bounds[0], int) else trial.suggest_float
            flags[FIT_FLAGS[name]] = suggest_one(name, *bounds, log=name in LOG_SCALE)
    return flags


def pinned_by(fit_args: list[str], config: Namespace, defaults: Namespace) -> dict[str, Any]:
    """The searched hyperparameters the user's fit flags name (`--model.depth 3`, `--model.depth=3`) or a --config
    file changes, with their values: a trial's flags come after the user's and would silently override them."""
    pinned = {}
    for name, key in FIT_FLAGS.items():
        named = any(arg == f"--{key}" or arg.startswith(f"--{key}=") for arg in fit_args)
        if named or config[key] != defaults[key]:
            pinned[name] = config[key]
    return pinned


def trial_args(fit_args: list[str], flags: dict[str, Any], study_name: str, version: str) -> list[str]:
    """The fit command line of one trial: the user's fit flags, then the trial's, then where it logs."""
    return [
        *fit_args, *(f"--{key}={value}" for key, value in flags.items()),
        f"--trainer.logger.init_args.name=tune/{study_name}", f"--trainer.logger.init_args.version={version}",
        "--trainer.enable_model_summary=false", "--progress_bar.refresh_rate=0",
    ]


SCHEDULE_STEPS = 100  # a trial's intermediate values are indexed by the percent of its own schedule done
REPORT_EVERY = 10  # percent: a trial reports its val/acc, and the pruner judges it, at every tenth of its schedule


def record_intermediate_values(
    trial: optuna.Trial, epoch: int, epochs: int, value: float, previous: float | None
) -> bool:
    """Report the val/acc `value` reached at the end of `epoch` (from 0) of `epochs`; True if the trial should stop.

    Trials of different lengths are compared at the same percent of their own schedules (docs/tuning.md): each
    reports at the tenths this epoch crosses, interpolated from the previous epoch's value (`previous`; None for
    the first, whose value stands back to step 10), and is judged there, never in its last epoch: it has spent its
    compute, and pruning would only drop it from the final models. Also records `epochs_trained`."""
    record(trial, epochs_trained=epoch + 1)
    start, end = SCHEDULE_STEPS * epoch / epochs, SCHEDULE_STEPS * (epoch + 1) / epochs
    finished = epoch + 1 == epochs
    first = REPORT_EVERY * (math.floor(start) // REPORT_EVERY + 1)  # the first tenth after the previous epoch's end
    for step in range(first, math.floor(end) + 1, REPORT_EVERY):
        share = (step - start) / (end - start)
        trial.report(value if previous is None else previous + share * (value - previous), step)
        if not finished and trial.should_prune():
            return True
    return False


SLOW_STARTERS_FIRST_JUDGED = 50  # percent of a schedule; docs/tuning.md#pruning-fair-to-slow-starters says why


def make_pruner(name: str, shortest_epochs: int, slow_starters: bool = False) -> optuna.pruners.BasePruner:
    """A pruner by percent of a trial's schedule (record_intermediate_values). None is judged before the shortest
    schedule's first epoch ends (earlier steps hold its value, flattering short schedules), nor with `slow_starters`
    (augmented trials compete) before SLOW_STARTERS_FIRST_JUDGED: until then those rank below where they end."""
    first_judged = REPORT_EVERY * math.ceil(SCHEDULE_STEPS / shortest_epochs / REPORT_EVERY)
    if slow_starters:
        first_judged = max(first_judged, SLOW_STARTERS_FIRST_JUDGED)
    if name == "hyperband":
        # Rungs at first_judged (20 % for the default space), then three times as far.
        return optuna.pruners.HyperbandPruner(min_resource=first_judged, max_resource=SCHEDULE_STEPS,
                                              reduction_factor=3)
    if name == "median":
        # One-cycle's learning rate peaks at 30 % (OneCycleLR's pct_start); before, val/acc says little of the end.
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(30, first_judged))
    return optuna.pruners.NopPruner()


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """TPE whose random draws depend only on the seed and the trial's number; trial 0 draws `first`, when given.

    One seeded TPESampler per process would give workers of one seed the same draws, and a rerun the first run's;
    trial numbers are unique across workers, so seeding by (seed, number) gives distinct, reproducible draws.
    `first` (mlp.study.fit_defaults) starts the search from a known-good point; as a rule of every worker's sampler,
    not a trial queued at the study's creation, it is trial 0 whichever of several workers asks first."""

    def __init__(self, seed: int, first: dict[str, Any] | None = None) -> None:
        self.seed, self.first = seed, first or {}
        self.tpe = self.tpe_for(0)

    def tpe_for(self, number: int) -> optuna.samplers.TPESampler:
        # SeedSequence hashes (seed, number): seed + number would alias, seed 1's trial k drawing seed 0's k + 1.
        # constant_liar: another worker's RUNNING trial counts as a bad result, so TPE does not pile onto it.
        seed = int(numpy.random.SeedSequence([self.seed, number]).generate_state(1)[0])
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True, constant_liar=True)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.tpe = self.tpe_for(trial.number)
        self.tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.tpe.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if trial.number == 0 and self.first:
            return {}  # each parameter comes from sample_independent
        return self.tpe.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        if trial.number == 0 and param_name in self.first:
            return self.first[param_name]
        return self.tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self.tpe.after_trial(study, trial, state, values)
