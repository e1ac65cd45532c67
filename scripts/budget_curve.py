"""The budget curve: what each `tune.py --timeout` buys, beside fit.py's default measured in the same run.

    python scripts/budget_curve.py                       # 120 300 600 1200 s, seeds 0 1 2, in lightning_logs
    python scripts/budget_curve.py --out lightning_logs/budget_gpu --budgets 60 120 300 -- --trainer.accelerator gpu
    python scripts/budget_curve.py --out /tmp/try --budgets 40 --seeds 0 --fit-seeds 0 --n-trials 2 -- --model.width 16

For each budget T and sampler seed S it runs `tune.py --timeout T --sampler-seed S --quiet` in OUT/budget_T_sS (a
study of its own), times the whole command and reads the answer's test accuracy. The baseline is fit.py's default
averaged over --fit-seeds (OUT/fit_sS; one fit moves by a few thousandths). Flags after `--` go to tune.py and fit.py.

A finished run (its wall time in run.json) is not run again, so the same command continues an interrupted curve (one
with other flags is refused); an unfinished one starts over in an emptied folder (a resumed study's time would mean
nothing): OUT must be new, empty or a curve's own. Writes OUT/budget_curve.json (the rows), .md (the table, with
commit, hardware, goals), .png (the plot).
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from statistics import mean
from typing import Any

from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlp.errors import check, run_script  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The promise --timeout is to keep: `--timeout 240` ends, report included, between 204 s = 0.85 × 240 (the budget
# used, not left idle) and 294 s = 1.1 × 240 + 30.
SLACK, USED, STARTUP_SECONDS = 1.1, 0.85, 30.0
MARGIN = 0.003  # the goal: each budget's mean over the sampler seeds tests at least fit's default + MARGIN
FIT_TEST = re.compile(r"^test accuracy (\d+(?:\.\d+)?)", re.M)
RESULTS = ("budget_curve.json", "budget_curve.md", "budget_curve.png")
RUN_FOLDER = re.compile(r"fit_s\d+|budget_\d+_s\d+")


def check_out_is_a_curves(out: Path) -> None:
    """Refuse an --out holding anything but a curve's own runs and results: a run without a record is rerun in an
    emptied folder, so `--out lightning_logs` would empty fit.py's runs in lightning_logs/fit."""
    if not out.exists():
        return
    check(out.is_dir(), f"--out {out} is a file; pass a folder")
    others = [entry.name for entry in sorted(out.iterdir()) if not curves_own(entry)]
    check(not others, f"--out {out} holds other runs ({', '.join(others[:3])}{', ...' * (len(others) > 3)}): "
          "budget_curve.py empties the run folders it reruns, so it takes a new or empty folder, "
          "or one it wrote before")


def curves_own(entry: Path) -> bool:
    """Whether `entry` is a result or a run folder of the curve's (it writes output.txt first; fit.py's have none)."""
    if entry.name in RESULTS:
        return entry.is_file()
    owned = (entry / "output.txt").is_file() or not any(entry.iterdir()) if entry.is_dir() else False
    return RUN_FOLDER.fullmatch(entry.name) is not None and owned


def timed_run(command: list[str], output: Path) -> tuple[int, float]:
    """`command`'s exit status and wall seconds, launch to exit; its stdout and stderr go to `output`."""
    with output.open("w") as log:
        launched = time.perf_counter()
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
        return returncode, time.perf_counter() - launched


def run_once(name: str, command: list[str], out: Path, writes: str = "output.txt") -> float:
    """Wall seconds of `command` in OUT/name: as recorded if it succeeded before, else run now in an emptied folder."""
    folder, record = out / name, out / name / "run.json"
    if record.is_file():
        recorded = json.loads(record.read_text())
        # Another command's figure would stand in this curve's table, under this command's flags.
        check(recorded["command"][2:] == command[2:], f"{name} was run as `{' '.join(recorded['command'][2:])}`: "
              "run the command that made this --out to continue its curve, or give another --out")
        return recorded["wall_seconds"]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"{name}: {' '.join(command)}", flush=True)
    returncode, seconds = timed_run(command, folder / "output.txt")
    check(returncode == 0, f"{name} exited with status {returncode}; its output is in {folder / 'output.txt'}. "
          "Fix the cause and run the same command again: the runs that finished are kept")
    check((folder / writes).is_file(), f"{name} wrote no {folder / writes}; see {folder / 'output.txt'}")
    record.write_text(json.dumps({"command": command, "wall_seconds": round(seconds, 2)}, indent=2) + "\n")
    return seconds


