"""A user's images: photos prepared as Fashion-MNIST's were made (mlp.images), and bad or hostile image files
refused before they are decoded, each in one line and bounded memory."""

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image

from mlp.answer import load_answer
from mlp.errors import UserError, run_script
from mlp.images import prepare, preparation_steps, read_images
from tests.conftest import real_data_available
from tests.lookalikes import fashion_mnist_test_set, product_photo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import fit  # noqa: E402
import predict  # noqa: E402

needs_real_data = pytest.mark.skipif(not real_data_available(),
                                     reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist")


@pytest.fixture(scope="module")
def real() -> tuple[numpy.ndarray, numpy.ndarray]:
    """300 Fashion-MNIST test images (uint8, 28x28) and their labels."""
    images, labels = fashion_mnist_test_set()
    return images[:300], labels[:300]


@pytest.fixture(scope="module")
def real_model(tmp_path_factory):
    """A small net fit on the real training images for one epoch (about 0.83 test accuracy), as predict loads it."""
    home = tmp_path_factory.mktemp("real_fit")
    fit.main([
        f"--data.data_dir={home / 'data'}", f"--trainer.logger.init_args.save_dir={home / 'logs'}",
        "--model.depth=1", "--model.width=64", "--trainer.max_epochs=1", "--progress_bar.refresh_rate=0",
        "--trainer.enable_model_summary=false",
    ])
    (best,) = (home / "logs" / "fit" / "version_0" / "checkpoints").glob("epoch*.ckpt")
    return load_answer([best])


def accuracy(model, images: list[Image.Image] | numpy.ndarray, labels: numpy.ndarray) -> float:
    pixels = torch.from_numpy(numpy.stack([numpy.asarray(image) for image in images]))  # stack copies
    return (model(pixels).argmax(dim=1).numpy() == labels).mean().item()


def on_background(image: numpy.ndarray, colour: tuple[int, int, int], side: int = 200) -> Image.Image:
    """The item darker than a uniform `colour` background, as a garment photographed on it."""
    big = numpy.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC)) / 255
    pixels = numpy.array(colour)[None, None, :] * (1 - big[:, :, None])
    return Image.fromarray(pixels.round().astype(numpy.uint8))


# What each way of making a product photo does to accuracy, measured on these 300 images with real_model (raw
# 0.83): within 0.02 of raw for all; the bound leaves room for another machine's arithmetic.
WAYS = {
    "negated": dict(side=(28, 28), rgb=False, margins=False, jpeg=False),
    "upscaled": dict(side=(100, 400), rgb=False, margins=False, jpeg=False),
    "RGB with white margins": dict(side=(100, 400), rgb=True, margins=True, jpeg=False),
    "all of them, JPEG": dict(side=(100, 400), rgb=True, margins=True, jpeg=True),
}


@needs_real_data
def test_product_photo_lookalikes_of_test_images_keep_most_of_the_raw_accuracy(real, real_model):
    images, labels = real
    raw = accuracy(real_model, images, labels)
    assert raw > 0.75
    rng = numpy.random.default_rng(0)
    for way, options in WAYS.items():
        prepared = [prepare(product_photo(image, rng, **options)) for image in images]
        assert all(image.size == (28, 28) and image.mode == "L" for image in prepared)
        assert accuracy(real_model, prepared, labels) >= raw - 0.05, way
    # Without preparation, the same photos made 28x28 grayscale are mostly wrong: the step is what does it.
    naive = [product_photo(image, rng, **WAYS["all of them, JPEG"]).convert("L").resize((28, 28)) for image in images]
    assert accuracy(real_model, naive, labels) < 0.5


@needs_real_data
def test_a_uniform_background_of_any_colour_becomes_black(real, real_model):
    images, labels = real
    raw = accuracy(real_model, images, labels)
    for colour in ((173, 216, 230), (128, 128, 128), (240, 220, 200)):  # light blue, mid grey, beige
        prepared = [prepare(on_background(image, colour)) for image in images]
        corners = numpy.stack([numpy.asarray(image) for image in prepared])[:, [0, 0, -1, -1], [0, -1, 0, -1]]
        assert (corners == 0).all(axis=1).mean() > 0.95, colour  # a few items reach a corner once resized
        assert accuracy(real_model, prepared, labels) >= raw - 0.05, colour


