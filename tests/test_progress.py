"""What tune.py shows while a study runs: a bar in a terminal, one line per trial elsewhere, the report alone
with --quiet. The scripts run as a user starts them, in a subprocess, with a pipe or a pseudo-terminal."""

import fcntl
import io
import json
import logging
import math
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mlp.progress import LinesAboveBar, OneLine, ShownOnce, StudyCounts, StudyProgress
from tests.test_sweeps import FAST_TRIAL, tune_args

ROOT = Path(__file__).resolve().parent.parent
# Deterministic pruning (the real pruners need several trials to compare with): below 0.5 after an epoch.
PATCH = "import optuna, mlp.study; mlp.study.make_pruner = lambda *_: optuna.pruners.ThresholdPruner(lower=0.5)"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_counts_come_from_the_storage_however_trials_were_finished():
    study = optuna.create_study(direction="maximize")
    for value, state in ((0.8, TrialState.COMPLETE), (0.9, TrialState.COMPLETE), (None, TrialState.PRUNED),
                         (None, TrialState.FAIL)):
        study.tell(study.ask(), value, state=state)  # as a worker that uses ask and tell would
    surplus = study.ask()
    surplus.set_user_attr("surplus", True)  # see mlp.study.is_surplus: not a failure
    study.tell(surplus, state=TrialState.FAIL)
    study.ask()  # running

    counts = StudyCounts.of(study.trials)
    assert counts == StudyCounts(complete=2, pruned=1, failed=1, running=1, best_value=0.9, best_number=1)
    assert counts.finished == 3

    drawn = io.StringIO()
    progress = StudyProgress(n_trials=4, file=drawn)
    progress(study)
    progress.bar.close()
    last = drawn.getvalue().split("\r")[-1].rstrip()
    assert re.fullmatch(
        r"trials 3/4 \|.+\| 00:\d\d elapsed, pruned 1, failed 1, running 1, best val/acc 0.9000 \(trial 1\)", last)


def test_an_empty_study_has_no_best_yet():
    assert str(StudyCounts.of([])) == "pruned 0, failed 0, running 0, best val/acc none yet"


def test_a_failed_trials_line_keeps_its_error_and_drops_the_traceback():
    try:
        raise ValueError("bad value")
    except ValueError:
        record = logging.LogRecord("optuna", logging.WARNING, __file__, 1, "Trial 3 failed because of %r", ("bad",),
                                   sys.exc_info())
    handler = logging.StreamHandler(stream := io.StringIO())
    handler.addFilter(OneLine())
    handler.handle(record)
    assert stream.getvalue() == "Trial 3 failed because of 'bad'\n"


def test_each_warning_is_shown_once():
    shown_once = ShownOnce()
    texts = ("a.py:1: UserWarning: x\n", "b\n", "a.py:1: UserWarning: x\n")
    records = [logging.LogRecord("py.warnings", logging.WARNING, __file__, 1, "%s", (text,), None) for text in texts]
    assert [shown_once.filter(record) for record in records] == [True, True, False]


def test_printed_lines_go_above_the_bar():
    screen = io.StringIO()
    bar = StudyProgress(n_trials=2, file=screen).bar
    above = LinesAboveBar(screen, bar)
    above.write("first ")
    assert "first" not in screen.getvalue()  # a line is written whole, once it ends
    above.write("line\nsecond line\n")
    bar.close()
    after_clearing = screen.getvalue().split("\r")
    assert "first line\nsecond line\ntrials 0/2 |" in "".join(after_clearing)  # the lines, then the bar again
    assert any(part.startswith("first line\nsecond line\n") for part in after_clearing)


@pytest.fixture
def study_args(synthetic_dir, tmp_path) -> list[str]:
    """Two trials to run: trial 1 learns, trial 2 is pruned; trial 0 failed before, in another worker."""
    study = optuna.create_study(study_name="test", storage=f"sqlite:///{tmp_path / 'study.db'}", direction="maximize")
    study.tell(study.ask(), state=TrialState.FAIL)
    study.enqueue_trial({"lr": 0.1, **FAST_TRIAL})
    study.enqueue_trial({"lr": 1e-7, **FAST_TRIAL})
    return tune_args(synthetic_dir, tmp_path, n_trials=2)


