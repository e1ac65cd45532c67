"""The study's final model, chosen on validation and tested once: a refit on all training images, an
ensemble of the best trials' checkpoints, or both at once.

- refit: the best trial's configuration retrained on train + val (`--data.val_size 0`) for its own epochs, the
  way scikit-learn's GridSearchCV(refit=True) ends; it has no validation figure, its schedule fixes its length.
- ensemble: the softmax average of the k best trials' best checkpoints, k chosen on the validation split.
- refit_ensemble: the ensemble's k configurations, each refit on train + val, softmax-averaged.

Each candidate's test accuracy is measured once and kept in the study's user attributes, so a rerun of the
same command neither retrains nor retests.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from optuna.trial import FrozenTrial
from torch import Tensor

from mlp import classes
from mlp.budget import ENSEMBLE_MAX, Budget
from mlp.cli import MLPCLI, SEEDS, build_cli
from mlp.data import EVAL_BATCH_SIZE
from mlp.errors import UserError, check
from mlp.loading import load_model, read_checkpoint
from mlp.records import Ending, TrialRecord
from mlp.study import best_first, best_first_if_bounded
from mlp.trials import RunEnd, train_runs

REFIT_MEMBERS_MAX = 10  # the most runs a refit ensemble averages, later seed rounds included (see seed_rounds)
ROUND_SEED_STRIDE = 1_000_003  # a later round's seed: the trial's own plus this per round, apart from every trial's
FINAL_CHOICES = ("refit_ensemble", "ensemble", "refit", "best")  # also the order of fallbacks, in final_models


def accuracy(probabilities: Tensor, labels: Tensor) -> float:
    return (probabilities.argmax(dim=1) == labels.cpu()).float().mean().item()


@torch.no_grad()
def evaluate(checkpoints: Sequence[str], splits: dict[str, Tensor]) -> dict[str, list[Tensor]]:
    """Each checkpoint's softmax over each split's images (by split name), each checkpoint loaded once."""
    softmaxes: dict[str, list[Tensor]] = {name: [] for name in splits}
    for checkpoint in checkpoints:
        model = load_model(Path(checkpoint)).eval()
        for name, images in splits.items():
            softmaxes[name].append(torch.cat([model(x.cpu()).softmax(dim=1) for x in images.split(EVAL_BATCH_SIZE)]))
    return softmaxes


def ensemble(study: optuna.Study) -> dict[str, Any]:
    """The top-k average with k chosen on validation, tested once, on the split of the best trial with a
    checkpoint here (its own data settings); cached in the study for the same candidates."""
    ranked = best_first(study)[:ENSEMBLE_MAX]
    present = [t for t in ranked if Path(TrialRecord.of(t).best_checkpoint).is_file()]
    cached = study.user_attrs.get("ensemble")
    if cached and cached["candidates"] == [t.number for t in present]:
        return cached
    result: dict[str, Any] = {
        "what": f"softmax average of the k best trials' best checkpoints (k <= {ENSEMBLE_MAX}), k chosen on val",
        "candidates": [t.number for t in present],
        "missing_checkpoints": [t.number for t in ranked if t not in present],
    }
    if not present:
        return {**result, "test_acc": None, "why_no_test": "no checkpoint of a complete trial is on this machine"}
    data = trial_run(present[0], "final").datamodule
    data.setup("test")
    (val_x, val_y), (test_x, test_y) = data.val_set.tensors, data.test_set.tensors
    # Both splits in one pass over the checkpoints; k is chosen on val alone.
    checkpoints = [TrialRecord.of(t).best_checkpoint for t in present]
    softmax = evaluate(checkpoints, {"val": val_x, "test": test_x})
    # The running sum gives every top-k average; argmax of the sum is argmax of the average.
    val_accs = [accuracy(total, val_y) for total in torch.stack(softmax["val"]).cumsum(0)]
    k = max(range(len(present)), key=lambda i: (val_accs[i], -i)) + 1  # ties go to the smaller ensemble
    result.update(k=k, trials=[t.number for t in present[:k]], val_acc_by_k=val_accs, val_acc=val_accs[k - 1],
                  checkpoints=checkpoints[:k], test_acc=accuracy(sum(softmax["test"][:k]), test_y))
    study.set_user_attr("ensemble", result)
    return result


def trial_config(trial: FrozenTrial) -> str:
    """The config.yaml the trial's fit saved in its log folder: what the trial trained, whatever today's flags."""
    record = TrialRecord.of(trial)
    config = Path(record.log_dir) / "config.yaml"
    check(bool(record.log_dir) and config.is_file(), f"trial {trial.number}'s configuration {config} is not on this "
          f"machine; worker {record.worker} trained it: run the same command on that host, or share the log folder "
          "between machines")
    return str(config)


def trained_config(trial: FrozenTrial) -> dict[str, Any]:
    return yaml.safe_load(Path(trial_config(trial)).read_text())


def refit_recipe(trial: FrozenTrial) -> dict[str, Any]:
    """The trial's refit as a `fit.py --config` file holds it: the seed, epochs, model and batches of the config it
    trained (`trial_config`), on all training images (val_size 0); this machine's folders and logger left out."""
    trained = trained_config(trial)
    data = {"batch_size": trained["data"]["batch_size"], "seed": trained["data"]["seed"], "val_size": 0}
    return {"seed_everything": trained["seed_everything"], "trainer": {"max_epochs": trained["trainer"]["max_epochs"]},
            "model": trained["model"], "data": data}


