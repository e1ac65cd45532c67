"""Shared fixtures: tiny, learnable Fashion-MNIST look-alikes written as real IDX files."""

import gzip
import hashlib
import os
import struct
from pathlib import Path

import pytest
import torch

from mlp.data import DEBIAN_DIR, FILES
from mlp.devices import cpu_threads


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (pyproject's addopts: two processes) each test process, and the processes its tests start,
    get their share of the cores: with torch's default, a thread per core in each, they contend (the suite took half
    as long again, docs/results.md#suite-xeon)."""
    if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
        threads = cpu_threads(int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def write_idx(path: Path, data: torch.Tensor) -> None:
    """Write a uint8 tensor in the IDX format (big-endian header: magic 0x0000 08 ndim, then each dim)."""
    header = struct.pack(">I", 0x0800 + data.dim()) + b"".join(struct.pack(">I", n) for n in data.shape)
    payload = header + data.to(torch.uint8).contiguous().numpy().tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def synthetic_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class k lights up the k-th horizontal band, plus noise: easy but not trivial to learn."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 120, (n, 28, 28), generator=g)
    for k in range(10):
        images[labels == k, 2 * k + 4 : 2 * k + 6, :] += 130
    return images.clamp(0, 255).to(torch.uint8), labels.to(torch.uint8)


def write_synthetic_dataset(folder: Path, n_train: int = 800, n_test: int = 200, gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        images, labels = synthetic_split(n, seed)
        write_idx(folder / (FILES[f"{split}_images"] + suffix), images)
        write_idx(folder / (FILES[f"{split}_labels"] + suffix), labels)
    return folder


@pytest.fixture
def synthetic_dir(tmp_path: Path) -> Path:
    """A data_dir holding 800 training and 200 test synthetic images as .gz IDX files."""
    return write_synthetic_dataset(tmp_path / "data")


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make torchvision's download fail at once, as it does on an offline machine."""

    def refuse(*args, **kwargs):
        raise RuntimeError("offline")

    monkeypatch.setattr("mlp.data.FashionMNIST", refuse)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its content's digest: equal snapshots, untouched files."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).digest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


class Payload:
    """Pickled into a checkpoint, it calls open(marker, "w") as the checkpoint is unpickled: any function could
    stand in its place, so a test that finds no marker shows that nothing in the file ran."""

    # How the file names the function, as the loader's refusal quotes it: "io.open" up to Python 3.12, "_io.open" after.
    CALLS = f"{open.__module__}.{open.__qualname__}"

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return open, (str(self.marker), "w")


def real_data_available() -> bool:
    return all((DEBIAN_DIR / f"{name}.gz").is_file() for name in FILES.values())


def epoch_values(trial) -> list[float]:
    """The val/acc a trial reached at the end of each epoch it trained, read back from its intermediate values.

    Trials report at the tenths of their own schedule (mlp.search.record_intermediate_values); an epoch ends on
    a tenth, with its own value, when the epoch count divides 10, as in these tests' small studies.
    """
    epochs = trial.params["epochs"]
    assert 10 % epochs == 0, "epoch ends fall between tenths"
    return [trial.intermediate_values[100 * (e + 1) // epochs] for e in range(trial.user_attrs["epochs_trained"])]


@torch.no_grad()
def checkpoint_softmax(checkpoint: str, images: torch.Tensor) -> torch.Tensor:
    """A checkpoint's softmax over `images`, loaded and run here: the reference that mlp.final's figures meet."""
    from mlp.module import MLPClassifier

    return MLPClassifier.load_from_checkpoint(checkpoint, map_location="cpu").eval()(images).softmax(dim=1)
