"""What a user's browser gets: the real TensorBoard and Optuna Dashboard servers, started on the logs and the
study storage of a tiny fit run and a tiny study, asked through the HTTP APIs their web pages use."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from mlp.postgres import free_port
from tests.conftest import epoch_values, write_synthetic_dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import fit  # noqa: E402
import tune  # noqa: E402

STUDY = "watch"
SEARCHED = {"lr", "epochs", "depth", "width", "weight_decay", "dropout", "label_smoothing"}
WAIT_SECONDS = 120  # for a server to start and load the logs on a loaded machine; it never bounds a result
server_groups: list[int] = []  # process groups of every server started, checked once the session ends


# -- the servers --------------------------------------------------------------------------------------------


def live_processes(group: int) -> list[int]:
    """Processes of a process group that still run (zombies waiting to be reaped by init do not)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)": state, ppid, pgrp, ...
        except (OSError, IndexError):  # ended while we looked
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


@pytest.fixture(scope="session", autouse=True)
def no_server_left_behind() -> Iterator[None]:
    yield
    left = {group: pids for group in server_groups if (pids := live_processes(group))}
    assert not left, f"server processes still running after the tests (group: pids): {left}"


def stop(process: subprocess.Popen) -> None:
    """Stop the server and every process it started (TensorBoard starts a data server), by process group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 15
        while live_processes(process.pid) and time.monotonic() < deadline:
            if process.poll() is None:
                try:
                    process.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.2)
        if not live_processes(process.pid):
            break
    process.wait()


def executable(name: str) -> str:
    """The console script `name` installed beside this Python, as a user would run it."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    assert found, f"{name} is not installed"
    return found


