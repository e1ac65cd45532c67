"""The LightningModule: owns the loss, the metrics and the optimiser; the network itself lives in net.py.

Everything a model computes is written here once: `mlp.fused` trains K of them at once by calling these same methods
under `torch.func.vmap`, so a fork that overrides `loss` or swaps `self.net` changes stacked trials too."""

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.strategies import Strategy
from torch import Tensor
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, MultiStepLR, OneCycleLR
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from mlp.augment import shift_and_flip
from mlp.data import CLASS_NAMES, FashionMNISTDataModule
from mlp.errors import UserError, check
from mlp.net import MLP, Activation, InitScheme
from mlp.plots import activations_image, add_test_figures

NUM_CLASSES = len(CLASS_NAMES)


def cross_entropy_grad(logits: Tensor, y: Tensor, label_smoothing: float | Tensor = 0.0) -> Tensor:
    """d mean-cross-entropy / d logits = (softmax(logits) - target) / batch size, the target onehot(y) mixed with
    label smoothing as F.cross_entropy mixes it."""
    classes = logits.shape[-1]
    target = (1 - label_smoothing) * F.one_hot(y, classes).to(logits.dtype) + label_smoothing / classes
    return (logits.softmax(dim=-1) - target) / len(y)


def make_optimizer(params: Iterable, hp: Mapping[str, Any], fused: bool = True) -> torch.optim.Optimizer:
    """The optimiser the hyperparameters `hp` name, over `params`. `fused` picks torch's one-kernel implementation
    where the device has one, which matters where a stack (`mlp.fused`) steps one optimiser per model; it writes a
    strided view (a model's slice of a padded stack) as if it were contiguous, so a stack that pads turns it off."""
    params = list(params)
    fused = fused and all(p.device.type in ("cpu", "cuda") for p in params)
    common = {"lr": hp["lr"], "weight_decay": hp["weight_decay"], "fused": fused}
    if hp["optimizer"] == "sgd":
        return torch.optim.SGD(params, momentum=hp["momentum"], nesterov=hp["nesterov"], **common)
    return torch.optim.Adam(params, **common)


# Where the "step" schedule multiplies the learning rate by STEP_DECAY, as fractions of the run: the schedule of the
# best published MLP on Fashion-MNIST (Nøkland & Eidnes 2019: Adam, x0.25 at epochs 100, 150, 175 and 188 of 200).
STEP_DECAY_AT, STEP_DECAY = (0.5, 0.75, 0.875, 0.94), 0.25


def make_schedule(optimizer: torch.optim.Optimizer, hp: Mapping[str, Any], steps: int) -> LRScheduler | None:
    """The learning-rate schedule `hp` names over `steps` optimiser steps; None for a constant rate."""
    if hp["schedule"] == "onecycle":
        # Momentum stays what the `momentum` flag says instead of cycling with the learning rate.
        return OneCycleLR(optimizer, max_lr=hp["lr"], total_steps=steps, cycle_momentum=False)
    if hp["schedule"] == "cosine":
        return CosineAnnealingLR(optimizer, T_max=steps)
    if hp["schedule"] == "step":
        return MultiStepLR(optimizer, [round(steps * at) for at in STEP_DECAY_AT], gamma=STEP_DECAY)
    return None


# What fixes a schedule's length, by torch's names: a run resumed with other --trainer.max_epochs, batch size or
# devices would get the saved schedule back, made for its first length, and step past its end.
SCHEDULE_LENGTH = ("total_steps", "T_max", "milestones")


def check_same_length(saved: Mapping[str, Any], fresh: LRScheduler, schedule: str) -> None:
    """A clear error where a resumed run's saved schedule state was made for another number of steps."""
    check(all(saved.get(key) == fresh.state_dict().get(key) for key in SCHEDULE_LENGTH),
          f"--ckpt_path: its run's {schedule} schedule was made for another number of optimiser steps than these "
          "flags give; a schedule cannot be stretched, so resume with the --trainer.max_epochs, batch size and "
          "devices the run began with, or start a new run")


