"""What tune.py shows while a study runs: a live bar over the study's finished trials, read from its storage.

In a terminal the bar sits at the bottom and Optuna's one line per finished trial is written above it; when the
output goes to a file or a pipe there is no bar, only those lines; with --quiet there is neither. The bar counts
every worker's trials, however they were finished (`study.optimize` here, `study.tell` anywhere), because it
asks the storage rather than listening to this worker.
"""

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

# Lightning's per-run chatter ("Seed set to 0", "GPU available: ...") would repeat for every trial.
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


@dataclass(frozen=True)
class StudyCounts:
    """Trials of a study by state, and the best so far; surplus trials (see mlp.study.is_surplus) are no failure."""

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
        return cls(
            complete=len(complete),
            pruned=sum(t.state == TrialState.PRUNED for t in trials),
            failed=sum(t.state == TrialState.FAIL and not t.user_attrs.get("surplus") for t in trials),
            running=sum(t.state == TrialState.RUNNING for t in trials),
            best_value=None if best is None else best.value,
            best_number=None if best is None else best.number,
        )

    def __str__(self) -> str:
        best = "none yet" if self.best_value is None else f"{self.best_value:.4f} (trial {self.best_number})"
        return f"pruned {self.pruned}, failed {self.failed}, running {self.running}, best val/acc {best}"


class StudyProgress:
    """A tqdm bar of finished (complete or pruned) trials out of n_trials, with the counts beside it.

    Call it with the study whenever something may have changed: after a trial, while waiting for other workers.
    """

    def __init__(self, n_trials: int, file: TextIO | None) -> None:
        """The bar is drawn on `file`; None hides it."""
        self.bar = tqdm(
            total=n_trials,
            # tqdm puts ", " before the postfix
            bar_format="trials {n_fmt}/{total_fmt} |{bar}| {elapsed} elapsed{postfix}",
            disable=file is None,
            file=file,
        )
        self.study: optuna.Study | None = None

    def __call__(self, study: optuna.Study) -> None:
        self.study = study
        counts = StudyCounts.of(study.get_trials(deepcopy=False))
        self.bar.n = counts.finished
        self.bar.set_postfix_str(str(counts))  # also redraws the bar

    def refresh(self) -> None:
        """Read the study seen last again: its last trial may have ended after the last call (at --timeout)."""
        if self.study is not None:
            self(self.study)


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


@contextlib.contextmanager
def study_output(n_trials: int, quiet: bool) -> Iterator[StudyProgress]:
    """Set up what the user sees while a study runs (see the module's docstring), and restore it afterwards."""
    optuna_logger, warnings_logger = logging.getLogger("optuna"), logging.getLogger("py.warnings")
    levels = {name: logging.getLogger(name).level for name in ("optuna", *LIGHTNING_LOGGERS)}
    handlers = list(optuna_logger.handlers)
    one_line, shown_once = OneLine(), ShownOnce()
    for handler in handlers:
        handler.addFilter(one_line)
    warnings_logger.addFilter(shown_once)
    warnings_handler = logging.StreamHandler(sys.stderr)  # the logger has only a NullHandler, put there by a library
    warnings_logger.addHandler(warnings_handler)
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.WARNING)
    if quiet:
        optuna_logger.setLevel(logging.ERROR)
    in_terminal = not quiet and sys.stderr.isatty()
    progress = StudyProgress(n_trials, sys.stderr if in_terminal else None)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(warnings.catch_warnings())
            if quiet:
                warnings.simplefilter("ignore")
                stack.enter_context(contextlib.redirect_stdout(io.StringIO()))  # Lightning's table of test results
            logging.captureWarnings(True)  # through shown_once, and above the bar in a terminal
            stack.callback(logging.captureWarnings, False)
            if in_terminal:
                stack.enter_context(logging_redirect_tqdm([optuna_logger, warnings_logger]))
            yield progress
            progress.refresh()
    finally:
        progress.bar.close()
        for handler in handlers:
            handler.removeFilter(one_line)
        warnings_logger.removeFilter(shown_once)
        warnings_logger.removeHandler(warnings_handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
