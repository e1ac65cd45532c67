"""scripts/budget_curve.py: the table and the plot from given rows, resuming an interrupted curve, and one real
curve of a tiny budget on the synthetic data."""

import json
import os
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

from mlp.errors import UserError, run_script
from mlp.loading import FINAL_MODELS
from tests.conftest import snapshot

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import budget_curve  # noqa: E402

FIT = {"run": "fit", "budget": None, "seed": None, "wall_seconds": 400.0, "test_acc": 0.9000,
       "answer": "fit.py default", "trials_complete": None, "trials_pruned": None, "seeds": [0, 1, 2],
       "test_accs": [0.8990, 0.9000, 0.9010]}


def tune(budget: int, seed: int, test_acc: float | None, wall_seconds: float) -> dict:
    return {"run": f"budget_{budget}_s{seed}", "budget": budget, "seed": seed, "wall_seconds": wall_seconds,
            "test_acc": test_acc, "answer": "refit_ensemble" if test_acc else None, "trials_complete": 5,
            "trials_pruned": 2}


def table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]  # past header, rule


def test_table_and_plot_show_every_run_the_means_and_fit(tmp_path):
    rows = [
        tune(120, 0, 0.8990, 150.0), tune(120, 1, 0.9010, 155.0),  # between 0.85 × 120 = 102 and 1.1 × 120 + 30 s
        tune(300, 0, 0.9040, 300.0), tune(300, 1, 0.9020, 400.0),  # past 360 s
        tune(600, 0, 0.9031, 500.0), tune(600, 1, 0.9031, 630.0),  # 500 s: less than 0.85 × 600 = 510 s used
    ]  # means 0.9000 (below 0.9 + 0.003), 0.9030, 0.9031: never worse
    markdown = budget_curve.table(rows, FIT, "abc1234", "Some CPU, 2 cores", ["--trainer.accelerator", "cpu"])

    assert "Commit abc1234; Some CPU, 2 cores." in markdown and "`--trainer.accelerator cpu`" in markdown
    cells = table_rows(markdown)
    assert [row[:3] for row in cells] == [
        ["fit.py", "—", "—"],
        ["tune.py", "120", "0"], ["tune.py", "120", "1"], ["mean", "120", "—"],
        ["tune.py", "300", "0"], ["tune.py", "300", "1"], ["mean", "300", "—"],
        ["tune.py", "600", "0"], ["tune.py", "600", "1"], ["mean", "600", "—"],
    ]
    assert all(len(row) == 9 for row in cells)
    assert cells[0][3:] == ["400", "—", "—", "fit.py default, seeds 0 1 2 (0.8990, 0.9000, 0.9010)", "0.9000",
                           "—"]
    assert cells[5] == ["tune.py", "300", "1", "400", "no", "5 + 2", "refit_ensemble", "0.9020", "+0.0020"]
    assert cells[6] == ["mean", "300", "—", "350", "—", "—", "—", "0.9030", "+0.0030"]
    assert [row[4] for row in cells if row[0] == "tune.py"] == ["yes", "yes", "yes", "no", "no", "yes"]
    assert "every answer tests at least fit's default (its mean over the training seeds): NOT met (below: " \
        "budget_120_s0)" in markdown
    assert "each budget's mean over the sampler seeds tests at least fit's default + 0.003: NOT met (short at " \
        "120 s)" in markdown
    assert "never worse on average over the seeds: met" in markdown
    assert ("between 0.85 × budget and 1.1 × budget + 30 s: NOT met (outside: budget_300_s1, budget_600_s0)"
            in markdown)

    figure = budget_curve.plot(rows, FIT, tmp_path / "curve.png")

    assert imread(tmp_path / "curve.png").shape[:2] == (504, 1320)  # 11 × 4.2 inches at 120 dpi
    accuracy, wall = figure.axes
    lines = {line.get_label(): line for line in accuracy.get_lines()}
    assert list(lines["mean"].get_ydata()) == pytest.approx([0.9000, 0.9030, 0.9031])
    assert list(lines["seed 1"].get_xdata()) == [120, 300, 600]
    margin = lines["fit.py default + 0.003"]
    assert list(margin.get_ydata()) == pytest.approx([0.903, 0.903]) and margin.get_linestyle() == "--"
    assert list(lines["fit.py default, mean (0.9000)"].get_ydata()) == pytest.approx([0.9, 0.9])
    bound = {line.get_label(): line for line in wall.get_lines()}["1.1 × budget + 30 s"]
    assert list(bound.get_ydata()) == pytest.approx([162, 360, 690])