def fit_row(out: Path, seeds: list[int], flags: list[str]) -> dict[str, Any]:
    """fit.py's default once per training seed: the mean test accuracy and wall time, and each seed's figure."""
    accs, seconds = [], []
    for seed in seeds:
        name = f"fit_s{seed}"
        command = [sys.executable, str(ROOT / "scripts" / "fit.py"), f"--seed_everything={seed}",
                   f"--trainer.logger.init_args.save_dir={out / name}", *flags]
        seconds.append(run_once(name, command, out))
        printed = FIT_TEST.findall((out / name / "output.txt").read_text())
        check(bool(printed), f"fit.py printed no test accuracy; see {out / name / 'output.txt'}")
        accs.append(float(printed[-1]))
    return {"run": "fit", "budget": None, "seed": None, "wall_seconds": round(mean(seconds), 2),
            "test_acc": mean(accs), "answer": "fit.py default", "trials_complete": None, "trials_pruned": None,
            "seeds": seeds, "test_accs": accs}


def tune_row(out: Path, budget: int, seed: int, n_trials: int | None, flags: list[str]) -> dict[str, Any]:
    name = f"budget_{budget}_s{seed}"
    command = [sys.executable, str(ROOT / "scripts" / "tune.py"), "--timeout", str(budget), "--sampler-seed",
               str(seed), "--study-name", name, "--quiet", f"--trainer.logger.init_args.save_dir={out / name}",
               *(["--n-trials", str(n_trials)] if n_trials else []), *flags]
    seconds = run_once(name, command, out, writes=f"tune/{name}/report.json")
    from mlp.loading import read_report  # imports torch: not for --help

    report = read_report(out / name / "tune" / name / "report.json")
    return {"run": name, "budget": budget, "seed": seed, "wall_seconds": round(seconds, 2),
            "test_acc": report.test_acc, "answer": report.final.answer if report.final else None,
            "trials_complete": report.trials.get("complete", 0), "trials_pruned": report.trials.get("pruned", 0)}


def within_bound(row: dict[str, Any]) -> bool:
    return USED * row["budget"] <= row["wall_seconds"] <= SLACK * row["budget"] + STARTUP_SECONDS


def goals(rows: list[dict[str, Any]], fit: dict[str, Any]) -> list[str]:
    """The issue's goals, each as a line saying whether the rows meet it and, if not, where they fail."""
    below = [r["run"] for r in rows if r["test_acc"] is None or r["test_acc"] < fit["test_acc"]]
    means = budget_means(rows)
    short = [f"{b} s" for b, acc in means if acc is None or acc < fit["test_acc"] + MARGIN]
    known = [(budget, acc) for budget, acc in means if acc is not None]
    worse = [f"{b} s" for (_, x), (b, y) in zip(known, known[1:]) if y < x]
    outside = [r["run"] for r in rows if not within_bound(r)]
    checks = [
        ("every answer tests at least fit's default (its mean over the training seeds)", below, "below:"),
        (f"each budget's mean over the sampler seeds tests at least fit's default + {MARGIN}", short, "short at"),
        ("a longer budget is never worse on average over the seeds", worse, "the mean drops at"),
        (f"every run ends between {USED:g} × budget and {SLACK:g} × budget + {STARTUP_SECONDS:g} s", outside,
         "outside:"),
    ]
    return [f"- {goal}: " + (f"NOT met ({how} {', '.join(failures)})" if failures else "met")
            for goal, failures, how in checks]


def budget_means(rows: list[dict[str, Any]]) -> list[tuple[int, float | None]]:
    """Each budget with its mean test accuracy over the seeds (None when a seed's answer has no test figure)."""
    budgets = sorted({r["budget"] for r in rows})
    accs = {b: [r["test_acc"] for r in rows if r["budget"] == b] for b in budgets}
    return [(b, mean(a) if None not in a else None) for b, a in accs.items()]


