"""The Fashion-MNIST data module on tiny IDX files written by the fixtures: no network, no real data."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from mlp.augment import shift_and_flip
from mlp.data import (
    FILES,
    CorruptDatasetError,
    DatasetNotFoundError,
    FashionMNISTDataModule,
    locate_fashion_mnist,
    read_idx,
    unit_pixels,
)
from tests.conftest import real_data_available, write_idx, write_synthetic_dataset

ROOT = Path(__file__).resolve().parent.parent


def prepared(data_dir: Path, stage: str = "test", **kwargs) -> FashionMNISTDataModule:
    data = FashionMNISTDataModule(data_dir=str(data_dir), **{"val_size": 100, "batch_size": 32, **kwargs})
    data.setup(stage)
    return data


def test_split_sizes_and_test_set_kept_apart(synthetic_dir):
    data = prepared(synthetic_dir)
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (700, 100, 200)


def test_split_is_deterministic_for_a_seed_and_changes_with_it(synthetic_dir):
    first, again, other = (prepared(synthetic_dir, seed=s).val_set.tensors[0] for s in (0, 0, 1))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def rows_of_file(data: FashionMNISTDataModule, images: Path) -> dict[bytes, int]:
    """Each image of an IDX file, standardised as the data module does, by its exact bytes -> its index."""
    rows = unit_pixels(read_idx(images, images.parent / "cache")).sub_(data.mean).div_(data.std)
    return {row.numpy().tobytes(): index for index, row in enumerate(rows)}


def served(loader) -> tuple[list[bytes], torch.Tensor]:
    """Every image a loader serves in an epoch, as exact bytes, and its labels."""
    batches = list(loader)
    images, labels = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    return [row.numpy().tobytes() for row in images], labels


def test_loaders_serve_validation_from_the_training_file_and_test_from_the_test_file(synthetic_dir):
    data = prepared(synthetic_dir)
    train_file = rows_of_file(data, synthetic_dir / f"{FILES['train_images']}.gz")
    test_file = rows_of_file(data, synthetic_dir / f"{FILES['test_images']}.gz")
    assert len(train_file) == 800 and len(test_file) == 200 and not train_file.keys() & test_file.keys()
    train_labels = read_idx(synthetic_dir / f"{FILES['train_labels']}.gz", synthetic_dir / "cache")

    val_rows, val_labels = served(data.val_dataloader())
    train_rows, _ = served(data.train_dataloader())
    test_rows, _ = served(data.test_dataloader())
    # Exact bytes, not a distance: every validation image is a training-file image, with its own label.
    val_idx = torch.tensor([train_file.get(row, -1) for row in val_rows])
    train_idx = torch.tensor([train_file.get(row, -1) for row in train_rows])
    assert (val_idx >= 0).all() and (train_idx >= 0).all() and not any(row in test_file for row in val_rows)
    assert torch.equal(val_labels, train_labels[val_idx].long())
    assert len(val_idx.unique()) == 100 and len(train_idx.unique()) == 700
    assert not torch.isin(val_idx, train_idx).any()
    assert sorted(test_file[row] for row in test_rows) == list(range(200))


def test_inputs_are_flat_standardised_floats_and_labels_are_classes(synthetic_dir):
    data = prepared(synthetic_dir)
    x, y = data.train_set.tensors
    assert x.dtype == torch.float32 and x.shape[1] == 784
    assert y.dtype == torch.int64 and 0 <= y.min() and y.max() <= 9
    assert x.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert x.std().item() == pytest.approx(1.0, abs=1e-3)


def test_batches_cover_the_training_set_once_per_epoch(synthetic_dir):
    data = prepared(synthetic_dir, stage="fit")
    batches = list(data.train_dataloader())
    assert [len(y) for _, y in batches] == [32] * 21 + [28]
    seen = torch.cat([x for x, _ in batches])
    assert torch.equal(seen.sort(dim=0).values, data.train_set.tensors[0].sort(dim=0).values)


@pytest.mark.parametrize("layout", ["plain", "gz", "torchvision"])
def test_finds_files_in_data_dir_layouts(tmp_path, layout, no_download):
    folder = tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path
    write_synthetic_dataset(folder, gz=layout == "gz")
    found = locate_fashion_mnist(tmp_path)
    assert set(found) == set(FILES)
    assert all(path.parent == folder for path in found.values())
    assert len(prepared(tmp_path).test_set) == 200


def test_falls_back_to_the_debian_folder(tmp_path, monkeypatch, no_download):
    debian = write_synthetic_dataset(tmp_path / "debian")
    monkeypatch.setattr("mlp.data.DEBIAN_DIR", debian)
    found = locate_fashion_mnist(tmp_path / "empty")
    assert all(path.parent == debian for path in found.values())


def test_a_data_dir_missing_some_files_is_refused_naming_them_rather_than_passed_over(tmp_path, monkeypatch):
    # The Debian folder's Fashion-MNIST had been trained and tested on instead, without a word.
    debian = write_synthetic_dataset(tmp_path / "debian")
    monkeypatch.setattr("mlp.data.DEBIAN_DIR", debian)
    own = write_synthetic_dataset(tmp_path / "own", gz=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (own / name).unlink()
    with pytest.raises(DatasetNotFoundError, match=f"{own} holds train-images-idx3-ubyte, train-labels-idx1-ubyte "
                                                   "but not t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"):
        locate_fashion_mnist(own)


def test_missing_dataset_names_the_places_tried_and_the_install_command(tmp_path, monkeypatch, no_download):
    monkeypatch.setattr("mlp.data.DEBIAN_DIR", tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError) as error:
        locate_fashion_mnist(tmp_path / "empty")
    message = str(error.value)
    assert str(tmp_path / "empty") in message and str(tmp_path / "nowhere") in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "download" in message


def test_corrupt_file_is_named_in_the_error(synthetic_dir):
    labels = synthetic_dir / (FILES["train_labels"] + ".gz")
    labels.write_bytes(labels.read_bytes()[:40])  # a truncated gzip stream
    with pytest.raises(CorruptDatasetError, match="train-labels-idx1-ubyte"):
        prepared(synthetic_dir)


@pytest.mark.skipif(not real_data_available(), reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_has_its_published_sizes(tmp_path):
    shutil.rmtree(tmp_path)
    data = prepared(tmp_path, val_size=5000)
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (55000, 5000, 10000)



def test_data_sits_on_the_trainers_device_so_batches_need_no_copy(synthetic_dir):
    from types import SimpleNamespace

    data = FashionMNISTDataModule(data_dir=str(synthetic_dir), val_size=100, batch_size=32)
    # A 'meta' device stands in for a GPU on a machine without one: placement is checked, no memory used.
    data.trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("meta")), world_size=1, global_rank=0
    )
    data.setup("test")
    for dataset in (data.train_set, data.val_set, data.test_set):
        assert all(t.device.type == "meta" for t in dataset.tensors)
    x, y = next(iter(data.train_dataloader()))
    assert x.device.type == "meta" and y.device.type == "meta" and x.shape == (32, 784)


def test_val_size_zero_trains_on_every_training_image(synthetic_dir):
    data = prepared(synthetic_dir, val_size=0)
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (800, 0, 200)


def test_shifts_move_a_known_image_by_at_most_max_shift_and_flips_mirror_it():
    image = torch.zeros(28, 28)
    image[10, 3] = 1.0  # one lit pixel, off-centre so a flip shows
    torch.manual_seed(0)
    moved = shift_and_flip(image.reshape(1, 784).repeat(500, 1), max_shift=2, flip_chance=0.0, background=-1.0)
    where = [divmod(row.argmax().item(), 28) for row in moved]
    assert {(r - 10, c - 3) for r, c in where} == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    for row, (r, c) in zip(moved, where):  # the rest is the image's zeros or background moved in at the edge
        expected = torch.zeros(28, 28)
        expected[10, 3] = 1.0
        expected = expected.roll((r - 10, c - 3), dims=(0, 1))
        dy, dx = r - 10, c - 3
        if dy > 0:
            expected[:dy] = -1.0
        if dy < 0:
            expected[dy:] = -1.0
        if dx > 0:
            expected[:, :dx] = -1.0
        if dx < 0:
            expected[:, dx:] = -1.0
        assert torch.equal(row.reshape(28, 28), expected)
    flipped = shift_and_flip(image.reshape(1, 784).repeat(200, 1), max_shift=0, flip_chance=0.5, background=-1.0)
    mirrored = image.flip(-1).reshape(784)
    is_mirrored = (flipped == mirrored).all(dim=1)
    assert ((flipped == image.reshape(784)).all(dim=1) | is_mirrored).all()
    assert 50 < is_mirrored.sum() < 150


class RecordInputs(L.Callback):
    """Keeps what the net sees of every batch (after the model's augmentation), by stage."""

    def __init__(self) -> None:
        self.seen: dict[str, list[torch.Tensor]] = {"train": [], "validate": [], "test": []}

    def on_fit_start(self, trainer, pl_module):
        def keep(net, args):
            stage = "train" if trainer.training else "test" if trainer.testing else "validate"
            self.seen[stage].append((trainer.current_epoch, args[0].clone()))

        pl_module.net.register_forward_pre_hook(keep)


def test_augmentation_changes_training_inputs_each_epoch_and_never_validation_or_test(synthetic_dir):
    from mlp.module import MLPClassifier

    L.seed_everything(0, verbose=False)
    data = FashionMNISTDataModule(str(synthetic_dir), batch_size=64, val_size=100)
    record = RecordInputs()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[record], num_sanity_val_steps=0,
    )
    trainer.fit(MLPClassifier(depth=1, width=8, augment_shift=1, augment_flip=0.5), datamodule=data)
    trainer.test(datamodule=data, ckpt_path=None, model=trainer.lightning_module)
    train = data.train_set.tensors[0]
    originals = {row.numpy().tobytes() for row in train}
    epochs = [torch.cat([x for epoch, x in record.seen["train"] if epoch == e]) for e in (0, 1)]
    for images in epochs:
        assert images.shape == train.shape
        unchanged = sum(row.numpy().tobytes() in originals for row in images) / len(images)
        assert 0.02 < unchanged < 0.15  # 1/9 unshifted x 1/2 unflipped: 1/18
        assert images.min() == pytest.approx(data.background)  # pixels moved in are black, as standardised
    assert not torch.equal(epochs[0].sort(dim=0).values, epochs[1].sort(dim=0).values)
    val, test = data.val_set.tensors[0], data.test_set.tensors[0]
    assert torch.equal(torch.cat([x for _, x in record.seen["validate"]]), torch.cat([val, val]))  # two epochs
    assert torch.equal(torch.cat([x for _, x in record.seen["test"]]), test)


