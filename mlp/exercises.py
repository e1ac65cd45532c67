"""The exercises of d2l's "Multilayer Perceptrons from Scratch", as sweeps that choose on validation.

Each sweep changes one thing in d2l's setting (`D2L_SETTING`). Every run trains as fit.py's does (`mlp.run.train`),
kept at its best epoch by val/acc; a sweep tests the run it selects on val/acc once (`mlp.run.test_once`), where
the textbook chose on the test set."""

import contextlib
import json
import shutil
import time
from pathlib import Path

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import BatchSizeFinder, LambdaCallback, LearningRateFinder
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

import mlp.run
from mlp.cli import LOG_DIR, build_cli, check_keeps_a_checkpoint, divergence_message, held_alone, validates_within
from mlp.errors import UserError, check

D2L_SETTING = {
    "model.depth": 1, "model.width": 256, "model.init": "normal", "model.optimizer": "sgd", "model.lr": 0.1,
    "model.momentum": 0.0, "model.nesterov": False, "model.weight_decay": 0.0, "model.schedule": "constant",
    "trainer.max_epochs": 10, "data.batch_size": 256,
}

SWEEPS = {
    "width": [{"model.width": width} for width in (32, 64, 128, 256, 512, 1024, 2048)],
    "depth": [{"model.depth": depth} for depth in (1, 2, 4, 8)],
    "lr": [{"model.lr": lr} for lr in (0.01, 0.1, 1.0, 10.0)],
    # A comparison, not a selection: how deep each init scheme still trains. Nothing here is tested.
    "init": [{"model.init": init, "model.depth": depth} for init in ("normal", "kaiming", "xavier")
             for depth in range(1, 9)],
}
SELECTS = {"width", "depth", "lr"}


def differences(changes: dict) -> dict:
    return {key: value for key, value in changes.items() if D2L_SETTING.get(key) != value}


def run_name(changes: dict) -> str:
    """The flags that differ from d2l's setting, e.g. 'width=512' or 'init=kaiming,depth=3' ('d2l' if none): runs
    are named by what they are, so a run two sweeps share is trained once."""
    return ",".join(f"{key.split('.')[-1]}={value}" for key, value in differences(changes).items()) or "d2l"