def table(rows: list[dict[str, Any]], fit: dict[str, Any], commit: str, hardware: str, flags: list[str]) -> str:
    """The curve as markdown: where it was measured, fit's row, a row per run and per budget's mean, the goals."""

    def acc(value: float | None) -> str:
        return "—" if value is None else f"{value:.4f}"

    def gain(value: float | None) -> str:
        return "—" if value is None else f"{value - fit['test_acc']:+.4f}"

    each = ", ".join(f"{a:.4f}" for a in fit["test_accs"])
    seeds = f"seed{'s' * (len(fit['seeds']) > 1)} {' '.join(map(str, fit['seeds']))} ({each})"
    lines = [
        f"Commit {commit}; {hardware}.",
        f"Flags after `--` (every tune.py and fit.py): `{' '.join(flags) or 'none'}`.",
        "",
        f"| run | --timeout T (s) | sampler seed | wall (s) | within {USED:g} × T to {SLACK:g} × T + "
        f"{STARTUP_SECONDS:g} s | trials (complete + pruned) | answer | test acc | vs fit |",
        "|---|---:|---:|---:|---|---:|---|---:|---:|",
        f"| fit.py | — | — | {fit['wall_seconds']:.0f} | — | — | {fit['answer']}, {seeds} | "
        f"{acc(fit['test_acc'])} | — |",
    ]
    means = dict(budget_means(rows))
    for budget in sorted(means):
        runs = sorted((r for r in rows if r["budget"] == budget), key=lambda r: r["seed"])
        for r in runs:
            lines.append(f"| tune.py | {budget} | {r['seed']} | {r['wall_seconds']:.0f} | "
                         f"{'yes' if within_bound(r) else 'no'} | {r['trials_complete']} + {r['trials_pruned']} | "
                         f"{r['answer'] or '—'} | {acc(r['test_acc'])} | {gain(r['test_acc'])} |")
        if len(runs) > 1:
            wall, test = mean(r["wall_seconds"] for r in runs), means[budget]
            lines.append(f"| mean | {budget} | — | {wall:.0f} | — | — | — | {acc(test)} | {gain(test)} |")
    return "\n".join([*lines, "", "Goals:", *goals(rows, fit)]) + "\n"


def plot(rows: list[dict[str, Any]], fit: dict[str, Any], path: Path) -> Figure:
    """Test accuracy and wall time against the budget: a line per seed and their mean, fit's default beside them."""
    figure = Figure(figsize=(11, 4.2))
    accuracy, wall = figure.subplots(1, 2)
    budgets = sorted({r["budget"] for r in rows})
    for seed in sorted({r["seed"] for r in rows}):
        runs = sorted((r for r in rows if r["seed"] == seed and r["test_acc"] is not None), key=lambda r: r["budget"])
        accuracy.plot([r["budget"] for r in runs], [r["test_acc"] for r in runs], "o-", alpha=0.6, label=f"seed {seed}")
        wall.plot([r["budget"] for r in runs], [r["wall_seconds"] for r in runs], "o", alpha=0.6, label=f"seed {seed}")
    means = [(b, m) for b, m in budget_means(rows) if m is not None]
    accuracy.plot([b for b, _ in means], [m for _, m in means], "s-", color="black", linewidth=2, label="mean")
    accuracy.axhline(fit["test_acc"], color="tab:red", label=f"fit.py default, mean ({fit['test_acc']:.4f})")
    accuracy.axhline(fit["test_acc"] + MARGIN, color="tab:red", linestyle="--", label=f"fit.py default + {MARGIN}")
    accuracy.set(xscale="log", xlabel="tune.py --timeout (s)", ylabel="answer's test accuracy",
                 title="What a budget buys")
    bound = [SLACK * b + STARTUP_SECONDS for b in budgets]
    wall.plot(budgets, bound, "--", color="gray", label=f"{SLACK:g} × budget + {STARTUP_SECONDS:g} s")
    wall.plot(budgets, [USED * b for b in budgets], "-.", color="gray", label=f"{USED:g} × budget")
    wall.plot(budgets, budgets, ":", color="gray", label="the budget")
    wall.axhline(fit["wall_seconds"], color="tab:red", label=f"fit.py default ({fit['wall_seconds']:.0f} s)")
    wall.set(xscale="log", yscale="log", xlabel="tune.py --timeout (s)", ylabel="whole command's wall time (s)",
             title="What it costs")
    wall.set_yticks(budgets, [str(b) for b in budgets])
    for ax in (accuracy, wall):
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return figure


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return f"{head} with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else head


