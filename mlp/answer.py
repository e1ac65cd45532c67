"""The study's answer as one model: raw images in, class probabilities out, the standardisation inside.

`load_answer` turns a study's report.json or fit.py's checkpoints into the softmax average of their nets, each
standardising images as its own training split was (a refit's 60,000 images and a trial's 55,000 differ in mean);
`export` writes it as one file. docs/predict.md says how to use either.
"""

import io
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from mlp import classes
from mlp.data import CLASS_NAMES, IMAGE_SIDE, DatasetNotFoundError, FashionMNISTDataModule
from mlp.errors import UserError, check, why_not_a_file
from mlp.loading import FINAL_MODELS, inside, load_model, read_checkpoint, read_report
from mlp.net import MLP


class Member(nn.Module):
    """One trained net, with the mean and standard deviation of the training split it learned from."""

    def __init__(self, net: MLP, mean: float, std: float) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, pixels: Tensor) -> Tensor:
        """Class probabilities of float pixel rows (N, 784) in [0, 1]."""
        return self.net((pixels - self.mean) / self.std).softmax(dim=1)


class Answer(nn.Module):
    """The softmax average of its members over raw images: uint8 (0-255) or float (0-1), (N, 28, 28) or (N, 784);
    its output's columns are the classes in `CLASS_NAMES` order. Built in eval mode (no dropout), weights frozen."""

    def __init__(self, members: Sequence[Member]) -> None:
        super().__init__()
        check(len(members) > 0, "an answer needs at least one checkpoint")
        self.members = nn.ModuleList(members)
        self.classes = list(CLASS_NAMES)
        self.eval().requires_grad_(False)

    def forward(self, images: Tensor) -> Tensor:
        pixels = images.flatten(1)
        if pixels.shape[1] != FashionMNISTDataModule.input_size:
            raise ValueError(f"expected images of {IMAGE_SIDE}x{IMAGE_SIDE} = {FashionMNISTDataModule.input_size} "
                             f"pixels, got shape {tuple(images.shape)}")
        # As the data module turns the IDX file's bytes into pixels (mlp.data.unit_pixels).
        pixels = pixels.float().div(255) if images.dtype == torch.uint8 else pixels.float()
        return torch.stack([member(pixels) for member in self.members]).mean(dim=0)


def report_checkpoints(source: Path, answer: str | None = None) -> list[Path]:
    """The checkpoints of the answer a study's report.json names (or of `answer`, one of its final models);
    `source` is the report or the study's folder holding it. They must lie inside that folder."""
    check(source.exists(), f"{source} not found; pass a study's folder (lightning_logs/tune/NAME), its report.json, "
          "or .ckpt files")
    check(source.is_dir() or source.suffix == ".json",
          f"{source} is not a study's folder, its report.json or a .ckpt file; pass the model first, then the images")
    report_path = source / "report.json" if source.is_dir() else source
    if source.is_dir() and not report_path.is_file():
        # A fit run's folder: its best checkpoint (by val/acc) first, then last.ckpt and the rest.
        saved = sorted(source.rglob("*.ckpt"), key=lambda path: (not path.name.startswith("epoch"), str(path)))
        check(not saved, f"{source} holds no report.json (a study's) but checkpoints: pass them, e.g. {saved[0]}")
    check(report_path.is_file(), f"{source} holds no report.json: tune.py writes it when its study ends"
          if source.is_dir() else f"{source} {why_not_a_file(source)}; pass a study's folder or its report.json")
    report = read_report(report_path)
    check(report.final is not None, f"{report_path} holds no final model: its study completed no trial "
          f"({report.trials}); run tune.py until one completes, or pass .ckpt files")
    name = answer or report.final.answer
    chosen = getattr(report.final, name) if name in FINAL_MODELS else None
    why = f" ({chosen.why_no_test})" if chosen is not None and chosen.why_no_test else ""
    check(chosen is not None and chosen.test_acc is not None, f"the study in {report_path.parent} has no tested "
          f"{name or 'answer'}{why}; run tune.py until it reports one, or pass .ckpt files")
    if (paths := chosen.checkpoints) is None:  # the best checkpoint's entry does not repeat the study's best_checkpoint
        paths = [report.best_checkpoint if chosen.checkpoint is None else chosen.checkpoint]
    check(all(paths), f"{report_path} names no checkpoint for its {name}; pass the report.json that tune.py wrote")
    written_in = Path(report.report_json).parent if report.report_json else None
    return [inside(resolve(Path(path), report_path, written_in), report_path.parent, f"{report_path} names {path}")
            for path in paths]