@contextmanager
def served(command: Callable[[int], list[str]], ready_path: str, log: Path) -> Iterator[str]:
    """Start `command(port)` on a free loopback port; yield its URL once `ready_path` answers; always stop it.

    Another process may take the free port before the server binds it; then the server exits and we try another.
    """
    for _ in range(3):
        port = free_port()
        with log.open("w") as out:
            process = subprocess.Popen(command(port), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        server_groups.append(process.pid)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + WAIT_SECONDS
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    urllib.request.urlopen(url + ready_path, timeout=10).close()
                except (urllib.error.URLError, ConnectionError):
                    time.sleep(0.2)
                    continue
                yield url
                return
            assert process.poll() is not None, f"{command(port)[0]} did not answer:\n{log.read_text()[-3000:]}"
        finally:
            stop(process)
    pytest.fail(f"{command(0)[0]} exited three times:\n{log.read_text()[-3000:]}")


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.load(response)


def post(url: str, body: dict) -> Any:
    # TensorBoard refuses a POST without this header (its guard against cross-site requests), as its page sends it.
    headers = {"Content-Type": "application/json", "X-XSRF-Protected": "1"}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def eventually(fetch: Callable[[], Any], done: Callable[[Any], bool]) -> Any:
    """fetch() again until done(value) holds or WAIT_SECONDS pass; the last value, for the test's own asserts."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not done(value := fetch()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return value


# -- a tiny run and a tiny study ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> SimpleNamespace:
    """A fit run and a two-trial study logged under one lightning_logs folder, as a user's would be."""
    root = tmp_path_factory.mktemp("monitored")
    data, logs = write_synthetic_dataset(root / "data"), root / "lightning_logs"
    common = [f"--data.data_dir={data}", f"--trainer.logger.init_args.save_dir={logs}", "--data.val_size=100",
              "--data.batch_size=32"]
    fit_results = fit.main([*common, "--model.depth=1", "--model.width=16", "--trainer.max_epochs=2",
                            "--progress_bar.refresh_rate=0"])
    summary = tune.main([*common, "--quiet", "--n-trials=2", f"--study-name={STUDY}", "--lr", "0.05", "0.2",
                         "--epochs", "1", "2", "--depth", "1", "1", "--width", "8", "16"])
    storage = f"sqlite:///{logs / 'tune' / 'optuna.db'}"  # tune.py's default storage
    return SimpleNamespace(root=root, logs=logs, storage=storage, fit=fit_results, summary=summary,
                           study=optuna.load_study(study_name=STUDY, storage=storage))


# -- TensorBoard ---------------------------------------------------------------------------------------------


def test_tensorboard_serves_the_scalars_images_and_hparams_of_runs_and_trials(logged):
    trials = logged.study.trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    fit_run, test_run, study_run = "fit/version_0", f"tune/{STUDY}/best_trial_test", f"tune/{STUDY}/study"
    trial_runs = {f"tune/{STUDY}/trial_{t.number}": t for t in trials}
    curves = {"train/loss_epoch", "train/acc", "train/examples_per_sec", "val/loss", "val/acc", "hp_metric"}
    scalar_tags = {fit_run: curves | {"test/acc", "test/loss"}, test_run: {"test/acc", "test/loss"},
                   **{run: curves for run in trial_runs}}
    image_tags = {fit_run: {"activations", "test/confusion_matrix", "test/predictions"},
                  test_run: {"test/confusion_matrix", "test/predictions"},
                  study_run: {f"study/{name}" for name in logged.summary["plots"]},
                  **{run: {"activations"} for run in trial_runs}}
    # Points per series once every event is loaded: one per epoch (hp_metric also has the 0 declared at the start).
    points = {(fit_run, "val/acc"): 2, (fit_run, "train/loss_epoch"): 2, (fit_run, "hp_metric"): 3,
              (fit_run, "test/acc"): 1, (test_run, "test/acc"): 1}
    for run, trial in trial_runs.items():
        points |= {(run, "val/acc"): trial.params["epochs"], (run, "hp_metric"): trial.params["epochs"] + 1}

    def tensorboard(port: int) -> list[str]:  # what a user runs, on a port of our choosing
        return [executable("tensorboard"), "--logdir", str(logged.logs), "--host", "127.0.0.1", "--port", str(port)]

    with served(tensorboard, "/data/runs", logged.root / "tensorboard.log") as url:

        def scalars(run: str, tag: str) -> list[float]:
            query = urllib.parse.urlencode({"run": run, "tag": tag})
            try:
                return [value for _, _, value in get(f"{url}/data/plugin/scalars/scalars?{query}")]
            except urllib.error.HTTPError:  # not loaded yet
                return []

        def png(run: str, tag: str) -> bytes:
            (image,) = get(f"{url}/data/plugin/images/images?" + urllib.parse.urlencode({"run": run, "tag": tag}))
            with urllib.request.urlopen(f"{url}/data/plugin/images/individualImage?{image['query']}") as response:
                assert response.headers["Content-Type"] == "image/png"
                return response.read()

        def shows(expected: dict[str, set[str]]) -> Callable[[dict], bool]:
            return lambda served_tags: all(tags <= set(served_tags.get(run, ())) for run, tags in expected.items())

        # The server loads the logs in the background: wait until it shows what we expect, or WAIT_SECONDS.
        served_scalar_tags = eventually(lambda: get(url + "/data/plugin/scalars/tags"), shows(scalar_tags))
        served_image_tags = eventually(lambda: get(url + "/data/plugin/images/tags"), shows(image_tags))
        series = eventually(lambda: {key: scalars(*key) for key in points},
                            lambda got: all(len(got[key]) >= n for key, n in points.items()))
        for run, tags in scalar_tags.items():
            assert tags <= set(served_scalar_tags.get(run, ())), run
        for run, tags in image_tags.items():
            assert tags <= set(served_image_tags.get(run, ())), run
        assert {key: len(values) for key, values in series.items()} == points

        # The fit run: its best val/acc as hp_metric, the one test figure, its figures as PNG images.
        assert series[fit_run, "hp_metric"][-1] == pytest.approx(max(series[fit_run, "val/acc"]))
        assert series[fit_run, "test/acc"] == [pytest.approx(logged.fit["test/acc"])]
        for run, tags in image_tags.items():
            for tag in tags:
                assert png(run, tag).startswith(b"\x89PNG\r\n\x1a\n"), (run, tag)
        # Each trial: the val/acc the pruner saw each epoch, hp_metric = the value Optuna recorded.
        for run, trial in trial_runs.items():
            assert len(series[run, "val/acc"]) == trial.user_attrs["epochs_trained"]
            if trial.state == TrialState.COMPLETE:  # a pruned one may stop reporting mid-epoch, at a check
                assert series[run, "val/acc"] == pytest.approx(epoch_values(trial))
            assert series[run, "hp_metric"][-1] == pytest.approx(trial.value)
        # The study's one test, of the best trial's best checkpoint; the study's plots, in their own run.
        assert series[test_run, "test/acc"] == [pytest.approx(logged.summary["final"]["best"]["test_acc"])]
        assert "optimization_history" in logged.summary["plots"]
        assert set(served_image_tags[study_run]) == image_tags[study_run]

        # The HParams tab: every run with hyperparameters is a session, hp_metric its metric.
        experiment = post(url + "/data/plugin/hparams/experiment", {"experimentName": ""})
        hparam_names = {info["name"] for info in experiment["hparamInfos"]}
        assert {"lr", "depth", "width", "weight_decay", "dropout", "max_epochs"} <= hparam_names
        assert not any(name.startswith("_") for name in hparam_names)
        assert [info["name"]["tag"] for info in experiment["metricInfos"]] == ["hp_metric"]
        listing = post(url + "/data/plugin/hparams/session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 100,
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        })
        groups = {group["name"]: group for group in listing["sessionGroups"]}
        final = logged.summary["final"]  # the final models' refits: the best trial's and the ensemble's
        refitted = {final["refit"]["trial"], *final["refit_ensemble"]["trials"]}
        assert set(groups) == {fit_run, *trial_runs, *(f"tune/{STUDY}/refit_trial_{n}" for n in refitted)}
        for run, trial in trial_runs.items():
            shown = groups[run]["hparams"]
            assert shown["max_epochs"] == trial.params["epochs"]
            for name in SEARCHED - {"epochs"}:
                assert shown[name] == pytest.approx(trial.params[name]), name
            (metric,) = groups[run]["metricValues"]
            assert metric["name"]["tag"] == "hp_metric" and metric["value"] == pytest.approx(trial.value)