def flag_value(flags: list[str], name: str) -> str | None:
    """The last value `flags` give `name`, as `name VALUE` or `name=VALUE`."""
    value = None
    for flag, following in zip(flags, [*flags[1:], None]):
        if flag == name or flag.startswith(f"{name}="):
            value = following if flag == name else flag.split("=", 1)[1]
    return value


def hardware(flags: list[str]) -> str:
    """The CPU, the GPU if the runs used one (any accelerator but cpu, auto included), and the library versions."""
    cpuinfo = Path("/proc/cpuinfo")
    models = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M) if cpuinfo.is_file() else []
    parts = [f"{models[0] if models else platform.processor() or 'unknown CPU'}, {os.cpu_count()} cores"]
    accelerator = flag_value(flags, "--trainer.accelerator") or "auto"
    import torch

    if accelerator != "cpu" and torch.cuda.is_available():
        smi = shutil.which("nvidia-smi")
        driver = smi and subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True).stdout.split("\n")[0].strip()
        parts.append(f"GPU {torch.cuda.get_device_name(0)} (driver {driver or 'unknown'}, CUDA {torch.version.cuda})")
    libraries = ", ".join(f"{name} {version(name)}" for name in ("torch", "lightning", "optuna"))
    return "; ".join([*parts, f"Python {platform.python_version()}, {libraries}"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("lightning_logs/budget_curve"),
                        help="folder of the runs and the results (default lightning_logs/budget_curve)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[120, 300, 600, 1200], metavar="SECONDS",
                        help="the --timeout of each tune.py (default 120 300 600 1200)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED",
                        help="the --sampler-seed of each tune.py (default 0 1 2)")
    parser.add_argument("--fit-seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED",
                        help="the --seed_everything of each fit.py run, whose mean is the baseline (default 0 1 2)")
    parser.add_argument("--n-trials", type=int, metavar="N",
                        help="the --n-trials of each tune.py (default tune.py's), so that a long budget is not "
                        "cut short by the trial count")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="-- then the flags of every tune.py and fit.py")
    args = parser.parse_args(argv)
    check(all(b > 0 for b in args.budgets), f"--budgets are positive seconds, got {args.budgets}")
    check(all(s >= 0 for s in args.seeds), f"--seeds are sampler seeds >= 0, got {args.seeds}")
    check(all(s >= 0 for s in args.fit_seeds), f"--fit-seeds are training seeds >= 0, got {args.fit_seeds}")
    check(args.n_trials is None or args.n_trials >= 1, f"--n-trials must be >= 1, got {args.n_trials}")
    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    out = args.out.resolve()
    check_out_is_a_curves(out)
    fit = fit_row(out, sorted(set(args.fit_seeds)), flags)
    rows = [tune_row(out, budget, seed, args.n_trials, flags) for budget in sorted(set(args.budgets))
            for seed in sorted(set(args.seeds))]
    where = {"commit": commit(), "hardware": hardware(flags), "flags": flags}
    (out / "budget_curve.json").write_text(json.dumps({**where, "rows": [fit, *rows]}, indent=2) + "\n")
    (out / "budget_curve.md").write_text(table(rows, fit, where["commit"], where["hardware"], flags))
    plot(rows, fit, out / "budget_curve.png")
    print((out / "budget_curve.md").read_text(), end="")
    print(f"rows: {out / 'budget_curve.json'}\nplot: {out / 'budget_curve.png'}")
    return {**where, "fit": fit, "rows": rows}


if __name__ == "__main__":
    run_script(main, interrupted="the runs that finished are kept; run the same command again to continue the curve",
               writes_with="--out")
