"""Files a user hands over (a checkpoint, a study's report.json) read without running code, and checked against
what the code reads from them: each problem is one line, never a traceback. A checkpoint is a pickle, which can
call any function as it loads, so only torch's weights-only unpickler (tensors and plain values) ever loads one."""

import json
import pickle
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, InstanceOf, ValidationError

from mlp import classes
from mlp.errors import UserError, check, why_not_a_file
from mlp.module import MLPClassifier

FinalModel = Literal["refit_ensemble", "ensemble", "refit", "best"]  # mlp.final.FINAL_CHOICES, which trains
FINAL_MODELS = get_args(FinalModel)
PROBLEMS_SHOWN = 3  # a file wrong in many places is named by its first few problems, still in one line


class Schema(BaseModel):
    """What the code reads from a file, typed; keys it does not read are ignored. Strict: "5000" is no int."""

    model_config = ConfigDict(strict=True, frozen=True)


class DataSettings(Schema):
    """The data module's arguments a checkpoint keeps: they rebuild the split it trained on."""

    data_dir: str
    val_size: int
    seed: int


class Standardisation(Schema):
    """The training split's figures, as the data module's state_dict keeps them in a checkpoint."""

    mean: float
    std: float = Field(gt=0)


class Checkpoint(Schema):
    hyper_parameters: dict[str, Any]  # the model's arguments, checked by MLPClassifier itself
    datamodule_hyper_parameters: DataSettings
    state_dict: dict[str, InstanceOf[torch.Tensor]]
    FashionMNISTDataModule: Standardisation | None = None  # older checkpoints lack it
    optimizer_states: list[Any] | None = None  # a run's, to resume it; a stacked trial's or refit's has none
    global_step: int = 0  # optimiser steps taken when it was saved


class Candidate(Schema):
    """One of the report's final models."""

    test_acc: float | None
    why_no_test: str | None = None
    checkpoints: list[str] | None = None
    checkpoint: str | None = None


class Final(Schema):
    answer: FinalModel | None
    refit_ensemble: Candidate
    ensemble: Candidate
    refit: Candidate
    best: Candidate


class Report(Schema):
    study: str
    trials: dict[str, int]
    best_checkpoint: str | None = None  # these three only when a trial completed
    final: Final | None = None
    test_acc: float | None = None
    report_json: str | None = None  # where it was written, which its checkpoint paths name


def problems(error: ValidationError) -> str:
    """Pydantic's errors as one line: where in the file, and what is wrong there."""
    found = [f"{'.'.join(map(str, e['loc'])) or 'the whole file'}: {e['msg'].lower()}" for e in error.errors()]
    more = f"; and {len(found) - PROBLEMS_SHOWN} more" if len(found) > PROBLEMS_SHOWN else ""
    return "; ".join(found[:PROBLEMS_SHOWN]) + more


def read_report(path: Path) -> Report:
    """A study's report.json as tune.py writes it (`mlp.report.report`)."""
    try:
        return Report.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not a study's report.json ({error}); pass the one tune.py wrote") from None
    except ValidationError as error:
        raise UserError(f"{path} is not a report.json as tune.py writes it ({problems(error)})") from None


def read_checkpoint(path: Path) -> Checkpoint:
    """The settings in a checkpoint of fit.py or tune.py, loaded as tensors and plain values only."""
    check_is_a_file(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise refused(path) from None
    except Exception as error:  # torch.load raises many kinds for a file that is no checkpoint
        first = (str(error).strip() or type(error).__name__).splitlines()[0].split(". ")[0]  # torch's go on and on
        raise UserError(f"{path} is not a checkpoint, or one cut short ({first}); pass a .ckpt file") from None
    try:
        return Checkpoint.model_validate(content)
    except ValidationError as error:
        raise UserError(f"{path} is not a checkpoint as fit.py or tune.py write it ({problems(error)})") from None


def check_is_a_file(path: Path) -> None:
    check(path.is_file(), f"checkpoint {path} {why_not_a_file(path)}; pass .ckpt files written by fit.py or tune.py")


def refused(path: Path) -> UserError:
    """Why the weights-only unpickler refused a file, naming what it would have called when torch can tell; a file
    that is neither torch.save's zip nor a pickle (a photo, say) is simply no checkpoint."""
    with path.open("rb") as file:
        start = file.read(2)
    if start != b"PK" and start[:1] != b"\x80":  # a zip's signature; a pickle's PROTO opcode (torch's older format)
        return UserError(f"{path} is not a checkpoint; pass a .ckpt file written by fit.py or tune.py")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # reads the opcodes, runs none of them
    except Exception:  # not torch.save's zip format either
        unsafe = []
    calls = f"it would call {', '.join(unsafe)} as it loads" if unsafe else "it holds more than tensors and values"
    return UserError(f"{path} is refused: {calls}, which could run any code; only checkpoints of tensors and plain "
                     "values are loaded, as fit.py and tune.py write them")


def load_model(path: Path) -> MLPClassifier:
    """The model in a checkpoint, rebuilt from its own hyperparameters by Lightning's loader, tensors and plain
    values only. Callers handed the file check it with `read_checkpoint` first; a study's own trials need not."""
    check_is_a_file(path)
    try:
        model = classes.MODEL.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise refused(path) from None
    except (TypeError, ValueError, RuntimeError, KeyError) as error:  # arguments or weights that do not fit the net
        first_line = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise UserError(f"{path}: its model does not load ({first_line}); pass a checkpoint fit.py or tune.py "
                        "wrote") from None
    # A diverged run's last.ckpt: every answer would be NaN, and an ensemble's average with it too.
    check(all(p.isfinite().all() for p in model.parameters()), f"{path}: its weights are not all finite (its run "
          "diverged); pass a checkpoint saved before that, such as the run's best, epoch*.ckpt")
    return model


def inside(path: Path, folder: Path, named: str) -> Path:
    """`path`, resolved, if it lies inside `folder`; one elsewhere is refused, so that a report handed over (a
    shared study folder) cannot point the loader at any file on the machine. `named` says who named it."""
    resolved, folder = path.resolve(), folder.resolve()
    check(resolved.is_relative_to(folder),
          f"{named}, outside its study's folder {folder}: a report's checkpoints are loaded only from inside it")
    return resolved