def as_flags(settings: dict) -> list[str]:
    return [f"--{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in settings.items()]


def fit_flags(changes: dict, save_dir: Path, name: str, extra: list[str]) -> list[str]:
    logger = [f"--trainer.logger.init_args.{key}={value}" for key, value in
              (("save_dir", save_dir), ("name", "exercises"), ("version", name))]  # fmt: skip
    quiet = ["--progress_bar.refresh_rate=0", "--trainer.enable_model_summary=false"]
    # `extra` overrides d2l's setting, never the run's own change (a --config file could hold one).
    return [*as_flags(D2L_SETTING), *logger, *quiet, *extra, *as_flags(changes)]


def train(changes: dict, save_dir: Path, extra: list[str]) -> dict:
    """Fit one configuration as fit.py does; its best val/acc, the epoch it came at, and that epoch's checkpoint."""
    name = run_name(changes)
    run_dir = save_dir / "exercises" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # what an interrupted attempt left
    cli = build_cli(fit_flags(changes, save_dir, name, extra))
    # A logger of the fit flags' or a --config's own would split the runs from the results.json that records them
    # (None: fast_dev_run, refused below).
    logs = cli.trainer.log_dir
    check(logs is None or Path(logs).resolve() == run_dir.resolve(), f"the fit flags log the run to {logs}, not to "
          f"{run_dir} beside the sweep's results.json: drop their --trainer.logger settings, and choose the folder "
          "with --save_dir")
    finders = [type(c).__name__ for c in cli.trainer.callbacks if isinstance(c, (LearningRateFinder, BatchSizeFinder))]
    check(not finders, f"drop the {', '.join(finders)} of --trainer.callbacks: a run is named by what differs from "
          "d2l's setting, and a finder would change its learning rate or batch size unsaid")
    check_keeps_a_checkpoint(cli, "a sweep tests the run it selects from its best checkpoint")
    check(validates_within(cli, cli.trainer.max_epochs), "a sweep selects on each run's val/acc, "
          "which these fit flags never measure: keep --data.val_size and --trainer.limit_val_batches above 0, and "
          "--trainer.check_val_every_n_epoch at most --trainer.max_epochs")
    # ddp_spawn's and ddp_fork's processes train with copies of this one's callbacks: no epoch's val/acc comes back. The
    # launcher's class is private to Lightning; tests/test_exercises.py fails on an upgrade that renames it.
    check(not isinstance(cli.trainer.strategy.launcher, _MultiProcessingLauncher), "a sweep records each epoch's "
          "val/acc in this process, and --trainer.strategy ddp_spawn (or ddp_fork) trains in processes of its own: "
          "use --trainer.strategy ddp")
    per_epoch: list[float] = []  # val/acc after every training epoch (the sanity check before training is left out)

    def record_val_acc(trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            per_epoch.append(trainer.callback_metrics["val/acc"].item())

    cli.trainer.callbacks.append(LambdaCallback(on_validation_end=record_val_acc))
    start = time.perf_counter()
    checkpoint = mlp.run.train(cli)
    score = cli.checkpoint_callback.best_model_score  # None: it diverged before a finite epoch
    return {"changes": differences(changes), "val_acc": None if score is None else score.item(),
            "best_epoch": per_epoch.index(max(per_epoch)) + 1, "val_acc_per_epoch": per_epoch,
            "diverged": divergence_message(cli.trainer) is not None, "checkpoint": checkpoint,
            "seconds": round(time.perf_counter() - start, 1), "fit_flags": extra}


def test(run: dict, save_dir: Path, extra: list[str]) -> float:
    """Test accuracy of a run's best checkpoint; called once per selected run, as the results file records."""
    cli = build_cli(fit_flags(run["changes"], save_dir, run_name(run["changes"]), extra))
    return mlp.run.test_once(cli, run["checkpoint"])["test/acc"]


def run_sweep(sweep: str, save_dir: Path | str = LOG_DIR, only: list[str] | None = None, extra=()) -> dict:
    """Train the sweep's runs not yet in save_dir/exercises/results.json (only those named in `only`, if given);
    once all are there, select on val/acc and test the selected run, unless it was tested before."""
    check(sweep in SWEEPS, f"unknown sweep {sweep!r}; choose one of {', '.join(SWEEPS)}")
    save_dir, extra = Path(save_dir), list(extra)
    names = {run_name(changes): changes for changes in SWEEPS[sweep]}
    unknown = set(only or []) - set(names)
    check(not unknown, f"--only {' '.join(sorted(unknown))}: not in the {sweep} sweep ({' '.join(names)})")
    swept = {key for changes in SWEEPS[sweep] for key in changes} & {arg[2:].split("=")[0] for arg in extra}
    check(not swept, f"{', '.join(f'--{key}' for key in sorted(swept))}: the {sweep} sweep sets it for each run; "
          "drop it (other fit flags change d2l's setting for every run)")
    results_file = save_dir / "exercises" / "results.json"
    with only_sweep(results_file.parent):
        results = json.loads(results_file.read_text()) if results_file.is_file() else {}
        # A run is kept by name: one trained with other fit flags (fewer epochs, other data) must not join this sweep.
        if other := [name for name in names if name in results and results[name].get("fit_flags", []) != extra]:
            raise UserError(f"{results_file} holds {', '.join(other)} trained with the fit flags "
                            f"{results[other[0]].get('fit_flags', [])}, not {extra}: give the same flags, or another "
                            "--save_dir for runs with these")

        def save() -> None:
            partial = results_file.with_suffix(".partial")
            partial.write_text(json.dumps(results, indent=1))
            partial.replace(results_file)  # never a half-written results file

        for name, changes in names.items():
            if name not in results and (only is None or name in only):
                results[name] = train(changes, save_dir, extra)
                save()
        runs = {name: results[name] for name in names if name in results}
        selected = None
        if sweep in SELECTS and len(runs) == len(names):
            kept = [name for name in runs if runs[name]["val_acc"] is not None]
            selected = max(kept, key=lambda name: runs[name]["val_acc"], default=None)  # the first of equals
            if selected is not None and "test_acc" not in runs[selected]:
                runs[selected]["test_acc"] = test(runs[selected], save_dir, extra)
                save()
        return {"runs": runs, "selected": selected, "missing": [name for name in names if name not in runs]}


def only_sweep(folder: Path) -> contextlib.AbstractContextManager[None]:
    """The folder's sweeps one at a time: two at once would train the runs they share (d2l's is in every sweep) into
    one folder, each emptying it as it starts, and each rewrite results.json without the other's."""
    return held_alone(folder / "sweep.lock", f"another exercises.py is running in {folder}: wait for it to end, or "
                      "give this one another --save_dir")


def markdown_table(sweep: str, outcome: dict) -> str:
    """The sweep as a table: val acc for every run, test acc only for the selected one."""
    lines = ["| run | best val acc | at epoch | test acc | seconds |", "|---|---|---|---|---|"]
    for name, run in outcome["runs"].items():
        chosen = name == outcome["selected"]
        val = "none" if run["val_acc"] is None else f"{run['val_acc']:.4f}"
        val += " (diverged)" if run["diverged"] else ""
        test_acc = f"**{run['test_acc']:.4f}**" if chosen else "—"
        lines.append(f"| {name}{' ← selected' if chosen else ''} | {val} | {run['best_epoch']} | {test_acc} | "
                     f"{run['seconds']:.0f} |")  # fmt: skip
    lines += [f"| {name} | not run yet | | | |" for name in outcome["missing"]]
    return "\n".join(lines)
