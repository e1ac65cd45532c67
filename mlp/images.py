"""A user's images as Fashion-MNIST stores its own: uint8 tensors (N, 28, 28), read by PIL or torchvision.

A photo is made a Fashion-MNIST image by its paper's steps with PIL's own operations (docs/predict.md#your-own-photo:
the steps, and what the paper leaves open). Every file is checked before it is decoded: one of a few raster formats
(no PostScript, which PIL hands to Ghostscript), its header's size bounding the decoded bytes."""

import functools
import tempfile
import warnings
from pathlib import Path

import numpy
from PIL import Image, ImageChops, ImageFilter, ImageOps, ImageStat, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor

from mlp.data import IMAGE_SIDE, CorruptDatasetError, read_idx
from mlp.errors import UserError, check, why_not_a_file

# Raster formats PIL decodes itself (JPEG includes MPO, the JPEG many cameras write, its first frame the photo).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "AVIF")
# 160 MB decoded as RGBA; a larger JPEG is decoded at a fraction of its size (draft mode), so only others meet it.
MAX_PIXELS = 40_000_000
WORKING_SIDE = 1024  # larger photos are first shrunk to this: the result is 28 pixels, so no detail is lost
TRIM_TOLERANCE = 0.05 * 255  # the paper's "close to the corners' colour": within 5 % of the maximum intensity
EIGHT_BIT_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # PIL opens 16-bit grayscale PNG and TIFF so


def image_files(paths: list[str]) -> list[Path]:
    """The paths of the images a command is given, a folder standing for the image files directly in it (picked
    by their suffixes: a folder of photos may hold other files too)."""
    files = []
    suffixes = {suffix for suffix, name in Image.registered_extensions().items() if name in FORMATS}
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes and p.is_file()
                           and not p.name.startswith("."))
            check(found, f"{path} holds no image files (PNG, JPEG, WebP...)")
            files += found
        else:
            files.append(path)
    return files


def open_image(path: Path) -> Image.Image:
    """The image in `path`, decoded only after its header passed the checks; 16-bit grayscale made 8-bit. Raises
    UnidentifiedImageError for a file that is none of FORMATS, UserError for one refused."""
    with warnings.catch_warnings():
        # PIL warns above its own MAX_IMAGE_PIXELS; the bound below, lower, refuses such images in one line.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path, formats=FORMATS)  # reads the header only
        except Image.DecompressionBombError as error:
            raise UserError(f"{path}: refused before decoding: {error}") from None
    try:
        if image.format in ("JPEG", "MPO"):
            image.draft(image.mode, (WORKING_SIDE, WORKING_SIDE))  # decodes at 1/2 to 1/8 of the size
        width, height = image.size
        check(width * height <= MAX_PIXELS, f"{path}: refused before decoding: {width}x{height} pixels is more than "
              f"the {MAX_PIXELS:,} this reads; save it smaller")
        check(image.mode in EIGHT_BIT_MODES | SIXTEEN_BIT_MODES,
              f"{path}: images with {image.mode!r} pixels are not read; save it as an 8- or 16-bit PNG or a JPEG")
        # A MPO's other frames are previews or a second view of the same photo; other formats' are other images.
        frames = getattr(image, "n_frames", 1)
        check(image.format == "MPO" or frames == 1, f"{path}: an image of {frames} frames (animated or multi-page): "
              "which one shows the item is not clear; save that frame alone")
        image.load()
    except BaseException:
        image.close()
        raise
    if image.mode in SIXTEEN_BIT_MODES:
        # PIL's convert("L") clips 16-bit values at 255 (nearly every pixel white); the top 8 bits are the image.
        pixels = numpy.asarray(image)
        check(int(pixels.max(initial=0)) < 2**16 and int(pixels.min(initial=0)) >= 0,
              f"{path}: its {image.mode} pixels are outside 16 bits; save it as an 8- or 16-bit PNG")
        image = Image.fromarray((pixels.astype(numpy.uint32) >> 8).astype(numpy.uint8))
    return image