def resolve(checkpoint: Path, report_path: Path, written_in: Path | None = None) -> Path:
    """A checkpoint path as report.json holds it. One below the folder the report was written in (`written_in`, as
    tune.py named it) is taken at the same place below the report's folder now, so a study folder moved or copied
    still loads; else it is absolute, or relative to where tune.py ran: a folder above the report, or the current."""
    if written_in is not None and (below := path_below(checkpoint, written_in)) is not None:
        return report_path.parent / below
    if checkpoint.is_absolute():
        return checkpoint
    for folder in report_path.resolve().parents:
        if (folder / checkpoint).is_file():
            return folder / checkpoint
    return checkpoint  # relative to the current folder; load_member says if it is missing


def path_below(path: Path, folder: Path) -> Path | None:
    """The rest of `path` after the first place its parts hold `folder`'s in a row; None where they do not."""
    n = len(folder.parts)
    return next((Path(*path.parts[k + n:]) for k in range(len(path.parts) - n)
                 if path.parts[k:k + n] == folder.parts), None)


def load_member(checkpoint: Path, data_dir: str | None, statistics: dict) -> Member:
    """The net in a checkpoint of fit.py or tune.py with its training split's standardisation; `statistics`
    caches those per split, as an ensemble's members share one."""
    content = read_checkpoint(checkpoint)
    net = load_model(checkpoint).net
    if content.FashionMNISTDataModule is not None:  # the split's figures, as the data module's state_dict keeps them
        return Member(net, content.FashionMNISTDataModule.mean, content.FashionMNISTDataModule.std)
    # A checkpoint that predates them: recomputed from the training images, as the data module computed them.
    settings = content.datamodule_hyper_parameters
    key = (data_dir or settings.data_dir, settings.val_size, settings.seed)
    if key not in statistics:
        data = classes.DATA(key[0], val_size=settings.val_size, seed=settings.seed)
        try:
            data.setup("fit")
        except DatasetNotFoundError as error:
            why = str(error).splitlines()[0].rstrip(":")  # the places looked in follow, a line each
            raise UserError(f"the model's training images are not in {data.hparams.data_dir} any more, and it "
                            f"standardises images as they were: pass their folder with --data_dir ({why})") from None
        statistics[key] = data.mean, data.std
    return Member(net, *statistics[key])


def load_answer(source: str | Path | Sequence[str | Path], answer: str | None = None,
                data_dir: str | None = None) -> Answer:
    """The model a study answered with, from its folder or report.json (`answer` picks another of its final
    models: refit_ensemble, ensemble, refit or best), or the softmax average of the given checkpoints. `data_dir`:
    the training images, if moved, for checkpoints that lack their split's mean and standard deviation."""
    statistics: dict = {}
    return Answer([load_member(path, data_dir, statistics) for path in answer_checkpoints(source, answer)])


def answer_checkpoints(source: str | Path | Sequence[str | Path], answer: str | None = None) -> list[Path]:
    """The checkpoints `load_answer` averages: those of a study's answer (`answer`: another of its final models),
    from its folder or report.json, or the checkpoints given."""
    sources = [Path(source)] if isinstance(source, (str, Path)) else [Path(s) for s in source]
    check(len(sources) > 0, "pass a study's folder, its report.json, or .ckpt files")
    if len(sources) == 1 and sources[0].suffix != ".ckpt":
        return report_checkpoints(sources[0], answer)
    check(answer is None, "an answer is picked from a study's report, not from checkpoints")
    return sources


def check_exportable(path: str | Path) -> None:
    """Raise a UserError naming the extra to install if `path` asks for ONNX and its exporter is missing."""
    if Path(path).suffix != ".onnx":
        return
    try:
        import onnxscript  # noqa: F401  torch.onnx.export needs it (and onnx, which it requires) to write the file
    except ImportError:
        raise UserError(f"writing {path} as ONNX needs the onnx and onnxscript packages: "
                        'pip install -e ".[onnx]"') from None


def export(model: Answer, path: str | Path) -> None:
    """Write `model` as one file for any number of uint8 (N, 28, 28) images, as images are stored (an exported
    program fixes its input's dtype and rank): .onnx as an ONNX model (input "images", output "probabilities"),
    any other suffix as a torch.export program (docs/predict.md#the-exported-file shows how each loads)."""
    check_exportable(path)
    example = torch.zeros(2, IMAGE_SIDE, IMAGE_SIDE, dtype=torch.uint8)
    dynamic_shapes = ({0: torch.export.Dim("images")},)
    if Path(path).suffix == ".onnx":
        # external_data=False keeps the weights inside the one file; verbose=False silences its progress lines.
        torch.onnx.export(model.eval(), (example,), path, input_names=["images"], output_names=["probabilities"],
                          dynamic_shapes=dynamic_shapes, external_data=False, verbose=False)
    else:
        program = io.BytesIO()  # written by Python, so that a path it cannot write to is an OSError, not torch's
        torch.export.save(torch.export.export(model.eval(), (example,), dynamic_shapes=dynamic_shapes), program)
        Path(path).write_bytes(program.getvalue())