def trial_run(trial: FrozenTrial, version: str, *flags: str) -> MLPCLI:
    """A new run of the trial's own configuration (`trial_config`) changed by `flags` alone, so that a study resumed
    with other fit flags still refits and tests what each trial trained. It logs to `version` beside the trial, or to
    the first free `version.2`, ... where an earlier run left that folder: two runs' logs in one would read as one."""
    config = trial_config(trial)
    beside = Path(config).parent.parent  # the folder holding the trial's run, where its config logs runs
    name, attempt = version, 1
    while (beside / name).exists():
        attempt += 1
        name = f"{version}.{attempt}"
    return build_cli([f"--config={config}", f"--trainer.logger.init_args.version={name}", *flags])


def refit_trials(study: optuna.Study, numbers: list[int], fuse: int, round_: int = 0) -> list[dict[str, Any]]:
    """The refits of trials `numbers` on all training images, each tested once and cached in the study per trial and
    round (the best trial's refit serves both final models that need it); a later round reseeds them (`seed_flag`).
    With fuse > 1 the uncached ones train in stacks of up to `fuse`, as tune.py --fuse stacks trials, but one at a
    time where their data settings differ (a study resumed with other data flags): they cannot share batches."""
    trials, todo = study.get_trials(deepcopy=False), [n for n in numbers if not refit_done(study, n, round_)]
    size = fuse if len(todo) > 1 else 1
    for start in range(0, len(todo), size):
        runs = {n: trial_run(trials[n], refit_name(n, round_, "refit_trial"), "--data.val_size=0",
                             *seed_flag(trials[n], round_))
                for n in todo[start : start + size]}
        data = [dict(cli.datamodule.hparams) for cli in runs.values()]
        if data.count(data[0]) == len(data):
            train_and_test_refits(study, runs, size, round_)
        else:
            for n, cli in runs.items():
                train_and_test_refits(study, {n: cli}, 1, round_)
    return [study.user_attrs[refit_name(n, round_)] for n in numbers]


def refit_name(number: int, round_: int, prefix: str = "refit") -> str:
    """The study attribute (or, with prefix refit_trial, the log folder) of trial `number`'s refit in `round_`."""
    return f"{prefix}_{number}" if round_ == 0 else f"{prefix}_{number}_seed{round_}"