def mean_over_processes(strategy: Strategy, grads: list[Tensor]) -> list[Tensor]:
    """The gradients averaged over the DDP processes in one collective, as DDP reduces a bucket at a time."""
    flat = strategy.reduce(torch.cat([grad.flatten() for grad in grads]), reduce_op="mean")
    return [part.view_as(grad) for part, grad in zip(flat.split([grad.numel() for grad in grads]), grads)]


def start_run(model: "MLPClassifier", logger: Logger | None, datamodule: L.LightningDataModule | None,
              max_epochs: int) -> None:
    """A model's run begins, alone or in a stack (`mlp.fused`), both alike: the sanity check's validation ran on an
    untrained net and must not count as the best so far; its TensorBoard run gets its hyperparameters and figure.
    Shifts bring in the data's background: a black pixel as the data module standardised it."""
    model.val_acc_best.reset()
    if datamodule is not None and hasattr(datamodule, "background"):
        model.background.fill_(datamodule.background)
    if isinstance(logger, TensorBoardLogger):
        # max_epochs too, which tune.py searches; hp_metric (the best val/acc) declared as Lightning's docs advise.
        data_hparams = datamodule.hparams if datamodule else {}
        logger.log_hyperparams({**model.hparams, **data_hparams, "max_epochs": max_epochs}, {"hp_metric": 0.0})
        logger.experiment.add_image("activations", activations_image(model.hparams["activation"]))


def check_hyperparameters(hp: Mapping[str, Any]) -> None:
    """A clear error for a hyperparameter out of its range, before anything is built."""
    check(hp["depth"] >= 0, f"depth (hidden layers) must be >= 0, got {hp['depth']}")
    check(hp["width"] >= 1, f"width (hidden units) must be >= 1, got {hp['width']}")
    check(math.isfinite(hp["lr"]) and hp["lr"] > 0, f"lr must be a positive finite number, got {hp['lr']}")
    check(0 <= hp["momentum"] < 1, f"momentum must be in [0, 1), got {hp['momentum']}")
    check(0 <= hp["weight_decay"] < math.inf, f"weight_decay must be a finite number >= 0, got {hp['weight_decay']}")
    check(not (hp["nesterov"] and hp["optimizer"] == "sgd" and hp["momentum"] == 0), "nesterov needs momentum > 0")
    check(0 <= hp["dropout"] < 1, f"dropout must be in [0, 1), got {hp['dropout']}")
    check(0 <= hp["label_smoothing"] < 1, f"label_smoothing must be in [0, 1), got {hp['label_smoothing']}")
    check(0 <= hp["augment_shift"] < 14, f"augment_shift must be 0-13 pixels, got {hp['augment_shift']}")
    check(0 <= hp["augment_flip"] <= 1, f"augment_flip (a probability) must be in [0, 1], got {hp['augment_flip']}")


class ProbeTrainer:
    """The Trainer as a probe of a model's step sees it (`check_manual_backward`, `mlp.fused`'s probes): a run at its
    start, noting whether the step read the run's progress and which other attributes it asked for, which a probe
    has none of; the step's own `self.log` is dropped (barebones)."""

    barebones = True

    def __init__(self) -> None:
        self.read_progress, self.other_reads = False, []

    def progress(self, value: int) -> int:
        self.read_progress = True
        return value

    current_epoch = property(lambda self: self.progress(0))
    global_step = property(lambda self: self.progress(0))
    max_epochs = property(lambda self: self.progress(1))
    estimated_stepping_batches = property(lambda self: self.progress(1))

    def __getattr__(self, name: str) -> Any:
        self.other_reads.append(name)
        raise AttributeError(f"a probe of the model's step has no Trainer.{name}")


@contextlib.contextmanager
def probing(model: "MLPClassifier") -> Iterator[ProbeTrainer]:
    """A block in which `model` (a copy made to probe) runs its step as at a run's start, the caller's RNG kept."""
    model.trainer = trainer = ProbeTrainer()  # type: ignore[assignment]
    devices = [model.device.index] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are trying to `self.log()`")
        yield trainer