# -- Optuna Dashboard ----------------------------------------------------------------------------------------


def test_optuna_dashboard_serves_the_study_its_trials_and_their_intermediate_values(logged):
    pytest.importorskip("optuna_dashboard",
                        reason="the dashboard extra is not installed: pip install -e '.[dashboard]'")
    study = logged.study

    def dashboard(port: int) -> list[str]:
        return [executable("optuna-dashboard"), logged.storage, "--host", "127.0.0.1", "--port", str(port)]

    with served(dashboard, "/api/studies", logged.root / "dashboard.log") as url:
        summaries = get(url + "/api/studies")["study_summaries"]
        (listed,) = [s for s in summaries if s["study_name"] == STUDY]
        detail = get(f"{url}/api/studies/{listed['study_id']}")
        importances = get(f"{url}/api/studies/{listed['study_id']}/param_importances")

    assert detail["name"] == STUDY and detail["directions"] == ["maximize"]
    assert [t["number"] for t in detail["trials"]] == [t.number for t in study.trials]
    for shown, trial in zip(detail["trials"], study.trials):
        assert shown["state"] == trial.state.name.capitalize()
        assert {p["name"]: p["param_external_value"] for p in shown["params"]} == {
            name: str(value) for name, value in trial.params.items()
        }
        assert shown["values"] == [pytest.approx(trial.value)]
        assert shown["intermediate_values"] == [
            {"step": step, "value": pytest.approx(value)} for step, value in sorted(trial.intermediate_values.items())
        ]
        if trial.state == TrialState.COMPLETE:  # one val/acc per tenth of its schedule
            assert [s["step"] for s in shown["intermediate_values"]] == list(range(10, 101, 10))
    assert [t["number"] for t in detail["best_trials"]] == [study.best_trial.number]
    assert {"key": "test_acc", "value": str(logged.summary["final"]["best"]["test_acc"])} in listed["user_attrs"]
    (per_objective,) = importances["param_importances"]
    assert {p["name"] for p in per_objective} == SEARCHED