def seed_flag(trial: FrozenTrial, round_: int) -> list[str]:
    """The flag that seeds a later round's refit apart from the trial's own seed (none in round 0, or unseeded)."""
    seed = trained_config(trial).get("seed_everything")
    if round_ == 0 or isinstance(seed, bool) or seed is None:
        return []
    return [f"--seed_everything={(seed + ROUND_SEED_STRIDE * round_) % SEEDS}"]


def refit_done(study: optuna.Study, number: int, round_: int = 0) -> bool:
    """Whether trial `number`'s refit was tested (an attribute set to None, as Optuna cannot delete one, is not)."""
    return bool(study.user_attrs.get(refit_name(number, round_)))


def all_refits(study: optuna.Study) -> list[dict[str, Any]]:
    """Every refit trained and tested, of every round (the study attributes `refit_name` names)."""
    return [value for key, value in study.user_attrs.items()
            if key.startswith("refit_") and key.split("_")[1].isdigit() and value]


def refitted(study: optuna.Study) -> frozenset[int]:
    """The numbers of the trials whose round-0 refits were trained and tested."""
    return frozenset(refit["trial"] for refit in all_refits(study) if not refit.get("seed_round"))


def train_and_test_refits(study: optuna.Study, runs: dict[int, MLPCLI], fuse: int, round_: int) -> None:
    """Train the refit runs `runs` (by trial number) alone (fuse == 1) or stacked; test each one's final weights
    once on the data it trained on, unless it diverged, and keep the result in the study (`refit_name`)."""
    ends: dict[str, RunEnd] = {}
    first = study.get_trials(deepcopy=False)[next(iter(runs))]
    group_args = [f"--config={trial_config(first)}", "--data.val_size=0"]
    data = train_runs({str(n): cli for n, cli in runs.items()}, group_args, fuse, ends.__setitem__)
    data.setup("test")
    test_x, test_y = data.test_set.tensors
    tested = [n for n in runs if ends[str(n)].how != Ending.DIVERGED]
    softmaxes = evaluate([ends[str(n)].checkpoint for n in tested], {"test": test_x})["test"]
    test_accs = {n: accuracy(softmax, test_y) for n, softmax in zip(tested, softmaxes)}
    for number, cli in runs.items():
        end = ends[str(number)]
        result: dict[str, Any] = {
            "what": f"trial {number}'s configuration retrained on train + val for its {cli.trainer.max_epochs}"
            " epochs; no validation figure, as no image was held out",
            "trial": number, "val_acc": None, "checkpoint": end.checkpoint, "epochs": cli.trainer.max_epochs,
            "multiply_adds": cli.model.net.multiply_adds(), "train_images": len(data.train_set),
        }
        if round_:
            result["seed_round"] = round_  # another seed of the configuration (see refit_ensemble)
        if fuse > 1:
            result["stacked_with"] = list(runs)  # trained in one stack (--fuse), each as it would alone
        result["test_acc"] = test_accs.get(number)
        if number not in test_accs:
            result["why_no_test"] = f"the refit diverged ({end.detail})"
        study.set_user_attr(refit_name(number, round_), result)