def check_manual_backward(model: "MLPClassifier") -> None:
    """Refuse --model.backward manual where the gradients written by hand are not those of the model's own loss: a
    fork that changed `loss` (or the net) without its backward would train on the template's cross-entropy while
    logging its own loss. Compared with autograd's once, in float64, on a few random images; not in inference mode,
    where a model is built that cannot be trained."""
    if model.automatic_optimization or torch.is_inference_mode_enabled():
        return
    probe, y = copy.deepcopy(model).double().train(), torch.arange(4) % NUM_CLASSES
    with probing(probe) as trainer, torch.enable_grad():
        x = torch.rand(4, probe.hparams.input_size, dtype=torch.float64)
        torch.manual_seed(0)  # the same dropout masks and augmentation in both
        try:
            by_hand = probe.manual_gradients(x, y)[2]
        except (TypeError, AttributeError) as error:
            if trainer.other_reads:
                raise UserError(f"--model.backward manual: the loss reads self.trainer.{trainer.other_reads[0]}, which "
                                "the check of the gradients written by hand cannot give") from None
            raise UserError(f"--model.backward manual needs the net's forward(x, cache) and backward(cache, "
                            f"grad_logits), which {type(probe.net).__name__} lacks ({error}): use autograd") from None
        torch.manual_seed(0)
        by_autograd = torch.autograd.grad(probe.model_step((x, y))[0], list(probe.net.parameters()))
    # Compared once, at a run's start: a loss that changes with the run's progress would pass here and differ later.
    check(not trainer.read_progress, "--model.backward manual: the loss reads the run's progress, which the one check "
          "of the gradients written by hand, at a run's start, cannot follow: use autograd")
    check(len(by_hand) == len(by_autograd) and all(
        torch.allclose(hand, auto, rtol=1e-6, atol=1e-12) for hand, auto in zip(by_hand, by_autograd)),
        "--model.backward manual: the gradients written by hand (MLPClassifier.manual_gradients, the net's backward) "
        "are not those of MLPClassifier.loss and the net's forward, one of which changed without them: write its "
        "gradient there too, or use autograd")


