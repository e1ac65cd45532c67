"""Fashion-MNIST as in-memory tensors on the training device: decoded once, normalised once, served by indexing,
since per-sample PIL decoding and ToTensor (d2l's pipeline) cost several times the training itself."""

import gzip
import math
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset
from torchvision.datasets import FashionMNIST
from torchvision.datasets.mnist import SN3_PASCALVINCENT_TYPEMAP, read_image_file, read_label_file

from mlp.errors import UserError, check

CLASS_NAMES = list(FashionMNIST.classes)
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
IMAGE_SIDE = 28
TRAIN_IMAGES = 60_000  # Fashion-MNIST's training set, of which val_size are held out for validation
TEST_IMAGES = 10_000
EVAL_BATCH_SIZE = 2048  # evaluation keeps no activations for backward, so larger batches cost nothing extra
MAX_IDX_BYTES = 2**27  # what a .gz may decompress to: 2.8 times Fashion-MNIST's largest file
CHUNK_BYTES = 2**20


class DatasetNotFoundError(UserError, FileNotFoundError):
    """Fashion-MNIST is in none of the places we look, and downloading it failed."""


class CorruptDatasetError(UserError, ValueError):
    """A Fashion-MNIST file exists but does not hold what its name promises."""


def _find_in(folder: Path, files: dict[str, str] = FILES) -> dict[str, Path] | None:
    """The `files` in `folder`, each as found, or None if any is missing. Of a file and its .gz the newer, the file if
    even: the file decompressed from the .gz (our copies take its time), unless the .gz was replaced since
    (torchvision's layout holds both)."""
    found = {key: max((c for c in (folder / name, folder / f"{name}.gz") if c.is_file()),
                      key=lambda c: c.stat().st_mtime, default=None)
             for key, name in files.items()}
    return found if all(found.values()) else None


def locate_fashion_mnist(data_dir: str | Path) -> dict[str, Path]:
    """Paths of the four IDX files: in data_dir, then the Debian package's folder, then via torchvision's download."""
    data_dir = Path(data_dir).expanduser()
    if data_dir.exists() and not data_dir.is_dir():
        raise DatasetNotFoundError(f"data_dir {data_dir} is a file, not a folder; pass a folder with --data.data_dir")
    places = [data_dir, data_dir / "FashionMNIST" / "raw", DEBIAN_DIR]
    for folder in places:
        if found := _find_in(folder):
            return found
        if folder == data_dir and (some := [n for n in FILES.values() if _find_in(data_dir, {n: n})]):
            # Files of one's own, one missing: the next place's Fashion-MNIST would be trained on without a word.
            missing = [name for name in FILES.values() if name not in some]
            raise DatasetNotFoundError(f"{data_dir} holds {', '.join(some)} but not {', '.join(missing)} (or .gz): "
                                       "put all four there, or pass --data.data_dir a folder that holds them")
    try:
        FashionMNIST(data_dir, download=True)
    except Exception as error:  # torchvision raises several kinds; all mean "not downloaded"
        download_error = f"{type(error).__name__}: {error}".splitlines()[0]
    else:
        return _find_in(data_dir / "FashionMNIST" / "raw")
    tried = "\n".join(f"  - {folder}" for folder in places)
    raise DatasetNotFoundError(
        f"Fashion-MNIST not found. Looked for {', '.join(FILES.values())} (or .gz) in:\n{tried}\n"
        f"  - torchvision download into {data_dir} failed ({download_error})\n"
        f"Install it with:\n  {INSTALL_HINT}\n"
        f"or put the four files in a folder and pass --data.data_dir FOLDER."
    )


def decompress(gz: Path, plain: Path) -> None:
    """Write gz's content to plain atomically, with gz's modification time. Several processes (tune workers, a fit
    beside a tune) may decompress the same file at once, and any may be killed midway: each writes its own temporary
    file and renames it."""
    modified = gz.stat().st_mtime_ns  # before reading: a gz replaced meanwhile leaves a copy that differs from it
    plain.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=plain.parent, prefix=f".{plain.name}.", delete=False) as temporary:
        try:
            with gzip.open(gz) as source:
                copy_idx(source, temporary)
        except BaseException:
            Path(temporary.name).unlink()
            raise
    os.utime(temporary.name, ns=(modified, modified))
    os.replace(temporary.name, plain)


