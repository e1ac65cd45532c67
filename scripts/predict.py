"""Classify your own images with a study's answer or with checkpoints, or export the model as one file.

    python scripts/predict.py lightning_logs/tune/mlp shoe.png shirt.jpg     # the answer report.json names
    python scripts/predict.py lightning_logs/fit/version_0/checkpoints/epoch*.ckpt shoe.png
    python scripts/predict.py lightning_logs/tune/mlp t10k-images-idx3-ubyte.gz --output predictions.csv
    python scripts/predict.py lightning_logs/tune/mlp --export answer.pt2    # runs with torch alone, see below
    python scripts/predict.py lightning_logs/tune/mlp --export answer.onnx   # ONNX, by the suffix: needs .[onnx]

MODEL is a study's folder, its report.json, or one or more .ckpt files (averaged). Images are 28x28 grayscale,
light on dark as in Fashion-MNIST: PNG, JPEG or any file PIL reads, or IDX files holding many. Prints one
line per image: the file, its predicted class and that class's probability.

The exported file takes uint8 images (N, 28, 28) and gives their class probabilities, without this project:
    import torch
    model = torch.export.load("answer.pt2").module()
    probabilities = model(images)   # columns: T-shirt/top, Trouser, Pullover, ... Ankle boot
or, written as answer.onnx, with onnxruntime (images a uint8 numpy array):
    import onnxruntime
    probabilities = onnxruntime.InferenceSession("answer.onnx").run(None, {"images": images})[0]
"""

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlp.errors import check, run_script  # noqa: E402


def split_model_and_images(paths: list[str]) -> tuple[list[str], list[str]]:
    """MODEL is the leading .ckpt files, or else the first path (a study's folder or report.json)."""
    checkpoints = 0
    while checkpoints < len(paths) and paths[checkpoints].endswith(".ckpt"):
        checkpoints += 1
    model = max(checkpoints, 1)
    return paths[:model], paths[model:]


def main(argv: list[str] | None = None) -> list[tuple[str, str, float]]:
    import torch

    from mlp.answer import check_exportable, export, load_answer
    from mlp.images import read_images

    parser = argparse.ArgumentParser(
        usage="%(prog)s MODEL [IMAGE ...] [--output CSV] [--export PATH] [--data_dir DATA_DIR]",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="MODEL [IMAGE ...]", help="the model, then the image files")
    parser.add_argument("--output", metavar="CSV", help="write file,class,probability rows here instead of printing")
    parser.add_argument("--export", metavar="PATH", help="write the model here as one file: ONNX if PATH ends in "
                        ".onnx (needs pip install -e \".[onnx]\"), else torch.export (.pt2)")
    parser.add_argument("--data_dir", help="Fashion-MNIST folder, if not where the model trained: each member "
                        "standardises images with its training images' mean and standard deviation")
    options = parser.parse_args(argv)
    model_paths, image_paths = split_model_and_images(options.paths)
    check(image_paths or options.export, "nothing to do: pass image files after the model, or --export PATH")

    # Every image is read, and the export checked, before the model loads, so bad input is reported at once.
    if options.export:
        check_exportable(options.export)
    read = [(path, read_images(Path(path))) for path in image_paths]
    model = load_answer(model_paths, data_dir=options.data_dir)
    if options.export:
        export(model, options.export)
        path = options.export
        loader = f"onnxruntime.InferenceSession({path!r})" if Path(path).suffix == ".onnx" else \
            f"torch.export.load({path!r}).module()"
        print(f"exported to {path}: {loader} takes uint8 (N, 28, 28)")
    rows = []
    for path, images in read:
        with torch.no_grad():
            probability, predicted = model(images).max(dim=1)
        names = [path] if len(images) == 1 else [f"{path}[{i}]" for i in range(len(images))]
        rows += [(name, model.classes[c], p) for name, c, p in zip(names, predicted.tolist(), probability.tolist())]
    if options.output:
        with open(options.output, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["file", "class", "probability"])
            writer.writerows(rows)
        print(f"{len(rows)} predictions written to {options.output}")
    else:
        for name, class_name, probability in rows:
            print(f"{name}: {class_name} ({probability:.4f})")
    return rows


if __name__ == "__main__":
    run_script(main, interrupted="nothing was written")