@needs_real_data
def test_a_transparent_png_is_read_as_the_item_on_white(real, tmp_path):
    """A cut-out product photo: the item opaque, the rest transparent, its hidden colour black (as many tools
    save it). The alpha channel decides, not the hidden colour."""
    image = real[0][0]
    photo = product_photo(image, numpy.random.default_rng(1), side=(200, 200), margins=False, jpeg=False)
    rgba = photo.convert("RGBA")
    alpha = numpy.where(image > 0, 255, 0).astype(numpy.uint8)
    rgba.putalpha(Image.fromarray(alpha).resize(rgba.size, Image.Resampling.NEAREST))
    hidden = numpy.asarray(rgba).copy()
    hidden[hidden[:, :, 3] == 0, :3] = 0
    Image.fromarray(hidden).save(tmp_path / "cutout.png")

    read = read_images(tmp_path / "cutout.png", prepare_images=True)[0].numpy()
    expected = numpy.asarray(prepare(Image.alpha_composite(Image.new("RGBA", rgba.size, "white"),
                                                           Image.fromarray(hidden)).convert("RGB")))
    assert numpy.array_equal(read, expected)
    assert read[[0, 0, -1, -1], [0, -1, 0, -1]].max() == 0 and read.max() > 100


@needs_real_data
def test_an_image_already_like_fashion_mnist_is_left_as_it_is(real, tmp_path):
    image = real[0][0]
    Image.fromarray(image).save(tmp_path / "raw.png")
    assert numpy.array_equal(read_images(tmp_path / "raw.png", prepare_images=True)[0].numpy(), image)
    assert numpy.array_equal(numpy.asarray(prepare(Image.fromarray(image).convert("RGB"))), image)


def test_each_step_is_the_papers_and_a_light_item_on_black_is_not_negated():
    photo = Image.new("RGB", (300, 120), "white")
    photo.paste((40, 40, 40), (50, 30, 250, 90))  # a dark 200x60 item on white
    steps = dict(preparation_steps(photo))
    assert list(steps) == ["input", "trim", "resize", "sharpen", "pad", "negate", "8-bit grayscale"]
    assert steps["trim"].size == (200, 60) and steps["resize"].size == (28, 8)
    result = numpy.asarray(steps["8-bit grayscale"])
    assert result.shape == (28, 28) and result[:10].max() == 0 and result[-10:].max() == 0  # padded, centred
    assert result[12:16, 2:26].min() > 200  # the dark item, negated
    light_on_black = Image.fromarray(255 - numpy.asarray(photo))
    assert numpy.array_equal(numpy.asarray(prepare(light_on_black)), result)


def test_an_image_of_one_colour_is_one_error_line(tmp_path):
    # black.png: as Fashion-MNIST's are, light on dark at 28x28, it had been classified as it was (a Sandal, 0.81).
    for name, colour, size in (("white.png", "white", (200, 150)), ("grey.jpg", (90, 90, 90), (200, 150)),
                               ("black.png", "black", (28, 28))):
        Image.new("RGB", size, colour).save(tmp_path / name)
        with pytest.raises(SystemExit) as exit:
            run_script(lambda: predict.main(["nowhere.ckpt", str(tmp_path / name)]), interrupted="")
        assert exit.value.code == f"error: {tmp_path / name}: the image is all one colour (nothing differs from " \
            "its corners by more than 5 %): there is no item to classify"


def test_a_16_bit_png_reads_as_its_8_bit_original(tmp_path):
    image = numpy.random.default_rng(0).integers(0, 256, (28, 28), dtype=numpy.uint16)
    image[[0, 0, -1, -1], [0, -1, 0, -1]] = 0  # a dark background, as Fashion-MNIST's
    Image.fromarray(image * 257).save(tmp_path / "deep.png")  # 0-255 spread over 0-65535
    with Image.open(tmp_path / "deep.png") as opened:
        assert opened.mode.startswith("I")  # PIL opens it as 16-bit, not 8-bit
    for prepare_images in (False, True):
        assert numpy.array_equal(read_images(tmp_path / "deep.png", prepare_images)[0].numpy(), image)


def test_a_camera_jpeg_over_the_pixel_bound_is_decoded_smaller_and_an_mpo_read_from_its_photo(tmp_path):
    photo = Image.new("L", (7000, 6000), 255)  # 42 million pixels, over the bound: decoded at a quarter
    photo.paste(40, (1000, 1000, 6000, 5000))
    photo.save(tmp_path / "camera.jpg")
    prepared = read_images(tmp_path / "camera.jpg", prepare_images=True)[0].numpy()
    assert prepared[4:24].min() > 200 and prepared[:3].max() == 0 and prepared[25:].max() == 0  # 28x22, centred

    small = Image.new("RGB", (280, 240), "white")
    small.paste((40, 40, 40), (40, 40, 240, 200))
    small.save(tmp_path / "camera.mpo", "MPO", save_all=True, append_images=[Image.new("RGB", (280, 240))])
    with Image.open(tmp_path / "camera.mpo") as opened:
        assert (opened.format, opened.n_frames) == ("MPO", 2)
        opened.convert("RGB").save(tmp_path / "first.png")  # its first frame, as decoded
    assert torch.equal(read_images(tmp_path / "camera.mpo", True), read_images(tmp_path / "first.png", True))


