"""Product-photo look-alikes of Fashion-MNIST test images: the item dark on white, as in the shop's photo it came
from, at another size, in RGB, with white margins, JPEG-compressed. Used by tests/test_images.py, and to measure
issue 40's done-when with predict.py on 1,000 of them (docs/results.md):

    python tests/lookalikes.py make /tmp/look --n 1000     # /tmp/look/raw/*.png, /tmp/look/photos/*.jpg
    python scripts/predict.py CKPT /tmp/look/raw --no-prepare --output /tmp/look/raw.csv
    python scripts/predict.py CKPT /tmp/look/photos --output /tmp/look/photos.csv
    python tests/lookalikes.py score /tmp/look raw.csv photos.csv

and to draw docs/predict_steps.png, each preparation step of one of them:

    python tests/lookalikes.py steps docs/predict_steps.png
"""

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlp.data import CLASS_NAMES, DEBIAN_DIR, load_split, locate_fashion_mnist  # noqa: E402


def product_photo(image: numpy.ndarray, rng: numpy.random.Generator, *, side: tuple[int, int] = (100, 400),
                  rgb: bool = True, margins: bool = True, jpeg: bool = True) -> Image.Image:
    """A uint8 28x28 Fashion-MNIST image made back into a photo-like one: negated (dark on white), upscaled to a
    side drawn from `side`, RGB, white margins of 0-50 % of the side on each edge, JPEG at quality 70-95."""
    size = int(rng.integers(side[0], side[1] + 1))
    photo = Image.fromarray(255 - image).resize((size, size), Image.Resampling.BICUBIC)
    if rgb:
        photo = photo.convert("RGB")
    if margins:
        left, top, right, bottom = (int(m) for m in rng.integers(0, size // 2 + 1, size=4))
        canvas = Image.new(photo.mode, (left + size + right, top + size + bottom), "white")
        canvas.paste(photo, (left, top))
        photo = canvas
    if jpeg:
        buffer = io.BytesIO()
        photo.save(buffer, "JPEG", quality=int(rng.integers(70, 96)))
        photo = Image.open(buffer)
    return photo


def fashion_mnist_test_set(data_dir: Path = DEBIAN_DIR) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Fashion-MNIST's test images and labels, decompressed into a temporary folder."""
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        images, labels = load_split(locate_fashion_mnist(data_dir), "test", Path(cache))
    return images.numpy(), labels.numpy()


def make(out: Path, n: int, seed: int) -> None:
    images, labels = fashion_mnist_test_set()
    rng = numpy.random.default_rng(seed)
    chosen = rng.choice(len(images), n, replace=False)
    for folder in ("raw", "photos"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    with open(out / "labels.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["name", "label"])
        for index in chosen:
            name = f"test{index:05d}"
            Image.fromarray(images[index]).save(out / "raw" / f"{name}.png")
            product_photo(images[index], rng, jpeg=False).save(out / "photos" / f"{name}.jpg",
                                                               quality=int(rng.integers(70, 96)))
            writer.writerow([name, CLASS_NAMES[labels[index]]])


def score(out: Path, predictions: list[str]) -> None:
    with open(out / "labels.csv", newline="") as file:
        labels = {row["name"]: row["label"] for row in csv.DictReader(file)}
    for name in predictions:
        with open(out / name, newline="") as file:
            rows = list(csv.DictReader(file))
        right = sum(labels[Path(row["file"]).stem] == row["class"] for row in rows)
        print(f"{name}: {right}/{len(rows)} = {right / len(rows):.4f}")


def steps(out: Path) -> None:
    """One test image as a photo on a beige background, then each step `mlp.images` takes, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlp.images import preparation_steps

    images, _ = fashion_mnist_test_set()
    rng = numpy.random.default_rng(3)
    photo = numpy.asarray(product_photo(images[0], rng, side=(240, 240), jpeg=False)).astype(float) / 255
    beige = numpy.array([235, 222, 200]) / 255
    photo = Image.fromarray((photo * beige * 255).round().astype(numpy.uint8))
    shown = preparation_steps(photo)
    figure, axes = plt.subplots(1, len(shown), figsize=(1.3 * len(shown), 1.75), dpi=80)
    for axis, (name, image) in zip(axes, shown):
        axis.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        axis.set_title(f"{name}\n{image.width}x{image.height}", fontsize=8)
        axis.set_xticks([]), axis.set_yticks([])
    figure.tight_layout()
    figure.savefig(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    making = commands.add_parser("make")
    making.add_argument("out", type=Path)
    making.add_argument("--n", type=int, default=1000)
    making.add_argument("--seed", type=int, default=0)
    scoring = commands.add_parser("score")
    scoring.add_argument("out", type=Path)
    scoring.add_argument("predictions", nargs="+", help="CSV files predict.py wrote, relative to OUT")
    drawing = commands.add_parser("steps")
    drawing.add_argument("out", type=Path)
    options = parser.parse_args()
    if options.command == "make":
        make(options.out, options.n, options.seed)
    elif options.command == "score":
        score(options.out, options.predictions)
    else:
        steps(options.out)