def tune_command(args: list[str]) -> list[str]:
    code = f"import runpy, sys\nsys.argv = {['tune.py', *args]!r}\n{PATCH}\n"
    code += f"runpy.run_path({str(ROOT / 'scripts' / 'tune.py')!r}, run_name='__main__')"
    return [sys.executable, "-c", code]


def run_piped(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(tune_command(args), capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def run_in_terminal(args: list[str], timeout: float = 600) -> tuple[int, str]:
    """Run tune.py with a pseudo-terminal (160 columns) as its stdin, stdout and stderr; its exit code and output."""
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "160"}
    process = subprocess.Popen(tune_command(args), stdin=terminal, stdout=terminal, stderr=terminal, env=env,
                               cwd=ROOT, start_new_session=True)
    os.close(terminal)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1)
            if not ready:
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the process closed the terminal's last descriptor
                break
            if not chunk:
                break
            output += chunk
        else:
            pytest.fail(f"tune.py did not finish in {timeout} s:\n{output.decode(errors='replace')[-3000:]}")
        return process.wait(timeout=60), output.decode(errors="replace")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        os.close(controller)


def screen_lines(output: str) -> list[str]:
    """The lines as a terminal leaves them: colours dropped, and of each line what follows its last carriage return."""
    return [ANSI.sub("", line).split("\r")[-1].rstrip() for line in output.replace("\r\n", "\n").split("\n")]


def trial_lines(text: str) -> list[str]:
    return re.findall(r"Trial \d+ (?:finished with value|pruned)", text)


def test_piped_output_is_one_line_per_finished_trial_and_no_bar(study_args):
    result = run_piped(study_args)

    assert result.returncode == 0, result.stderr[-3000:]
    assert trial_lines(result.stderr) == ["Trial 1 finished with value", "Trial 2 pruned"]
    assert "trials 2/2" not in result.stderr and "\r" not in result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads(result.stdout[result.stdout.index("{"):])["best_trial"] == 1


def test_terminal_shows_the_bar_with_counts_and_the_best_trial(study_args):
    code, output = run_in_terminal(study_args)

    assert code == 0, output[-3000:]
    lines = screen_lines(output)
    # Optuna's lines are written above the bar, each on its own line.
    assert [line for line in lines if trial_lines(line)] == [
        line for line in lines if re.match(r"\[I [^]]+\] Trial \d+ (finished with value|pruned)", line)
    ]
    assert trial_lines("\n".join(lines)) == ["Trial 1 finished with value", "Trial 2 pruned"]
    bars = [line for line in lines if line.startswith("trials ")]
    assert bars, output[-3000:]
    for bar in bars:  # nothing printed (the test run's table, say) runs into the bar
        assert re.fullmatch(r"trials \d/2 \|.*\| \d\d:\d\d elapsed(, pruned .*\))?", bar), bar
    final = re.fullmatch(
        r"trials 2/2 \|.*\| \d\d:\d\d elapsed, pruned 1, failed 1, running 0, best val/acc (\d\.\d{4}) \(trial 1\)",
        bars[-1],
    )
    assert final, bars[-1]
    assert float(final[1]) > 0.9
    # The trial that failed before this run is counted from the start: the bar reads the storage.
    assert "trials 0/2" in ANSI.sub("", output) and "failed 1" in ANSI.sub("", output).split("Trial 1 finished")[0]


def test_quiet_prints_only_the_answer_and_where_the_report_is(study_args):
    result = run_piped([*study_args, "--quiet"])

    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""
    # Nothing but a few lines: no table of test results, no log lines, no JSON.
    study, answer, best, report = result.stdout.splitlines()
    summary = json.loads(Path(report.removeprefix("report: ")).read_text())
    assert summary["best_trial"] == 1 and summary["trials"] == {"complete": 1, "pruned": 1, "fail": 1}
    assert not math.isnan(summary["test_acc"])
    assert study == "study test: 1 complete, 1 pruned, 1 fail"
    assert answer == f"answer: {summary['final']['answer']} (test accuracy {summary['test_acc']:.4f})"
    assert best.startswith(f"best trial: 1, val accuracy {summary['best_val_acc']:.4f} (lr=0.1, epochs=2, ")