def corner_colour(image: Image.Image) -> tuple[int, ...]:
    """The background's colour: per band, the median of the four corners' mean colours (each a 2% patch), so one
    corner the item reaches into, or JPEG noise, does not decide it."""
    width, height = image.size
    side = max(1, min(width, height) // 50)
    boxes = [(0, 0), (width - side, 0), (0, height - side), (width - side, height - side)]
    means = numpy.array([ImageStat.Stat(image.crop((x, y, x + side, y + side))).mean for x, y in boxes])
    return tuple(int(round(v)) for v in numpy.median(means, axis=0))


def preparation_steps(image: Image.Image) -> list[tuple[str, Image.Image]]:
    """The paper's steps applied to `image`, each as (what was done, the image after it); the last is the 28x28
    8-bit grayscale image, light on dark. Raises UserError for an image of one colour, with nothing to trim to."""
    steps = [("input", image)]
    if image.mode in ("1", "P", "PA"):
        image = image.convert("RGBA")  # PIL resizes palette images by nearest neighbour only
    if max(image.size) > WORKING_SIDE:
        scale = WORKING_SIDE / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
    image = ImageOps.exif_transpose(image)  # a phone's portrait photo is stored sideways, with an EXIF tag
    # RGB, transparency composited onto white: a cut-out product photo's background is its transparent part.
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    else:
        rgb = image.convert("RGB")
    background = corner_colour(rgb)
    plain = Image.new("RGB", rgb.size, background)
    # The largest difference over the bands, so an item differing from the background in colour alone counts.
    difference = functools.reduce(ImageChops.lighter, ImageChops.difference(rgb, plain).split())
    box = difference.point(lambda v: 255 if v > TRIM_TOLERANCE else 0).getbbox()
    check(box is not None, "the image is all one colour (nothing differs from its corners by more than 5 %): "
          "there is no item to classify")
    if rgb.size == (IMAGE_SIDE, IMAGE_SIDE) and max(background) < 128:
        return steps + [("already Fashion-MNIST-like: kept", rgb.convert("L"))]
    trimmed = rgb.crop(box)
    resized = ImageOps.contain(trimmed, (IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.LANCZOS)
    # The paper's Gaussian of radius and sigma 1.0; PIL's radius is the Gaussian's sigma.
    sharpened = resized.filter(ImageFilter.UnsharpMask(radius=1.0, percent=100, threshold=0))
    padded = ImageOps.pad(sharpened, (IMAGE_SIDE, IMAGE_SIDE), color=background, centering=(0.5, 0.5))
    negated = ImageChops.difference(padded, Image.new("RGB", padded.size, background))
    # On a background other than white or black an item can differ from it by less than 255 (black on mid grey by
    # 128): the difference is scaled to the largest possible, keeping Fashion-MNIST's contrast (on white, by 1).
    furthest = Image.new("RGB", (1, 1), tuple(max(c, 255 - c) for c in background)).convert("L").getpixel((0, 0))
    grayscale = negated.convert("L").point(lambda v: min(255, round(v * 255 / furthest)))
    return steps + [("trim", trimmed), ("resize", resized), ("sharpen", sharpened), ("pad", padded),
                    ("negate", negated), ("8-bit grayscale", grayscale)]


def prepare(image: Image.Image) -> Image.Image:
    """`image` made a Fashion-MNIST image: 28x28, 8-bit grayscale, light on dark (see `preparation_steps`)."""
    return preparation_steps(image)[-1][1]


def read_images(path: Path, prepare_images: bool = False) -> Tensor:
    """The images in an image file PIL reads (one image) or in an IDX file (any number, possibly .gz, taken as they
    are), as uint8 (N, 28, 28). With `prepare_images` an image file is prepared as Fashion-MNIST's were made;
    without, it must be 28x28 already and is only made grayscale."""
    check(path.is_file(), f"{path} {why_not_a_file(path)}; pass image files (PNG, JPEG), folders of them, or IDX files")
    idx = False
    try:
        with open_image(path) as image:
            if prepare_images:
                try:
                    image = prepare(image)
                except UserError as error:
                    raise UserError(f"{path}: {error}") from None
            images = pil_to_tensor(image.convert("L"))  # (1, height, width)
    except UnidentifiedImageError:  # an IDX file, decoded by torchvision as the data module decodes the dataset
        idx = True
        with tempfile.TemporaryDirectory() as cache:  # where a .gz is decompressed
            try:
                images = read_idx(path, Path(cache))
            except CorruptDatasetError:
                raise UserError(f"{path} is neither an image (PNG, JPEG...) nor an IDX file of images") from None
        check(images.dim() == 3, f"{path} is an IDX file of {images.dim()}-dimensional data, not of images")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        # Truncated or damaged; PIL's bound on text chunks raises ValueError, some damaged headers SyntaxError.
        raise UserError(f"{path}: cannot be read as an image ({error})") from None
    height, width = images.shape[1:]
    size = f"{IMAGE_SIDE}x{IMAGE_SIDE}"
    fix = (f"an IDX file's are taken as they are: give one of {size} images" if idx else
           f"with --no-prepare the model takes {size} grayscale images, as Fashion-MNIST's: leave --no-prepare out, "
           f"or resize it to {size} first")
    check((height, width) == (IMAGE_SIDE, IMAGE_SIDE), f"{path}: images are {width}x{height} pixels; {fix}")
    return images