class MLPClassifier(L.LightningModule):
    """Classifies flattened 28x28 images into 10 classes with a from-scratch MLP.

    Args:
        depth, width: hidden layers (0 is softmax regression), and units in each.
        init: weight init scheme, see `mlp.net.init_weight`.
        optimizer, weight_decay: "sgd" or "adam", and its L2 penalty coefficient.
        lr: learning rate; with the one-cycle schedule, the peak learning rate.
        momentum, nesterov: SGD's momentum, and whether it is Nesterov's (Adam ignores both).
        schedule: "onecycle" (warm up, then anneal to ~0), "cosine" (anneal from lr), "step" (x0.25 at 50, 75, 87.5
            and 94 % of the run, as the best published MLP) or "constant".
        activation: "relu", "leaky_relu", "prelu" (learned slope per layer), "sigmoid" or "tanh", all in `mlp.net`.
        dropout: probability of zeroing each hidden unit in training (0 turns dropout off).
        backward: "autograd", or "manual": gradients by hand (`MLP.backward`), no autograd in training.
        label_smoothing: share of the training target spread evenly over all classes (0 turns it off).
        augment_shift, augment_flip: in training, each image moved by up to this many whole pixels on each axis,
            and mirrored left-right with this probability (`mlp.augment`; 0 turns either off).
        batch_norm: standardise each hidden layer's pre-activations over the batch (`mlp.net.batch_norm`).
        input_size: numbers in one example; fit.py and tune.py take it from the data module's `input_size`.
    """

    # What stacked models (`mlp.fused`) may differ in: each keeps these in its optimiser, schedule or own tensors.
    PER_MODEL = ("lr", "weight_decay", "momentum", "nesterov", "optimizer", "schedule", "init", "dropout",
                 "label_smoothing", "augment_shift", "augment_flip")

    def __init__(
        self,
        depth: int = 2,
        width: int = 512,
        init: InitScheme = "kaiming",
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        schedule: Literal["onecycle", "cosine", "step", "constant"] = "onecycle",
        activation: Activation = "relu",
        dropout: float = 0.0,
        backward: Literal["autograd", "manual"] = "autograd",
        label_smoothing: float = 0.0,
        augment_shift: int = 0,
        augment_flip: float = 0.0,
        batch_norm: bool = False,
        input_size: int = FashionMNISTDataModule.input_size,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_hyperparameters(self.hparams)
        self.net = MLP(input_size, depth, width, NUM_CLASSES, init, activation, dropout, batch_norm)
        # Tensors, not floats, so that vmap gives each stacked model its own; `start_run` sets the background.
        settings = {"label_smoothing": label_smoothing, "shift": augment_shift, "flip_chance": augment_flip}
        for name, value in {**settings, "background": 0.0}.items():
            self.register_buffer(name, torch.tensor(float(value)), persistent=False)
        self.augments = augment_shift > 0 or augment_flip > 0
        self.automatic_optimization = backward == "autograd"
        # Training metrics are updated once an epoch from the collected step outputs (an update costs more than a
        # step), keeping NaN so a diverging loss shows; argmaxes need no input checks, which a stack pays K times.
        self.train_acc = MulticlassAccuracy(NUM_CLASSES, average="micro", validate_args=False)
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.train_step_outputs: list[tuple[Tensor, Tensor, Tensor]] = []
        self.val_acc = MulticlassAccuracy(NUM_CLASSES, average="micro", validate_args=False)
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.test_acc = MulticlassAccuracy(NUM_CLASSES, average="micro")
        self.val_acc_best = MaxMetric()
        self.test_confusion = MulticlassConfusionMatrix(NUM_CLASSES)
        self.epoch_start = time.perf_counter()  # a run resumed mid-epoch starts without on_train_epoch_start
        self.resumed_schedules: list[dict[str, Any]] = []  # a resumed run's saved ones (on_load_checkpoint)
        check_manual_backward(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def model_step(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """The batch's mean loss and predictions."""
        logits = self(self.inputs(batch[0]))
        return self.loss(logits, batch[1]), logits.argmax(dim=-1)

    def inputs(self, x: Tensor) -> Tensor:
        """What the net sees of the images `x`: in training, shifted and flipped as augment_shift and augment_flip
        say. Augmentation belongs to the model, not the data, so that stacked models each augment by their own."""
        augments = self.training and self.augments
        return shift_and_flip(x, self.shift, self.flip_chance, self.background) if augments else x

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy, in training with label smoothing; override it to change what every run trains on. val/loss
        and test/loss stay plain, so they compare across runs with and without smoothing. Written out because
        F.cross_entropy's label_smoothing takes a float, and a stack's models each carry their own tensor."""
        log_probs = logits.log_softmax(dim=-1)
        plain = F.nll_loss(log_probs, y)
        if not self.training:
            return plain
        return (1 - self.label_smoothing) * plain - self.label_smoothing * log_probs.mean()

    def on_train_start(self) -> None:
        start_run(self, self.logger, self.trainer.datamodule, self.trainer.max_epochs)

    def on_train_epoch_start(self) -> None:
        self.epoch_start = time.perf_counter()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, preds = self.model_step(batch) if self.automatic_optimization else self.manual_training_step(batch)
        self.train_step_outputs.append((loss.detach(), preds, batch[1]))
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:  # the steps Lightning writes out
            self.log("train/loss_step", loss, prog_bar=True)
        return loss

    def train_epoch_scalars(self) -> dict[str, Tensor]:
        """The epoch's training loss, accuracy and examples per second, from the collected step outputs."""
        losses, preds, targets = zip(*self.train_step_outputs)
        self.train_step_outputs.clear()
        batch_sizes = torch.tensor([len(y) for y in targets], device=self.device)
        # One loss per example rather than `weight=batch_sizes`: with nan_strategy="disable", torchmetrics 1.9
        # drops the weights (Lightning-AI/torchmetrics#3434), and the short last batch would count as a full one.
        self.train_loss.update(torch.stack(losses).repeat_interleave(batch_sizes))
        self.train_acc.update(torch.cat(preds), torch.cat(targets))
        scalars = {"train/loss_epoch": self.train_loss.compute(), "train/acc": self.train_acc.compute()}
        for metric in (self.train_loss, self.train_acc):
            metric.reset()
        # Lightning's ThroughputMonitor synchronises the GPU on every step; one reading per epoch is enough.
        scalars["train/examples_per_sec"] = batch_sizes.sum() / (time.perf_counter() - self.epoch_start)
        return scalars

    def on_train_epoch_end(self) -> None:
        if not self.train_step_outputs:  # resumed from a checkpoint taken after the epoch's last step
            return
        scalars = self.train_epoch_scalars()
        # Under DDP the rate is summed over the processes; loss and accuracy are already synced by torchmetrics.
        self.log("train/examples_per_sec", scalars.pop("train/examples_per_sec"), sync_dist=True, reduce_fx="sum")
        self.log_dict(scalars, sync_dist=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.update_val_metrics(*self.model_step(batch), batch[1])

    def update_val_metrics(self, loss: Tensor, preds: Tensor, y: Tensor) -> None:
        self.val_acc.update(preds, y)
        self.val_loss.update(loss.expand(len(y)))  # one loss per example: see train_epoch_scalars

    def val_epoch_scalars(self) -> dict[str, Tensor]:
        """The validation's loss, accuracy and best accuracy so far (`hp_metric`, by which TensorBoard's HParams tab
        compares runs); under DDP the same on every process, as torchmetrics syncs in compute."""
        acc, loss = self.val_acc.compute(), self.val_loss.compute()
        for metric in (self.val_acc, self.val_loss):
            metric.reset()
        self.val_acc_best.update(acc)
        return {"val/loss": loss, "val/acc": acc, "hp_metric": self.val_acc_best.compute()}

    def on_validation_epoch_end(self) -> None:
        scalars = self.val_epoch_scalars()
        self.log("val/acc", scalars.pop("val/acc"), prog_bar=True, sync_dist=True)
        self.log_dict(scalars, sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        (loss, preds), (x, y) = self.model_step(batch), batch
        self.test_acc.update(preds, y)
        self.test_confusion.update(preds, y)
        self.log("test/loss", loss, on_epoch=True, sync_dist=True)
        self.log("test/acc", self.test_acc, on_epoch=True)
        if batch_idx == 0:
            self.test_examples = (x[:32], preds[:32], y[:32])

    def on_test_epoch_end(self) -> None:
        if isinstance(self.logger, TensorBoardLogger):
            add_test_figures(self.logger.experiment, self.test_confusion, self.test_examples)
        self.test_confusion.reset()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.resumed_schedules = checkpoint.get("lr_schedulers", [])  # Lightning restores them after configuring

    def configure_optimizers(self) -> dict[str, Any]:
        return self.optimizer_and_schedule(self.trainer.estimated_stepping_batches)

    def optimizer_and_schedule(self, steps: int, fused: bool = True) -> dict[str, Any]:
        """This model's optimiser (`make_optimizer`) and schedule over `steps` steps, in configure_optimizers' form."""
        optimizer = make_optimizer(self.parameters(), self.hparams, fused)
        if (scheduler := make_schedule(optimizer, self.hparams, steps)) is None:
            return {"optimizer": optimizer}
        if self.resumed_schedules:
            check_same_length(self.resumed_schedules[0], scheduler, self.hparams.schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def manual_gradients(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """The batch's loss, predictions and the gradients of `self.net.parameters()`, by `MLP.backward`."""
        cache = []
        logits = self.net(self.inputs(x), cache)
        grad_logits = cross_entropy_grad(logits, y, self.label_smoothing)
        return self.loss(logits, y), logits.argmax(dim=-1), self.net.backward(cache, grad_logits)

    @torch.no_grad()  # proves that autograd plays no part
    def manual_training_step(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Forward, backward by hand, and one optimiser and scheduler step. The optimiser sees the same p.grad as
        after autograd's backward, under DDP averaged over the processes as DDP does (only inside autograd)."""
        loss, preds, grads = self.manual_gradients(*batch)
        if self.trainer.world_size > 1:
            grads = mean_over_processes(self.trainer.strategy, grads)
        for p, grad in zip(self.net.parameters(), grads):
            p.grad = grad
        self.optimizers().step()
        if scheduler := self.lr_schedulers():
            scheduler.step()
        return loss, preds