def refit_ensemble(study: optuna.Study, chosen: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """The configurations of the ensemble `chosen` on validation, each refit on train + val, softmax-averaged and
    tested once on test images standardised as the refits' training images were (all 60,000). Time left in the budget
    goes to more seeds of them (`seed_rounds`): more runs averaged lower the variance of a choice made on val."""
    result: dict[str, Any] = {
        "what": "the ensemble's k configurations, each retrained on train + val, softmax-averaged; no validation "
        "figure, as no image was held out",
        "val_acc": None,
    }
    if not chosen.get("trials"):
        return {**result, "test_acc": None, "why_no_test": chosen.get("why_none", "there is no ensemble to refit")}
    cached = study.user_attrs.get("refit_ensemble")
    if cached and cached["trials"] == chosen["trials"]:
        return cached
    try:
        members = refit_trials(study, chosen["trials"], budget.fuse)
    except UserError as error:  # a member's configuration is missing
        return {**result, "test_acc": None, "why_no_test": str(error)}
    diverged = [r["trial"] for r in members if r["test_acc"] is None]
    if not diverged:  # a later round's diverged run is left out: its configuration is in the ensemble already
        members += [r for r in seed_rounds(study, chosen["trials"], budget) if r["test_acc"] is not None]
    result.update(trials=chosen["trials"], diverged=diverged)
    if "smaller_than" in chosen:  # the budget left no time for the refits of the ensemble chosen on val
        result["smaller_than"] = chosen["smaller_than"]
    result["checkpoints"] = [r["checkpoint"] for r in members]
    if diverged:  # dropping a member would make an ensemble that validation did not choose: none instead
        result.update(test_acc=None, why_no_test=f"the refits of trials {diverged} diverged")
    else:
        result["seeds_per_trial"] = {str(n): sum(r["trial"] == n for r in members) for n in chosen["trials"]}
        result["test_acc"] = test_checkpoints(result["checkpoints"])["test_acc"]
    study.set_user_attr("refit_ensemble", result)
    return result


def seed_rounds(study: optuna.Study, numbers: list[int], budget: Budget) -> list[dict[str, Any]]:
    """Once the --timeout budget has stopped the trials, the refits of further rounds, each round the ensemble's
    best configurations that fit in the time left (all of them while they fit), until none fits or the ensemble
    holds REFIT_MEMBERS_MAX runs: so a budget no trial fitted in is spent on the final model."""
    if budget.trials_may_start(best_first_if_bounded(study, budget)):
        return []  # no --timeout, or the study ended on its --n-trials with time to spare
    by_number, made = {t.number: t for t in study.get_trials(deepcopy=False)}, []
    for round_ in range(1, REFIT_MEMBERS_MAX):
        room = REFIT_MEMBERS_MAX - len(numbers) - len(made)
        fits = next((k for k in range(min(len(numbers), room), 0, -1)
                     if over_budget(budget, [by_number[n] for n in numbers[:k]]) is None), 0)
        if not fits:
            break
        made += refit_trials(study, numbers[:fits], budget.fuse, round_)
    return made


def test_checkpoints(checkpoints: list[str], data_dir: str | None = None) -> dict[str, Any]:
    """The softmax average of the given checkpoints (one is a plain test), on the split they were trained
    with: its validation accuracy when they held one out, and its test accuracy, measured once."""
    settings = [read_checkpoint(Path(path)).datamodule_hyper_parameters for path in checkpoints]
    trained_on = {(hparams.val_size, hparams.seed) for hparams in settings}
    check(len(trained_on) == 1, "the checkpoints were trained on different validation splits (val_size, seed): "
          f"{sorted(trained_on)}; average checkpoints from one split")
    val_size, seed = settings[0].val_size, settings[0].seed
    data = classes.DATA(data_dir or settings[0].data_dir, val_size=val_size, seed=seed)
    data.setup("test")
    splits = {"val": data.val_set, "test": data.test_set} if val_size else {"test": data.test_set}
    softmax = evaluate(checkpoints, {name: split.tensors[0] for name, split in splits.items()})
    accuracies = {name: accuracy(sum(softmax[name]), split.tensors[1]) for name, split in splits.items()}
    return {"checkpoints": checkpoints, "val_acc": accuracies.get("val"), "test_acc": accuracies["test"]}


def best_checkpoint(study: optuna.Study) -> dict[str, Any]:
    """The best trial's best checkpoint; its test accuracy is measured once per best trial and kept in the study."""
    result = {"what": "the best trial's best checkpoint (by val/acc)", "val_acc": study.best_value}
    best = study.best_trial
    if study.user_attrs.get("test_trial") == best.number:
        return {**result, "test_acc": study.user_attrs["test_acc"]}
    checkpoint, worker = TrialRecord.of(best).best_checkpoint, TrialRecord.of(best).worker
    try:
        check(Path(checkpoint).is_file(), f"the best trial's checkpoint {checkpoint} is not on this machine; worker "
              f"{worker} trained it: run the same command on that host, or share the log folder between machines")
        cli = trial_run(best, "best_trial_test")  # its own data settings, whatever today's flags
        (results,) = cli.trainer.test(load_model(Path(checkpoint)), datamodule=cli.datamodule)
    except UserError as error:  # its checkpoint or configuration is missing
        return {**result, "test_acc": None, "why_no_test": str(error)}
    study.set_user_attr("test_trial", best.number)
    study.set_user_attr("test_acc", results["test/acc"])
    return {**result, "test_acc": results["test/acc"]}


def refit_best(study: optuna.Study, budget: Budget) -> dict[str, Any]:
    result = {"what": "the best trial's configuration refit", "test_acc": None}
    best = study.best_trial
    if not refit_done(study, best.number) and (why := over_budget(budget, [best], fuse=1)):
        return {**result, "why_no_test": why}
    try:
        return refit_trials(study, [best.number], fuse=1)[0]
    except UserError as error:  # its configuration is missing
        return {**result, "why_no_test": str(error)}


def over_budget(budget: Budget, trials: list[FrozenTrial], fuse: int | None = None) -> str | None:
    """Why refitting `trials` does not fit in the time left, or None if it does."""
    needed, left = budget.refit_seconds(trials, fuse), budget.left() - budget.finish
    if needed <= left:
        return None
    return f"its refits would take about {needed:.0f} s and {max(left, 0):.0f} s of --timeout were left for them"


def affordable_ensemble(study: optuna.Study, averaged: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """The ensemble to refit: `averaged`'s, or, when its refits do not fit in the budget, the largest smaller one
    (the k best trials) whose refits do; with none, no members (and why). The largest, not the best on val: val
    differs by a few thousandths between such ensembles, inside the noise of 5,000 images, while every refit member
    averages away more of one run's luck; and the reserve kept time for the best trials' refits (`mlp.budget`)."""
    if not averaged.get("trials"):
        return averaged
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    candidates = averaged["candidates"]

    def untrained(k: int) -> list[FrozenTrial]:
        return [by_number[n] for n in candidates[:k] if not refit_done(study, n)]

    whole = over_budget(budget, untrained(averaged["k"]))
    if whole is None:
        return averaged
    for k in range(averaged["k"] - 1, 0, -1):
        if over_budget(budget, untrained(k)) is None:
            why = f"the ensemble of {averaged['k']} chosen on val: {whole}"
            return {**averaged, "k": k, "trials": candidates[:k], "smaller_than": why}
    return {**averaged, "trials": [], "why_none": over_budget(budget, untrained(1))}


def final_models(study: optuna.Study, answer: str, budget: Budget) -> dict[str, Any]:
    """Every candidate final model with its val and test figures, and the answer: `answer` if it could be tested,
    else the first of FINAL_CHOICES that could (a val figure never stands in for a test figure). A refit that would
    overrun the budget is not trained, and its candidate says why it has no test figure. The answer is made first."""
    averaged = ensemble(study)
    makers = {
        "refit_ensemble": lambda: refit_ensemble(study, affordable_ensemble(study, averaged, budget), budget),
        "ensemble": lambda: averaged,
        "refit": lambda: refit_best(study, budget),
        "best": lambda: best_checkpoint(study),
    }
    made = {name: makers[name]() for name in dict.fromkeys((answer, *FINAL_CHOICES))}
    candidates = {name: made[name] for name in FINAL_CHOICES}
    chosen = next((name for name in (answer, *FINAL_CHOICES) if candidates[name]["test_acc"] is not None), None)
    summary = {"answer": chosen, "test_acc": candidates[chosen]["test_acc"] if chosen else None, **candidates}
    if chosen != answer:
        why = candidates[answer]["why_no_test"]
        summary["fallback"] = f"{answer} has no test figure ({why}); answering with {chosen}"
    return summary
