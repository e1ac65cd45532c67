"""Classify your own images with a study's answer or with checkpoints, or export the model as one file.

    python scripts/predict.py lightning_logs/tune/mlp shoe.jpg shirt.png     # the answer report.json names
    python scripts/predict.py lightning_logs/fit/version_0/checkpoints/epoch*.ckpt my_photos/ --top 3
    python scripts/predict.py lightning_logs/tune/mlp shoe.jpg --save-prepared seen/   # what the model saw
    python scripts/predict.py lightning_logs/tune/mlp t10k-images-idx3-ubyte.gz --output predictions.csv
    python scripts/predict.py lightning_logs/tune/mlp --export answer.pt2    # runs with torch alone, see below
    python scripts/predict.py lightning_logs/tune/mlp --export answer.onnx   # ONNX, by the suffix: needs .[onnx]

MODEL is a study's folder, its report.json, or one or more .ckpt files (averaged). Images are photos of one item
(PNG, JPEG, WebP...: any size and colour, the item on a plain background), folders of them, or IDX files
holding many in Fashion-MNIST's form. Each photo is prepared as Fashion-MNIST's images were made (trimmed,
resized to 28x28, sharpened, padded, negated, grayscale); --no-prepare takes 28x28 images as they are. Prints
one line per image: the file, its predicted class and that class's probability (--top K: the K likeliest).

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
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlp.errors import UserError, check, run_script  # noqa: E402


def split_model_and_images(paths: list[str]) -> tuple[list[str], list[str]]:
    """MODEL is the leading .ckpt files, or else the first path (a study's folder or report.json)."""
    checkpoints = next((i for i, path in enumerate(paths) if not path.endswith(".ckpt")), len(paths))
    model = max(checkpoints, 1)
    return paths[:model], paths[model:]


def check_not_an_input(output: Path, inputs: list[Path], flag: str) -> None:
    """Refuse to write over an input: `predict.py CKPT image.png --output image.png` would replace the image."""
    for path in inputs:
        same = output.resolve() == path.resolve() or (output.exists() and path.exists() and output.samefile(path))
        check(not same, f"{flag} {output} is one of the input files; choose another path")


def prepared_names(paths: list[Path], counts: list[int]) -> list[str]:
    """A PNG name for each image classified, unique even where two inputs share a name (a/shoe.jpg, b/shoe.jpg)."""
    names, used = [], set()
    for path, count in zip(paths, counts):
        stem = path.name.removesuffix(".gz")
        for i in range(count):
            name = f"{stem}-28x28.png" if count == 1 else f"{stem}-{i}-28x28.png"
            n = 2
            while name in used:
                name, n = f"{stem}-{n}-28x28.png", n + 1
            used.add(name)
            names.append(name)
    return names


def main(argv: list[str] | None = None) -> list[tuple]:
    import torch
    from PIL import Image

    from mlp.answer import answer_checkpoints, check_exportable, export, load_answer
    from mlp.images import image_files, read_images

    parser = argparse.ArgumentParser(usage="%(prog)s MODEL [IMAGE|FOLDER ...] [--top K] [--no-prepare] "
                                     "[--save-prepared DIR] [--output CSV] [--export PATH] [--data_dir DATA_DIR]",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="MODEL [IMAGE|FOLDER ...]",
                        help="the model, then image files or folders of them")
    parser.add_argument("--top", type=int, default=1, metavar="K", help="print the K likeliest classes (default 1)")
    parser.add_argument("--no-prepare", dest="prepare", action="store_false",
                        help="take images as they are: 28x28, light on dark, as Fashion-MNIST's")
    parser.add_argument("--save-prepared", metavar="DIR", help="write the 28x28 images classified here, as PNG")
    parser.add_argument("--output", metavar="CSV", help="write file,class,probability rows here instead of printing")
    parser.add_argument("--export", metavar="PATH", help="write the model here as one file: ONNX if PATH ends in "
                        ".onnx (needs pip install -e \".[onnx]\"), else torch.export (.pt2)")
    parser.add_argument("--data_dir", help="Fashion-MNIST folder, for checkpoints without their training split's "
                        "mean and standard deviation (the stacked trials' of tune.py), if not where they trained")
    options = parser.parse_args(argv)
    model_paths, image_paths = split_model_and_images(options.paths)
    misplaced = [path for path in image_paths if path.endswith(".ckpt")]
    check(not misplaced, f"{misplaced[0] if misplaced else ''} is a checkpoint among the images: the model comes "
          "first (its .ckpt files, or a study's folder or report.json), then the images")
    check(image_paths or options.export, "nothing to do: pass image files after the model, or --export PATH")
    check(1 <= options.top <= 10, f"--top must be 1-10 (there are 10 classes), got {options.top}")

    # Every image is read, and every output checked, before the model loads, so bad input is reported at once.
    images_in = image_files(image_paths)
    # A study's report.json and the checkpoints it names are inputs too, though only its folder is named.
    reports = [Path(path) / "report.json" for path in model_paths if Path(path).is_dir()]
    checkpoints = answer_checkpoints(model_paths)  # the study's report is read once
    inputs = images_in + [Path(path) for path in model_paths] + reports + checkpoints
    written = {flag: Path(path) for flag, path in (("--output", options.output), ("--export", options.export),
                                                  ("--save-prepared", options.save_prepared)) if path}
    for flag, path in written.items():
        check_not_an_input(path, inputs, flag)
    for (flag, path), (other, other_path) in itertools.combinations(written.items(), 2):
        check(path.resolve() != other_path.resolve(), f"{flag} and {other} both name {path}: the second would "
              "overwrite the first, or fail on it; give each its own path")
    if options.export:
        check_exportable(options.export)
    # A folder's image that is refused is skipped, saying why: one screenshot among a folder of photos would
    # otherwise leave all of them unclassified. An image named on its own is still refused.
    named = {Path(path) for path in image_paths if not Path(path).is_dir()}
    read = []
    for path in images_in:
        try:
            read.append((path, read_images(path, options.prepare)))
        except UserError as error:
            if path in named:
                raise
            print(f"skipped {error}", file=sys.stderr)
    check(read or not images_in, "no image could be classified: each was skipped, saying why, above")
    if options.save_prepared:
        folder = Path(options.save_prepared)
        check(not folder.exists() or folder.is_dir(), f"--save-prepared {folder} is a file; pass a folder")
        targets = [folder / name for name in prepared_names([path for path, _ in read],
                                                            [len(images) for _, images in read])]
        for target in targets:
            check_not_an_input(target, inputs, "--save-prepared")
    model = load_answer(checkpoints, data_dir=options.data_dir)
    if options.save_prepared:
        folder.mkdir(parents=True, exist_ok=True)
        for target, image in zip(targets, torch.cat([images for _, images in read]) if read else []):
            Image.fromarray(image.numpy()).save(target)
    if options.prepare and read:  # after the model loaded, so that a bad model is the one line printed
        print("images prepared as Fashion-MNIST's were made (trimmed, resized to 28x28, sharpened, padded, negated, "
              "grayscale; IDX files and 28x28 images on a dark background as they are); --no-prepare to skip",
              file=sys.stderr)
    if exported := options.export:
        export(model, exported)
        onnx = Path(exported).suffix == ".onnx"
        loader = f"onnxruntime.InferenceSession({exported!r})" if onnx else f"torch.export.load({exported!r}).module()"
        print(f"exported to {exported}: {loader} takes uint8 (N, 28, 28)")
    rows = []
    for path, images in read:
        with torch.no_grad():
            probabilities, predicted = model(images).topk(options.top, dim=1)
        names = [str(path)] if len(images) == 1 else [f"{path}[{i}]" for i in range(len(images))]
        for name, classes, ps in zip(names, predicted.tolist(), probabilities.tolist()):
            rows.append((name, *(x for c, p in zip(classes, ps) for x in (model.classes[c], p))))
    if options.output:
        with open(options.output, "w", newline="") as file:
            writer = csv.writer(file)
            ranks = [f"_{k}" if k > 1 else "" for k in range(1, options.top + 1)]
            writer.writerow(["file", *(x for rank in ranks for x in (f"class{rank}", f"probability{rank}"))])
            writer.writerows(rows)
        print(f"{len(rows)} predictions written to {options.output}")
    else:
        for name, *top in rows:
            print(f"{name}: " + ", ".join(f"{c} ({p:.4f})" for c, p in zip(top[::2], top[1::2])))
    return rows


if __name__ == "__main__":
    run_script(main, interrupted="nothing was written", writes_with="--output, --export or --save-prepared")