def png(width: int, height: int, colour_type: int = 0, bands: list[bytes] | None = None, extra: bytes = b"") -> bytes:
    """A PNG file written chunk by chunk, so that a huge image is a small file: its rows are zeros, or `bands`
    (rows' bytes, filter byte first) each repeated over an equal part of the height; `extra` chunks come before
    the image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bands = bands or [bytes(1 + width * {0: 1, 2: 3, 6: 4}[colour_type])]
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(bands[i * len(bands) // height]) for i in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def text_chunk(size: int) -> bytes:
    """A zTXt chunk whose text decompresses to `size` bytes."""
    compressor = zlib.compressobj(9)
    text = b"".join(compressor.compress(bytes(2**20)) for _ in range(size // 2**20)) + compressor.flush()
    data = b"Comment\0\0" + text
    return struct.pack(">I", len(data)) + b"zTXt" + data + struct.pack(">I", zlib.crc32(b"zTXt" + data))


HOSTILE = {  # name: (file's bytes, what its error line says)
    "20000x20000.png": (lambda: png(20000, 20000), "refused before decoding: Image size (400000000 pixels) exceeds"),
    "12000x12000.png": (lambda: png(12000, 12000), "refused before decoding: 12000x12000 pixels is more than"),
    "9000x9000-rgba.png": (lambda: png(9000, 9000, colour_type=6), "refused before decoding: 9000x9000 pixels"),
    "50MB-text.png": (lambda: png(28, 28, extra=text_chunk(50 * 2**20)), "Decompressed data too large"),
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile")
    for name, (content, _) in HOSTILE.items():
        (folder / name).write_bytes(content())
    # Within bounds: a 4000x4000 RGB photo of a dark square on white, 64 MB decoded, read to show the meter works.
    white, dark = b"\0" + b"\xff" * 3 * 4000, b"\0" + b"\xff" * 3000 + b"\x20" * 6000 + b"\xff" * 3000
    (folder / "big.png").write_bytes(png(4000, 4000, colour_type=2, bands=[white, dark, white]))
    Image.new("L", (28, 28)).save(folder / "frame.gif", save_all=True,
                                  append_images=[Image.new("L", (28, 28), 255)], duration=100, loop=0)
    (folder / "figure.eps").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nshowpage\n")
    return folder


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_image_is_refused_in_one_line(hostile, name):
    with pytest.raises(SystemExit) as exit:
        run_script(lambda: predict.main(["nowhere.ckpt", str(hostile / name)]), interrupted="")
    assert len(exit.value.code.splitlines()) == 1 and exit.value.code.startswith(f"error: {hostile / name}: ")
    assert HOSTILE[name][1] in exit.value.code


def test_a_multi_frame_image_and_a_postscript_file_are_refused_with_the_reason(hostile):
    with pytest.raises(UserError, match="an image of 2 frames"):
        read_images(hostile / "frame.gif")
    # PIL would hand PostScript to Ghostscript; it is not among the formats read, so never opened as an image.
    with pytest.raises(UserError, match="neither an image"):
        read_images(hostile / "figure.eps")


MEASURE = """
import json, sys
sys.path[:0] = [{root!r}, {scripts!r}]
import torch, predict, mlp.answer, mlp.images
from mlp.errors import run_script

def peak():
    # This process's peak resident memory in bytes. Not getrusage's ru_maxrss, which a child started by a large
    # process (pytest after a fit) inherits from it.
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmHWM"].split()[0]) * 1024

base, results = peak(), []
for path in {paths!r}:
    try:
        run_script(lambda: predict.main(["nowhere.ckpt", path]), interrupted="")
    except SystemExit as exit:
        results.append((exit.code, peak() - base))
print(json.dumps(results))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak memory from Linux's /proc")
def test_hostile_images_cost_under_300_mb_beyond_the_import(hostile):
    """Each hostile file in turn, then an allowed 4000x4000 photo, in one fresh process: the peak resident memory
    beyond the import stays under 300 MB through the hostile ones (today's 12000x12000 took 1.3 GB), while
    decoding the allowed photo shows in the figure."""
    paths = [str(hostile / name) for name in HOSTILE] + [str(hostile / "big.png")]
    code = MEASURE.format(root=str(ROOT), scripts=str(ROOT / "scripts"), paths=paths)
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=hostile,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert finished.returncode == 0 and finished.stderr == "", finished.stderr  # no warning, no traceback
    results = json.loads(finished.stdout.splitlines()[-1])
    for name, (error, extra) in zip(HOSTILE, results):
        assert error.startswith(f"error: {hostile / name}: ") and extra < 300 * 2**20, (name, error, extra)
    # The allowed photo decodes (4000x4000 RGB, 64 MB) and gets as far as loading the (missing) model.
    assert "nowhere.ckpt not found" in results[-1][0] and results[-1][1] > 40 * 2**20
