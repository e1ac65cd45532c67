"""What tune.py shows while a study runs: in a terminal, a live bar at the bottom with Optuna's one line per
finished trial above it; into a file or a pipe, only those lines; with --quiet, neither. The bar reads the storage,
so it counts every worker's trials."""

import contextlib
import io
import logging
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mlp.records import TrialRecord

# Lightning's per-run chatter ("Seed set to 0", "GPU available: ...") would repeat for every trial.
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


@dataclass(frozen=True)
class StudyCounts:
    """Trials of a study by state, and the best so far; surplus trials (see mlp.study.surplus_trials) and those
    skipped as too long for the --timeout budget (see mlp.budget) are no failure."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    best_value: float | None = None
    best_number: int | None = None

    @property
    def finished(self) -> int:
        return self.complete + self.pruned

    @classmethod
    def of(cls, trials: list[FrozenTrial]) -> "StudyCounts":
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = max(complete, key=lambda t: t.value, default=None)
        return cls(complete=len(complete), pruned=sum(t.state == TrialState.PRUNED for t in trials),
                   failed=sum(t.state == TrialState.FAIL and TrialRecord.of(t).counts_as_failure for t in trials),
                   running=sum(t.state == TrialState.RUNNING for t in trials),
                   best_value=None if best is None else best.value, best_number=None if best is None else best.number)

    def __str__(self) -> str:
        best = "none yet" if self.best_value is None else f"{self.best_value:.4f} (trial {self.best_number})"
        return f"pruned {self.pruned}, failed {self.failed}, running {self.running}, best val/acc {best}"


class StudyProgress:
    """A tqdm bar on `file` (None: hidden) of finished trials out of n_trials, with the counts beside it; call it
    with the study whenever something may have changed."""

    def __init__(self, n_trials: int, file: TextIO | None) -> None:
        # tqdm puts ", " before the postfix
        self.bar = tqdm(total=n_trials, bar_format="trials {n_fmt}/{total_fmt} |{bar}| {elapsed} elapsed{postfix}",
                        disable=file is None, file=file)
        self.study: optuna.Study | None = None

    def __call__(self, study: optuna.Study) -> None:
        self.study = study
        if self.bar.disable:  # no read for a hidden bar: with many workers each pass's reads add up
            return
        counts = StudyCounts.of(study.get_trials(deepcopy=False))
        self.bar.n = counts.finished
        self.bar.set_postfix_str(str(counts))  # also redraws the bar


class ShownOnce(logging.Filter):
    """Lets each warning through once: Lightning's warnings would otherwise repeat in every trial."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage().rstrip()  # warnings.formatwarning ends in a newline
        record.msg, record.args = message, ()
        shown = message in self.seen
        self.seen.add(message)
        return not shown


class OneLine(logging.Filter):
    """Drops the traceback Optuna attaches to a failed trial's line; the line itself names the error."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = record.exc_text = None
        return True


class LinesAboveBar(io.TextIOBase):
    """Standard output while the bar is drawn on the same terminal: each whole line is written above the bar
    (tqdm's own DummyTqdmFile clears the bar only when both write to one stream)."""

    def __init__(self, stream: TextIO, bar: tqdm) -> None:
        self.stream, self.bar, self.partial = stream, bar, ""

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text).split("\n")
        if lines:
            self.bar.clear()
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
            self.bar.refresh()
        return len(text)

    def flush(self) -> None:
        """Write out a line left unfinished too (at the end, say)."""
        self.stream.write(self.partial)
        self.partial = ""
        self.stream.flush()

    def isatty(self) -> bool:
        return True

    @property
    def encoding(self) -> str:
        return self.stream.encoding


@contextlib.contextmanager
def study_output(n_trials: int, quiet: bool) -> Iterator[StudyProgress]:
    """Set up what the user sees while a study runs (see the module's docstring); every change is undone after."""
    optuna_logger, warnings_logger = logging.getLogger("optuna"), logging.getLogger("py.warnings")
    in_terminal = not quiet and sys.stderr.isatty()
    with contextlib.ExitStack() as undo:

        def set_level(logger: logging.Logger, level: int) -> None:
            undo.callback(logger.setLevel, logger.level)
            logger.setLevel(level)

        for name in LIGHTNING_LOGGERS:
            set_level(logging.getLogger(name), logging.ERROR if quiet else logging.WARNING)
        if quiet:
            set_level(optuna_logger, logging.ERROR)
            undo.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            undo.enter_context(contextlib.redirect_stdout(io.StringIO()))  # Lightning's table of test results
        one_line = OneLine()
        for handler in optuna_logger.handlers:
            handler.addFilter(one_line)
            undo.callback(handler.removeFilter, one_line)
        # Warnings go through logging, to be shown once each, and above the bar in a terminal. The logger has
        # only a NullHandler (put there by a library), so it gets one that prints.
        shown_once, printed = ShownOnce(), logging.StreamHandler(sys.stderr)
        warnings_logger.addFilter(shown_once)
        warnings_logger.addHandler(printed)
        undo.callback(warnings_logger.removeFilter, shown_once)
        undo.callback(warnings_logger.removeHandler, printed)
        undo.enter_context(warnings.catch_warnings())  # restores the showwarning that captureWarnings replaces
        logging.captureWarnings(True)
        undo.callback(logging.captureWarnings, False)
        progress = StudyProgress(n_trials, sys.stderr if in_terminal else None)
        undo.callback(progress.bar.close)
        if in_terminal:  # what is logged or printed goes above the bar, not through it
            undo.enter_context(logging_redirect_tqdm([optuna_logger, warnings_logger]))
            if sys.stdout.isatty():
                above = LinesAboveBar(sys.stdout, progress.bar)
                undo.enter_context(contextlib.redirect_stdout(above))
                undo.callback(above.flush)
        yield progress
        if progress.study is not None:  # read again: its last trial may have ended after the last call (--timeout)
            progress(progress.study)
