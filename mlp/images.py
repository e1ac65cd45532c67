"""A user's images as Fashion-MNIST stores its own: uint8 tensors (N, 28, 28), read by PIL or torchvision."""

import tempfile
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor

from mlp.data import CorruptDatasetError, read_idx
from mlp.errors import UserError, check

SIZE = 28


def read_images(path: Path) -> Tensor:
    """The images in an image file PIL reads (PNG, JPEG...: one image, made grayscale) or in an IDX file
    (any number, as Fashion-MNIST's own files hold them, possibly .gz), as uint8 (N, 28, 28)."""
    check(path.is_file(), f"{path} not found; pass image files (PNG, JPEG) or IDX files")
    try:
        with Image.open(path) as image:
            images = pil_to_tensor(image.convert("L"))  # (1, height, width)
    except UnidentifiedImageError:
        images = read_idx_images(path)
    except OSError as error:  # a truncated or damaged image file
        raise UserError(f"{path}: cannot be read as an image ({error})") from None
    height, width = images.shape[1:]
    check(
        (height, width) == (SIZE, SIZE),
        f"{path}: images are {width}x{height} pixels; the model takes 28x28 grayscale images, as Fashion-MNIST's: "
        "resize it to 28x28 first",
    )
    return images


def read_idx_images(path: Path) -> Tensor:
    """The uint8 images (N, H, W) of an IDX file, decoded by torchvision as the data module decodes the dataset."""
    with tempfile.TemporaryDirectory() as cache:  # where a .gz is decompressed
        try:
            images = read_idx(path, Path(cache))
        except CorruptDatasetError:
            raise UserError(f"{path} is neither an image (PNG, JPEG...) nor an IDX file of images") from None
    check(images.dim() == 3, f"{path} is an IDX file of {images.dim()}-dimensional data, not of images")
    return images
