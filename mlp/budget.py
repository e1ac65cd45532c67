"""What `tune.py --timeout SECONDS` bounds: the whole command after start-up, not just the trials (docs/tuning.md,
"A time budget"). Trials are skipped, or cut at an epoch's end, to leave the final model the time it needs, estimated
from the trials' own measured times; the final model refits what fits in the time left (`mlp.final.final_models`)."""

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import median_high

from optuna.trial import FrozenTrial

from mlp.records import TrialRecord

# After the trials and refits, the part of the final model's time that no net's size changes: the tests' builds,
# the plots, report.json and the interpreter's exit (docs/results.md#finishing-xeon), with room for slower machines.
FINISH_SECONDS = 10.0
# Evaluating a checkpoint on val and test (15,000 images forward), in epochs of its own trial (55,000 images forward
# and backward, 5,000 validated), for each candidate of the ensemble: 0.04-0.08 measured (results.md#finishing-xeon).
EVAL_EPOCHS = 0.2
ENSEMBLE_MAX = 10  # checkpoints the final model considers for the ensemble: the best trials by validation accuracy
REFIT_START_SECONDS = 2.0  # a refit's build, data and test beside its epochs (results.md#finishing-xeon)
RESERVED_REFITS = 3  # best trials whose refits time is kept for: a few, as default studies' refit ensembles hold
SKIPS_IN_A_ROW = 5  # near the deadline the sampler may keep drawing trials too long for the time left


@dataclass
class Budget:
    """The command's deadline, as wall-clock time so that the workers it starts share it, and what the final model's
    time is estimated from."""

    deadline: float = math.inf  # inf: no --timeout
    refit_scale: float = 1.0  # how much longer a refit's epoch (train + val) is than its trial's (train)
    fuse: int = 1  # refits trained at once
    parallel: bool = False  # a stack lasts as long as its longest member (a GPU), or all of them (the CPU: pads_widths)
    skipped_in_a_row: int = 0
    refitted: frozenset[int] = frozenset()  # trials whose refits an earlier run made: a rerun keeps no time for them
    finish: float = FINISH_SECONDS  # the final model's time beside its refits, as `reserve` last estimated it

    @property
    def bounded(self) -> bool:  # --timeout was given
        return math.isfinite(self.deadline)

    def left(self) -> float:
        return self.deadline - time.time()

    def refit_seconds(self, trials: Iterable[FrozenTrial], fuse: int | None = None) -> float:
        """Estimated seconds to refit `trials` (complete ones), each its trial's time scaled to the refit's training
        images, in stacks of `fuse` (default: the study's)."""
        fuse = (fuse or self.fuse) if self.parallel else 1
        each = [REFIT_START_SECONDS + self.refit_scale * trial_seconds(t) for t in trials]
        return sum(max(each[start : start + fuse]) for start in range(0, len(each), fuse))

    def finish_seconds(self, best_first: list[FrozenTrial]) -> float:
        """The final model's time beside its refits, kept as `finish`: FINISH_SECONDS, and EVAL_EPOCHS of each
        candidate checkpoint's own epoch, so that big nets, a slow machine or a loaded one keep more back."""
        records = [(t, TrialRecord.of(t)) for t in best_first[:ENSEMBLE_MAX]]
        evaluating = sum(trial_seconds(t) / r.epochs_trained for t, r in records if r.epochs_trained)
        self.finish = FINISH_SECONDS + EVAL_EPOCHS * evaluating
        return self.finish

    def reserve(self, best_first: list[FrozenTrial]) -> float:
        """The time kept back for the final model while trials run: `finish_seconds`, and the refits of the most of
        the RESERVED_REFITS best complete trials that fitted in the time left when the last of them completed. Refits
        that did not fit then never will: the time goes to trials, whose checkpoints the final model will have."""
        finish, kept = self.finish_seconds(best_first), 0.0
        for j in range(1, min(RESERVED_REFITS, len(best_first)) + 1):
            seconds = self.refit_seconds(t for t in best_first[:j] if t.number not in self.refitted)
            completed = max(t.datetime_complete.timestamp() for t in best_first[:j])
            if seconds <= self.deadline - completed - finish:
                kept = seconds
        return finish + kept

    def trials_may_start(self, best_first: list[FrozenTrial]) -> bool:
        """Whether a trial may be asked: time is left before the final model's share, and the last few trials
        asked were not all skipped as too long for it (see `no_time_for`)."""
        return self.skipped_in_a_row < SKIPS_IN_A_ROW and self.left() > self.reserve(best_first)

    def no_time_for(self, epochs: int, multiply_adds: int, best_first: list[FrozenTrial]) -> str | None:
        """Why a trial of `epochs` epochs of a net of `multiply_adds` per example cannot finish before the final
        model's share (at the complete trials' median seconds per epoch and multiply-add), or None if it can or
        nothing is known yet. Counts the trials skipped in a row."""
        records = [(t, TrialRecord.of(t)) for t in best_first]
        rates = [trial_seconds(t) / (r.epochs_trained * r.multiply_adds) for t, r in records
                 if r.epochs_trained and r.multiply_adds]
        if rates and self.bounded:
            needed, spare = epochs * multiply_adds * median_high(rates), self.left() - self.reserve(best_first)
            if needed > spare:
                self.skipped_in_a_row += 1
                return (f"it would take about {needed:.0f} s and {max(spare, 0):.0f} s were left before the final "
                        "model's share")
        self.skipped_in_a_row = 0
        return None

    def overdue(self) -> bool:
        """Whether training must stop now: only the final model's share without refits is left."""
        return self.left() < self.finish

    def cuts(self, seconds_to_finish: float, best_first: list[FrozenTrial]) -> bool:
        """Whether a running trial that needs `seconds_to_finish` more would eat into the final model's time."""
        return self.bounded and seconds_to_finish > self.left() - self.reserve(best_first)


def trial_seconds(trial: FrozenTrial) -> float:
    """Wall seconds a finished trial took, from its ask to its tell: its epochs, and its build and checkpoints."""
    return (trial.datetime_complete - trial.datetime_start).total_seconds()
