"""fit.py on several processes (DDP, gloo on the CPU) is the one-process run, split: each rank trains its own part
of every batch, every image is evaluated once, figures are synced, and the run prints and saves once."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import TensorDataset

from mlp.cli import build_cli
from mlp.data import FashionMNISTDataModule, IndexBatches, check_workers_fit_device
from mlp.errors import UserError
from mlp.module import MLPClassifier
from tests.conftest import write_synthetic_dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import fit  # noqa: E402
TWO_PROCESSES = ["--trainer.accelerator=cpu", "--trainer.devices=2"]


def epoch_batches(sampler: IndexBatches, epoch: int) -> list[torch.Tensor]:
    sampler.set_epoch(epoch)
    torch.rand(epoch + 1)  # as dropout and augmentation would: the ranks' global random streams part ways
    return list(sampler)


@pytest.mark.parametrize("size, batch_size", [(700, 32), (65, 32), (64, 32), (5, 2)])
def test_each_epochs_batches_are_the_one_process_batches_cut_in_disjoint_parts(size, batch_size):
    one = IndexBatches(size, batch_size, shuffle=True, seed=3)
    ranks = [IndexBatches(size, batch_size, shuffle=True, seed=3, rank=r, ranks=2) for r in (0, 1)]
    orders = []
    for epoch in range(3):
        alone = epoch_batches(one, epoch)
        parts = [epoch_batches(sampler, epoch) for sampler in ranks]
        assert len(parts[0]) == len(parts[1]) == len(ranks[0]) == len(ranks[1])  # DDP steps together
        assert all(len(part) > 0 for rank in parts for part in rank)
        joined = [torch.cat(step) for step in zip(*parts)]
        assert torch.cat(joined).sort().values.equal(torch.arange(size))  # disjoint, and all of them
        assert all(torch.equal(a, b) for a, b in zip(alone, joined)) and len(alone) == len(joined)
        assert len(one) == len(alone) and min(len(batch) for batch in alone) >= 2  # a batch of one joins another
        orders.append(torch.cat(alone))
    assert not torch.equal(orders[0], orders[1])  # a new permutation each epoch
    again = IndexBatches(size, batch_size, shuffle=True, seed=3)  # a resumed run: epoch 1 without epoch 0 first
    assert torch.equal(torch.cat(epoch_batches(again, 1)), orders[1])


@pytest.mark.parametrize("size, ranks", [(5000, 2), (101, 2), (7, 3), (2, 2)])
def test_evaluation_shards_hold_every_image_exactly_once(size, ranks):
    shards = [list(IndexBatches(size, 2048, shuffle=False, rank=r, ranks=ranks)) for r in range(ranks)]
    assert [len(shard) for shard in shards] == [len(IndexBatches(size, 2048, False, rank=r, ranks=ranks))
                                                for r in range(ranks)]
    assert torch.cat([torch.cat(shard) for shard in shards if shard]).equal(torch.arange(size))


class RecordTrainingIndices(L.Callback):
    """Writes the training-set indices each rank's batches gathered in each epoch to folder/rank{r}_epoch{e}.pt."""

    class Recording(TensorDataset):
        def __init__(self, dataset: TensorDataset) -> None:
            super().__init__(*dataset.tensors)
            self.seen: list[torch.Tensor] = []

        def __getitem__(self, index: torch.Tensor):
            self.seen.append(index)
            return super().__getitem__(index)

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def setup(self, trainer, pl_module, stage: str) -> None:  # after the data module's setup
        trainer.datamodule.train_set = self.Recording(trainer.datamodule.train_set)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        seen = trainer.datamodule.train_set.seen
        torch.save(torch.cat(seen), self.folder / f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.pt")
        seen.clear()


def one_process_figures(checkpoint: Path, data_dir: Path, val_size: int) -> dict[str, float]:
    """val/acc and test/acc of a checkpoint, evaluated in this process alone."""
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    data = FashionMNISTDataModule(str(data_dir), val_size=val_size)
    model = MLPClassifier.load_from_checkpoint(checkpoint)
    (val,) = trainer.validate(model, datamodule=data, verbose=False)
    (test,) = trainer.test(model, datamodule=data, verbose=False)
    return {"val/acc": val["val/acc"], "test/acc": test["test/acc"]}


def test_two_process_fit_exits_0_prints_once_and_reports_what_one_process_measures(tmp_path):
    # 5,000 test images make three evaluation batches of 2,048: Lightning's DistributedSampler would pad them to
    # four, counting one twice. A narrow net trained briefly keeps the figures away from 1.0, where that hides.
    data_dir = write_synthetic_dataset(tmp_path / "data", n_train=1500, n_test=5000)
    record = tmp_path / "record"
    record.mkdir()
    args = [
        f"--data.data_dir={data_dir}", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--data.val_size=301", "--data.batch_size=64", "--trainer.max_epochs=2", "--progress_bar.refresh_rate=0",
        "--model.depth=1", "--model.width=4", "--model.lr=0.003", "--model.dropout=0.5",
        "--model.augment_shift=2", "--model.augment_flip=0.5", *TWO_PROCESSES, "--trainer.strategy=ddp",
        "--trainer.callbacks+=tests.test_ddp.RecordTrainingIndices", f"--trainer.callbacks.folder={record}",
    ]
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "fit.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})

    assert done.returncode == 0, done.stderr[-3000:]
    assert "terminate called" not in done.stderr
    assert "sync_dist=True" not in done.stderr  # Lightning's advice for each epoch-level figure logged unsynced
    assert "DistributedSampler" not in done.stderr
    printed = done.stdout.splitlines()
    assert sum(line.startswith("test accuracy") for line in printed) == 1
    assert sum(line.startswith("logs:") for line in printed) == 1
    (run,) = (tmp_path / "logs" / "fit").iterdir()  # one run folder, not one per process
    for epoch in (0, 1):
        shards = [torch.load(record / f"rank{rank}_epoch{epoch}.pt") for rank in (0, 1)]
        assert len(set(shards[0].tolist()) & set(shards[1].tolist())) == 0
        assert torch.cat(shards).sort().values.equal(torch.arange(1500 - 301))

    events = EventAccumulator(str(run)).Reload()
    best = max(events.Scalars("val/acc"), key=lambda event: event.value)
    (checkpoint,) = (run / "checkpoints").glob("epoch*.ckpt")
    alone = one_process_figures(checkpoint, data_dir, val_size=301)
    assert 0.2 < alone["test/acc"] < 0.95  # a figure padding would move
    assert best.value == pytest.approx(alone["val/acc"], abs=1e-4)
    assert events.Scalars("test/acc")[-1].value == pytest.approx(alone["test/acc"], abs=1e-4)
    assert f"test accuracy {alone['test/acc']:.4f}" in done.stdout


def test_processes_started_as_copies_of_this_one_train_and_test_in_one_run_folder(synthetic_dir, tmp_path, capsys):
    # ddp_fork, as ddp_spawn (which starts Python again in each process): each process had taken the next free
    # folder for the logger it was handed a copy of; the test's figures went to version_1, and fit.py printed
    # "logs: .../version_2", which did not exist.
    fit.main([f"--data.data_dir={synthetic_dir}", f"--trainer.logger.init_args.save_dir={tmp_path}",
              "--data.val_size=100", "--trainer.max_epochs=1", "--progress_bar.refresh_rate=0", "--model.depth=1",
              "--model.width=8", *TWO_PROCESSES, "--trainer.strategy=ddp_fork"])
    (run,) = (tmp_path / "fit").iterdir()
    assert f"logs: {run}  (tensorboard" in capsys.readouterr().out
    events = EventAccumulator(str(run)).Reload()
    assert events.Scalars("val/acc") and events.Scalars("test/acc")


class SaveWeightsOfEachRank(L.Callback):
    """Saves each process's trained weights, as they are there (ddp_fork hands back rank zero's as float32)."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name

    def on_train_end(self, trainer, module) -> None:
        weights = [p.detach().clone() for p in module.parameters()]
        torch.save(weights, self.folder / f"{self.name}_rank{trainer.global_rank}.pt")


def train_in_float64(synthetic_dir: Path, tmp_path: Path, name: str, *flags: str) -> None:
    """A 700-image fit of a 784-16-16-10 net in float64 for 2 epochs, in this process (ddp_fork for two), each
    rank's final weights saved as tmp_path/<name>_rank<r>.pt."""
    cli = build_cli([
        f"--data.data_dir={synthetic_dir}", f"--trainer.logger.init_args.save_dir={tmp_path / name}",
        "--data.val_size=100", "--data.batch_size=64", "--trainer.max_epochs=2", "--progress_bar.refresh_rate=0",
        "--model.depth=2", "--model.width=16", "--trainer.precision=64-true", *flags,
    ])
    cli.trainer.callbacks.append(SaveWeightsOfEachRank(tmp_path, name))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def test_manual_backward_under_ddp_averages_gradients_as_autograd_ddp_does(synthetic_dir, tmp_path):
    # ddp_fork runs the two processes from this one: the same DDP code path, without a second Python start-up.
    for backward in ("autograd", "manual"):
        train_in_float64(synthetic_dir, tmp_path, backward, "--model.dropout=0.3", f"--model.backward={backward}",
                         *TWO_PROCESSES, "--trainer.strategy=ddp_fork")
    weights = {name: torch.load(tmp_path / f"{name}.pt") for name in
               ("autograd_rank0", "autograd_rank1", "manual_rank0", "manual_rank1")}
    for name, rank0 in weights.items():
        if name.endswith("rank0"):
            rank1 = weights[name.replace("rank0", "rank1")]
            assert all(torch.equal(a, b) for a, b in zip(rank0, rank1)), f"{name}: the processes' copies differ"
    for auto, manual in zip(weights["autograd_rank0"], weights["manual_rank0"]):
        torch.testing.assert_close(manual, auto, rtol=1e-10, atol=1e-10)


def test_worker_processes_are_refused_where_the_data_sits_on_a_gpu(synthetic_dir):
    with pytest.raises(UserError, match="num_workers must be 0 on a GPU, got 2: the data already sits on the GPU"):
        check_workers_fit_device(2, torch.device("cuda"))
    check_workers_fit_device(2, torch.device("cpu")), check_workers_fit_device(0, torch.device("cuda"))
    data = FashionMNISTDataModule(str(synthetic_dir), num_workers=2)
    # No GPU here: the check comes before any data moves, so naming the device is enough.
    data.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda")), world_size=1)
    with pytest.raises(UserError, match="num_workers must be 0 on a GPU"):
        data.setup("fit")


def test_bad_input_found_in_processes_started_as_copies_of_this_one_is_one_line(synthetic_dir, tmp_path):
    # torch hands the error of a process ddp_fork or ddp_spawn started to this one as ProcessRaisedException, which
    # fit.py had printed as a traceback.
    with pytest.raises(UserError, match=r"^--data.batch_size \(1\) must be at least the number of processes \(2\)"):
        fit.main([f"--data.data_dir={synthetic_dir}", f"--trainer.logger.init_args.save_dir={tmp_path}",
                  "--data.val_size=100", "--data.batch_size=1", "--trainer.max_epochs=1",
                  "--progress_bar.refresh_rate=0", *TWO_PROCESSES, "--trainer.strategy=ddp_fork"])


def test_only_a_user_error_of_a_process_becomes_one_line():
    from torch.multiprocessing import ProcessRaisedException

    from mlp.cli import errors_of_processes

    def raised_in_a_process(error_line: str) -> ProcessRaisedException:
        trace = f'Traceback (most recent call last):\n  File "x.py", line 1, in f\n    g()\n{error_line}\n'
        return ProcessRaisedException(f"\n\n-- Process 1 terminated with the following error:\n{trace}", 1, 99)

    with pytest.raises(UserError) as error, errors_of_processes():
        raise raised_in_a_process("mlp.data.CorruptDatasetError: train-images is truncated\nRuntimeError: read it")
    assert str(error.value) == "train-images is truncated\nRuntimeError: read it"  # the message's lines, whole
    # A bug met while handling bad input is a bug: its traceback stays.
    chained = "mlp.errors.UserError: bad input\n\nDuring handling of the above exception, another exception occurred:"
    with pytest.raises(ProcessRaisedException), errors_of_processes():
        raise raised_in_a_process(f"{chained}\n\nTraceback (most recent call last):\n  File \"y.py\"\nKeyError: 'x'")


def test_under_ddp_each_process_writes_its_error_line_in_one_call(monkeypatch):
    # Every process of a DDP run meets the same bad input; sys.exit wrote each line's text and its newline in two
    # calls, and two processes' lines ran into one ("...every batcherror: ...").
    from mlp.errors import run_script

    def bad_input() -> None:
        raise UserError("--data.batch_size (1) must be at least the number of processes (2)")

    writes = []
    monkeypatch.setattr(sys, "stderr", SimpleNamespace(write=writes.append, flush=lambda: None))
    monkeypatch.setenv("LOCAL_RANK", "1")  # as Lightning sets it in each process
    with pytest.raises(SystemExit) as exit:
        run_script(bad_input, interrupted="")
    assert exit.value.code == 1
    assert writes == ["error: --data.batch_size (1) must be at least the number of processes (2)\n"]


def test_use_distributed_sampler_is_refused_because_the_data_module_splits_the_batches(synthetic_dir, tmp_path):
    with pytest.raises(UserError, match="use_distributed_sampler must stay false"):
        build_cli([f"--data.data_dir={synthetic_dir}", f"--trainer.logger.init_args.save_dir={tmp_path}",
                   "--trainer.use_distributed_sampler=true"])


@pytest.mark.parametrize(
    "settings, message",
    [({"batch_size": 1}, r"batch_size \(1\) must be at least the number of processes \(2\)"),
     ({"val_size": 1}, r"val_size \(1\) must be 0 or at least the number of processes \(2\)")],
)
def test_too_few_images_to_give_every_process_some_is_refused(synthetic_dir, settings, message):
    data = FashionMNISTDataModule(str(synthetic_dir), **settings)
    data.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), world_size=2)
    with pytest.raises(UserError, match=message):
        data.setup("fit")


def test_without_dropout_two_processes_train_the_weights_one_process_trains(synthetic_dir, tmp_path):
    # 700 training images in batches of 64: every batch, the last one of 60 too, halves evenly, so the mean of
    # the two halves' mean gradients is the whole batch's mean gradient; float64 leaves only rounding between them.
    for processes in ("1", "2"):
        train_in_float64(synthetic_dir, tmp_path, f"{processes}_processes", "--trainer.accelerator=cpu",
                         f"--trainer.devices={processes}",
                         *(["--trainer.strategy=ddp_fork"] if processes == "2" else []))
    one = torch.load(tmp_path / "1_processes_rank0.pt")
    for rank in (0, 1):
        for alone, split in zip(one, torch.load(tmp_path / f"2_processes_rank{rank}.pt")):
            torch.testing.assert_close(split, alone, rtol=1e-9, atol=1e-9)