# -- the .gz cache under several processes -----------------------------------------------------------------

# Decompressing is made slow (a pause inside the read of the .gz), so the moment a file is being written
# lasts long enough for the other processes, or a kill, to land in it.
SLOW_GUNZIP = """
import gzip, sys, time
from pathlib import Path
read = gzip.GzipFile.read
def slow_read(self, *args):
    print("writing", flush=True)
    time.sleep(float(sys.argv[2]))
    return read(self, *args)
gzip.GzipFile.read = slow_read
from mlp.data import FashionMNISTDataModule
print("ready", flush=True)
while not Path(sys.argv[3]).exists():
    time.sleep(0.01)
data = FashionMNISTDataModule(data_dir=sys.argv[1], val_size=100)
data.setup("test")
print("sizes", len(data.train_set), len(data.val_set), len(data.test_set), flush=True)
"""


def loader_process(data_dir: Path, pause: float, go: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_GUNZIP, str(data_dir), str(pause), str(go)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_processes_started_together_on_gz_files_all_read_whole_files(synthetic_dir, tmp_path):
    go = tmp_path / "go"
    processes = [loader_process(synthetic_dir, 0.5, go) for _ in range(3)]
    for process in processes:
        assert process.stdout.readline() == "ready\n", process.communicate()[1][-3000:]
    go.touch()  # all three look for the cache at the same moment
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        assert "sizes 700 100 200" in stdout


def test_a_process_killed_while_decompressing_leaves_no_file_that_later_reads_trust(synthetic_dir, tmp_path):
    go = tmp_path / "go"
    go.touch()
    victim = loader_process(synthetic_dir, 600, go)
    while (line := victim.stdout.readline()) != "writing\n":
        assert line, f"the process ended before decompressing:\n{victim.communicate()[1][-3000:]}"
    victim.kill()
    victim.communicate(timeout=60)
    assert len(prepared(synthetic_dir).test_set) == 200  # the next reader gets whole files


def test_a_gz_file_replaced_after_it_was_decompressed_is_read_anew(synthetic_dir):
    """The first copy had been read for good: a user who swapped in relabelled files trained on the old labels."""
    labels = synthetic_dir / f"{FILES['test_labels']}.gz"
    cache = synthetic_dir / "FashionMNIST" / "raw"
    assert read_idx(labels, cache)[:3].tolist() != [9, 9, 9]
    os.utime(cache / labels.stem, (1, 1))  # the copy older than the file replacing it, whatever the clock's grain
    write_idx(labels, torch.full((200,), 9))
    assert read_idx(labels, cache).tolist() == [9] * 200
    # torchvision's layout, a file and its .gz side by side: the copy is read, unless the .gz is newer.
    for gz in synthetic_dir.glob("*.gz"):
        gz.rename(cache / gz.name)
    read_idx(cache / labels.name, cache)  # the copy, as the dataset's first reading leaves it
    assert locate_fashion_mnist(synthetic_dir)["test_labels"] == cache / labels.stem
    os.utime(cache / labels.stem, (1, 1))
    write_idx(cache / labels.name, torch.full((200,), 8))
    assert read_idx(locate_fashion_mnist(synthetic_dir)["test_labels"], cache).tolist() == [8] * 200


def test_a_gz_file_put_back_with_its_older_time_is_read_anew(synthetic_dir):
    """As `cp -p` or a package's reinstall put a file back, older than the copy of the file it replaces: that copy had
    been read, the relabelled or corrupt file's, and the message a corrupt one gave named the restored file."""
    labels = synthetic_dir / f"{FILES['test_labels']}.gz"
    cache = synthetic_dir / "FashionMNIST" / "raw"
    kept, original = labels.read_bytes(), read_idx(labels, cache)
    write_idx(labels, torch.full((200,), 9))
    os.utime(labels, (2, 2))
    assert read_idx(labels, cache).tolist() == [9] * 200
    labels.write_bytes(kept)
    os.utime(labels, (1, 1))
    assert torch.equal(read_idx(labels, cache), original)