def test_goals_name_a_mean_that_drops_and_an_answer_without_a_test_figure():
    rows = [tune(300, 0, 0.9100, 300.0), tune(300, 1, 0.9100, 300.0),
            tune(600, 0, 0.9050, 600.0), tune(600, 1, None, 600.0)]  # no test figure: no mean at 600 s
    rows += [tune(1200, 0, 0.9040, 1200.0), tune(1200, 1, 0.9040, 1200.0)]

    lines = budget_curve.goals(rows, FIT)

    assert lines[0].endswith("NOT met (below: budget_600_s1)")
    assert lines[1].endswith("NOT met (short at 600 s)")
    assert lines[2].endswith("NOT met (the mean drops at 1200 s)")
    assert lines[3].endswith("met")
    assert "| mean | 600 | — | 600 | — | — | — | — | — |" in budget_curve.table(rows, FIT, "c", "h", [])


class FakeRuns:
    """Stands in for the commands: writes what fit.py prints or tune.py's report.json, and notes each run."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.commands: list[list[str]] = []

    def __call__(self, command: list[str], output: Path) -> tuple[int, float]:
        save_dir = Path(next(a for a in command if a.startswith("--trainer.logger")).split("=", 1)[1])
        self.ran.append(save_dir.name)
        self.commands.append(command)
        if "--study-name" in command:
            name = command[command.index("--study-name") + 1]
            (save_dir / "tune" / name).mkdir(parents=True)
            final = {"answer": "ensemble", **{model: {"test_acc": 0.91} for model in FINAL_MODELS}}
            report = {"study": name, "trials": {"complete": 3}, "test_acc": 0.91, "final": final}
            (save_dir / "tune" / name / "report.json").write_text(json.dumps(report))
            output.write_text("{...}\n")
            return 0, 12.5
        output.write_text("test accuracy 0.9017 (best checkpoint: x)\n")
        return 0, 7.0


def test_a_curve_continues_where_it_stopped_and_reruns_an_unfinished_run_from_scratch(tmp_path, monkeypatch):
    runs = FakeRuns()
    monkeypatch.setattr(budget_curve, "timed_run", runs)
    args = ["--out", str(tmp_path), "--budgets", "20", "10", "--seeds", "0", "1", "--fit-seeds", "1", "0",
            "--n-trials", "4", "--", "--model.depth=1", "--trainer.accelerator", "cpu"]
    first = budget_curve.main(args)
    assert runs.ran == ["fit_s0", "fit_s1", "budget_10_s0", "budget_10_s1", "budget_20_s0", "budget_20_s1"]
    scripts = Path(budget_curve.__file__).parent
    assert runs.commands[0] == [sys.executable, str(scripts / "fit.py"), "--seed_everything=0",
                                f"--trainer.logger.init_args.save_dir={tmp_path / 'fit_s0'}", *args[-3:]]
    assert runs.commands[2] == [sys.executable, str(scripts / "tune.py"), "--timeout", "10", "--sampler-seed", "0",
                                "--study-name", "budget_10_s0", "--quiet",
                                f"--trainer.logger.init_args.save_dir={tmp_path / 'budget_10_s0'}", "--n-trials", "4",
                                *args[-3:]]
    assert first["fit"]["test_acc"] == 0.9017 and first["fit"]["wall_seconds"] == 7.0
    assert first["fit"]["seeds"] == [0, 1] and first["fit"]["test_accs"] == [0.9017, 0.9017]
    assert first["rows"][0] == {"run": "budget_10_s0", "budget": 10, "seed": 0, "wall_seconds": 12.5, "test_acc": 0.91,
                                "answer": "ensemble", "trials_complete": 3, "trials_pruned": 0}

    # Interrupted during budget_20_s0: its study and logs are there, its record is not.
    (tmp_path / "budget_20_s0" / "run.json").unlink()
    stale = tmp_path / "budget_20_s0" / "tune" / "optuna.db"
    stale.write_text("a study to be resumed")
    runs.ran.clear()
    second = budget_curve.main(args)
    assert runs.ran == ["budget_20_s0"] and not stale.exists()
    assert second["rows"] == first["rows"]
    saved = json.loads((tmp_path / "budget_curve.json").read_text())
    assert saved["rows"] == [first["fit"], *first["rows"]]
    assert (tmp_path / "budget_curve.png").is_file() and "| mean | 20 |" in (tmp_path / "budget_curve.md").read_text()


def test_a_failed_run_stops_the_curve_naming_its_output_and_is_not_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(budget_curve, "timed_run", lambda command, output: (output.write_text("boom\n"), (1, 3.0))[1])
    output = tmp_path / "fit_s0" / "output.txt"
    with pytest.raises(UserError, match=f"fit_s0 exited with status 1; its output is in {output}"):
        budget_curve.main(["--out", str(tmp_path)])
    assert not (tmp_path / "fit_s0" / "run.json").exists()


def test_a_study_that_ends_without_its_report_stops_the_curve_and_is_not_recorded(tmp_path, monkeypatch):
    record_finished_fit(tmp_path, test_acc=0.9, wall_seconds=5.0)
    monkeypatch.setattr(budget_curve, "timed_run", lambda command, output: (output.write_text("{}\n"), (0, 2.0))[1])
    report = tmp_path / "budget_10_s0" / "tune" / "budget_10_s0" / "report.json"
    with pytest.raises(UserError, match=f"budget_10_s0 wrote no {report}"):
        budget_curve.main(["--out", str(tmp_path), "--budgets", "10", "--seeds", "0", "--fit-seeds", "0"])
    assert not (tmp_path / "budget_10_s0" / "run.json").exists()


@pytest.mark.parametrize("held", ["fit", "tune"])
def test_an_out_folder_holding_other_runs_is_refused_in_one_line_and_left_as_it_was(tmp_path, monkeypatch, held):
    # --out lightning_logs: fit.py's runs in lightning_logs/fit (which the curve's own fit/ would have emptied),
    # a study in lightning_logs/tune.
    logs = tmp_path / "lightning_logs"
    run = logs / held / ("version_0" if held == "fit" else "mlp")
    run.mkdir(parents=True)
    (run / "last.ckpt").write_bytes(b"weights")
    before = snapshot(logs)
    runs = FakeRuns()
    monkeypatch.setattr(budget_curve, "timed_run", runs)

    with pytest.raises(SystemExit) as exit:
        run_script(lambda: budget_curve.main(["--out", str(logs), "--budgets", "10", "--seeds", "0"]), interrupted="")

    assert exit.value.code == (f"error: --out {logs} holds other runs ({held}): budget_curve.py empties the run "
                               "folders it reruns, so it takes a new or empty folder, or one it wrote before")
    assert runs.ran == [] and snapshot(logs) == before


def record_finished_fit(out: Path, test_acc: float, wall_seconds: float, flags: tuple[str, ...] = ()) -> None:
    """OUT/fit_s0 as a curve leaves it once fit.py has run with seed 0 and `flags`: its output and its record."""
    (out / "fit_s0").mkdir(parents=True)
    (out / "fit_s0" / "output.txt").write_text(f"test accuracy {test_acc:.4f} (best checkpoint: x)\n")
    command = [sys.executable, "fit.py", "--seed_everything=0", f"--trainer.logger.init_args.save_dir={out / 'fit_s0'}",
               *flags]
    (out / "fit_s0" / "run.json").write_text(json.dumps({"command": command, "wall_seconds": wall_seconds}))


def test_a_curve_continued_with_other_flags_is_refused_and_left_as_it_was(tmp_path, monkeypatch):
    # Its runs had been taken as the new flags' and its results overwritten: the table named the GPU for CPU runs.
    runs = FakeRuns()
    monkeypatch.setattr(budget_curve, "timed_run", runs)
    curve = ["--out", str(tmp_path), "--budgets", "10", "--seeds", "0", "--fit-seeds", "0"]
    budget_curve.main([*curve, "--", "--model.width=16"])
    before, runs.ran = snapshot(tmp_path), []
    with pytest.raises(UserError, match="fit_s0 was run as `--seed_everything=0 --trainer.logger.init_args.save_dir="):
        budget_curve.main([*curve, "--", "--trainer.accelerator=gpu"])
    assert runs.ran == [] and snapshot(tmp_path) == before
    assert budget_curve.main([*curve, "--", "--model.width=16"])["rows"][0]["test_acc"] == 0.91  # the same continues


def test_a_real_curve_of_one_tiny_budget(synthetic_dir, tmp_path):
    # fit.py's run is recorded as finished, as when a curve continues: a real one would double the test's time
    # (fit.py's output is the one test_train checks; FakeRuns shows how it is read).
    out = tmp_path / "curve"  # beside synthetic_dir's data/, which the curve would refuse to share a folder with
    tiny = [f"--data.data_dir={synthetic_dir}", "--data.val_size=100", "--data.batch_size=32", "--model.depth=1",
            "--model.width=16", "--trainer.max_epochs=1", "--trainer.accelerator=cpu"]
    record_finished_fit(out, test_acc=0.8125, wall_seconds=9.5, flags=tuple(tiny))
    curve = ["--out", str(out), "--budgets", "30", "--seeds", "3", "--fit-seeds", "0", "--n-trials", "1"]
    result = budget_curve.main([*curve, "--", *tiny])

    assert result["fit"]["test_acc"] == 0.8125 and result["fit"]["wall_seconds"] == 9.5
    (row,) = result["rows"]
    report = json.loads((out / "budget_30_s3" / "tune" / "budget_30_s3" / "report.json").read_text())
    assert row["test_acc"] == report["test_acc"] and 0 < row["test_acc"] <= 1
    assert row["answer"] == report["final"]["answer"] and row["trials_complete"] == 1
    assert row["wall_seconds"] == json.loads((out / "budget_30_s3" / "run.json").read_text())["wall_seconds"] > 0
    assert result["hardware"].endswith(f"optuna {budget_curve.version('optuna')}") and "GPU" not in result["hardware"]
    markdown = (out / "budget_curve.md").read_text()
    assert f"| tune.py | 30 | 3 | {row['wall_seconds']:.0f} |" in markdown
    assert f"| {row['answer']} | {row['test_acc']:.4f} | {row['test_acc'] - 0.8125:+.4f} |" in markdown


@pytest.mark.parametrize(
    ("flags", "names_the_gpu"),
    [([], True), (["--trainer.accelerator", "gpu"], True), (["--trainer.accelerator=cpu"], False),
     (["--trainer.accelerator", "cpu", "--trainer.accelerator=cuda"], True)],
)
def test_the_hardware_names_the_gpu_unless_the_runs_were_told_to_use_the_cpu(flags, names_the_gpu, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.get_device_name", lambda index: "Some GPU 80GB")
    monkeypatch.setattr("shutil.which", lambda name: None)  # no nvidia-smi to ask for the driver
    described = budget_curve.hardware(flags)
    assert f", {os.cpu_count()} cores; " in described
    assert ("GPU Some GPU 80GB (driver unknown, CUDA" in described) == names_the_gpu