def copy_idx(source: BinaryIO, target: BinaryIO) -> None:
    """Copy the IDX file in `source` (a decompressing stream) to `target` in chunks, no more than its header
    declares and at most MAX_IDX_BYTES: a small .gz can expand to gigabytes. A file longer than its header says is
    refused as torchvision would refuse it, only sooner."""
    magic = source.read(4)
    # The header: two zero bytes, the element type, the number of dimensions, then each dimension big-endian.
    if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in SN3_PASCALVINCENT_TYPEMAP:
        raise ValueError(f"no IDX header (magic number {magic.hex() or 'missing'})")
    dimensions = source.read(4 * magic[3])
    if len(dimensions) < 4 * magic[3]:
        raise ValueError("its header ends before its dimensions")
    shape = struct.unpack(f">{magic[3]}I", dimensions)
    size = math.prod(shape) * SN3_PASCALVINCENT_TYPEMAP[magic[2]].itemsize
    if size > MAX_IDX_BYTES - len(magic + dimensions):
        raise ValueError(f"its header declares {size:,} bytes of data {shape}, above the {MAX_IDX_BYTES:,} read "
                         "from a .gz")
    target.write(magic + dimensions)
    while size and (chunk := source.read(min(size, CHUNK_BYTES))):
        target.write(chunk)
        size -= len(chunk)
    if source.read(1):
        raise ValueError(f"it holds more data than its header declares {shape}")


def read_idx(path: Path, cache_dir: Path) -> Tensor:
    """The tensor in an IDX file, decoded by torchvision; a .gz is decompressed into cache_dir first, once, and
    again when its modification time is not its copy's (replaced by other images or labels, which the copy would
    hide; replaced by an older file too, as `cp -p` and reinstalling a package leave it)."""
    plain = cache_dir / path.stem if path.suffix == ".gz" else path
    try:
        if plain != path and (not plain.is_file() or plain.stat().st_mtime_ns != path.stat().st_mtime_ns):
            decompress(path, plain)
        return read_label_file(str(plain)) if "labels" in plain.name else read_image_file(str(plain))
    except (OSError, EOFError, RuntimeError, AssertionError, ValueError, TypeError) as error:
        # Named by the user's file, not by its copy in the cache: that file is the one to put right.
        raise corrupt(path, f"cannot be read as an IDX file ({type(error).__name__}: {error})") from None


def corrupt(path: Path, what: str) -> CorruptDatasetError:
    """What is wrong with the Fashion-MNIST file at `path`, and how to get Fashion-MNIST's own back."""
    fix = ("restore them: sudo apt-get install --reinstall dataset-fashion-mnist" if path.parent == DEBIAN_DIR else
           f"put Fashion-MNIST's own files there, or remove the four to use {DEBIAN_DIR}'s")
    return CorruptDatasetError(f"{path}: {what}; {fix}")


def load_split(files: dict[str, Path], split: str, cache_dir: Path) -> tuple[Tensor, Tensor]:
    """uint8 images (N, 28, 28) and int64 labels (N,) of the 'train' or 'test' split, checked for consistency."""
    image_file, label_file = files[f"{split}_images"], files[f"{split}_labels"]
    images, labels = read_idx(image_file, cache_dir), read_idx(label_file, cache_dir)
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise corrupt(image_file, f"expected 28x28 images, found shape {tuple(images.shape)}")
    if len(images) != len(labels):
        raise corrupt(image_file, f"holds {len(images)} images but {label_file} {len(labels)} labels")
    if len(labels) and labels.max() >= len(CLASS_NAMES):
        raise corrupt(label_file, f"labels must be 0-9, found {labels.max().item()}")
    return images, labels


def check_workers_fit_device(num_workers: int, device: torch.device) -> None:
    check(num_workers == 0 or device.type != "cuda", f"--data.num_workers must be 0 on a GPU, got {num_workers}: "
          "the data already sits on the GPU, and worker processes cannot use CUDA")


def unit_pixels(images: Tensor) -> Tensor:
    """uint8 images (N, 28, 28) as float rows (N, 784) in [0, 1]."""
    return images.reshape(len(images), IMAGE_SIDE * IMAGE_SIDE).float().div_(255)


class IndexBatches(Sampler[Tensor]):
    """Batches of indices as tensors (slices of a permutation, where torch's BatchSampler builds Python lists that
    cost more than a training step), and under DDP this process's share of each.

    Shuffled (training): epoch e's permutation is seeded by (seed, e), so every rank draws the same one and takes its
    part of each batch: the ranks' steps together are the one-device run's. Unshuffled (evaluation): each rank takes
    one contiguous part, unpadded, so every image is evaluated once.
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0, ranks: int = 1) -> None:
        self.size, self.batch_size, self.shuffle = size, batch_size, shuffle
        self.seed, self.rank, self.ranks, self.epoch = seed, rank, ranks, 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every training epoch's start, as for DistributedSampler."""
        self.epoch = epoch

    def __len__(self) -> int:
        # Counted from the batches themselves (one permutation, well under a millisecond), so it cannot disagree.
        return len(self._batches())

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self._batches())

    def _batches(self) -> list[Tensor]:
        if not self.shuffle:
            return list(torch.arange(self.size).tensor_split(self.ranks)[self.rank].split(self.batch_size))
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch)))
        batches = list(torch.randperm(self.size, generator=generator).split(self.batch_size))
        if len(batches) > 1 and len(batches[-1]) < max(self.ranks, 2):
            # Too few left to give every rank one, or one image alone, which has no batch statistics (batch_norm
            # would standardise it to zeros): the last batch joins the one before, on one process as on several.
            batches[-2:] = [torch.cat(batches[-2:])]
        return [batch.tensor_split(self.ranks)[self.rank] for batch in batches]


class FashionMNISTDataModule(L.LightningDataModule):
    """Fashion-MNIST with a fixed-seed validation split carved from the training images.

    The test images are served only for `trainer.test`, so model selection never sees them. `val_size` 0 trains on
    all training images with no validation (a refit). `batch_size` is one optimiser step's; under DDP each rank
    takes its part of it. Augmentation is the model's (`MLPClassifier.inputs`), so stacked trials differ in it.
    """

    input_size = IMAGE_SIDE * IMAGE_SIDE  # what a model's first layer takes: one flattened image

    def __init__(self, data_dir: str = "data", batch_size: int = 256, val_size: int = 5000, seed: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__()
        check(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        check(val_size >= 0, f"val_size must be >= 0 (0: train on everything, no validation), got {val_size}")
        check(num_workers >= 0, f"num_workers must be >= 0, got {num_workers}")
        check(-2**63 <= seed < 2**64, f"seed must fit in 64 bits (torch's generator seeds), got {seed}")
        self.save_hyperparameters()
        self.train_set = self.val_set = self.test_set = None

    def setup(self, stage: str) -> None:
        hp = self.hparams
        cache_dir = Path(hp.data_dir).expanduser() / "FashionMNIST" / "raw"
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        check_workers_fit_device(hp.num_workers, device)
        ranks = self.trainer.world_size if self.trainer else 1
        check(hp.batch_size >= ranks, f"--data.batch_size ({hp.batch_size}) must be at least the number of processes "
              f"({ranks}): each takes its part of every batch")
        check(hp.val_size == 0 or hp.val_size >= ranks, f"--data.val_size ({hp.val_size}) must be 0 or at least the "
              f"number of processes ({ranks}): each validates its part of the split")
        if self.train_set is None:
            self.files = locate_fashion_mnist(hp.data_dir)
            images, labels = load_split(self.files, "train", cache_dir)
            # The test files checked now, though served only for trainer.test: found corrupt then, a run is lost.
            load_split(self.files, "test", cache_dir)
            check(hp.val_size < len(images),
                  f"val_size must be below the {len(images)} training images, got {hp.val_size}")
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(hp.seed))
            val_idx, train_idx = order[: hp.val_size], order[hp.val_size :]
            # Statistics of the training split alone, so nothing about validation or test leaks into the inputs.
            train_pixels = unit_pixels(images[train_idx])
            self.mean, self.std = train_pixels.mean().item(), train_pixels.std().item()
            self.background = -self.mean / self.std  # a black pixel, standardised
            self.train_set = self._dataset(train_pixels, labels[train_idx], device)
            self.val_set = self._dataset(unit_pixels(images[val_idx]), labels[val_idx], device)
        if stage == "test" and self.test_set is None:
            images, labels = load_split(self.files, "test", cache_dir)
            self.test_set = self._dataset(unit_pixels(images), labels, device)

    def state_dict(self) -> dict[str, float]:
        """The training split's standardisation, which Lightning writes into every checkpoint (under the class's
        name), so a checkpoint standardises new images without the training images (`mlp.answer`)."""
        return {"mean": self.mean, "std": self.std} if self.train_set is not None else {}

    def _dataset(self, pixels: Tensor, labels: Tensor, device: torch.device) -> TensorDataset:
        """Standardises `pixels` in place: one copy of the training images in memory, not three."""
        return TensorDataset(pixels.sub_(self.mean).div_(self.std).to(device), labels.to(device))

    def _loader(self, dataset: TensorDataset, batch_size: int, shuffle: bool) -> DataLoader:
        # One gather per batch instead of collating single samples; the run's seed (--seed_everything) shuffles.
        rank, ranks = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler = IndexBatches(len(dataset), batch_size, shuffle, torch.initial_seed(), rank, ranks)
        return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, max(self.hparams.batch_size, EVAL_BATCH_SIZE), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, max(self.hparams.batch_size, EVAL_BATCH_SIZE), shuffle=False)
