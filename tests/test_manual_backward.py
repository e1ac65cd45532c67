"""Backpropagation by hand (`--model.backward manual`) against autograd: gradients, optimiser steps, accuracy."""

import shutil
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mlp.data import FashionMNISTDataModule
from mlp.module import MLPClassifier, cross_entropy_grad
from mlp.net import MLP
from tests.conftest import real_data_available

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import fit  # noqa: E402


def random_net(depth: int, activation: str, dropout: float = 0.0, batch_norm: bool = False) -> MLP:
    """A float64 net with every parameter random, so no gradient is trivially zero or one."""
    net = MLP(13, depth, 6, 5, "kaiming", activation, dropout, batch_norm).double()
    with torch.no_grad():
        if net.batch_norm:
            net.norm_scale.uniform_(0.5, 1.5)
            net.running_mean.normal_(0, 0.5)
            net.running_var.uniform_(0.5, 2)
        for layer_bias in net.params[1::2]:
            layer_bias.normal_(0, 0.5)
        for slope in net.slopes:
            slope.uniform_(-0.5, 0.5)
    return net


class CreatedTensors(TorchFunctionMode):
    """Records the device of every tensor a torch function returns while the mode is on."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: list[torch.device] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if isinstance(result, torch.Tensor):
            self.devices.append(result.device)
        return result


def test_loss_gradient_creates_its_tensors_on_the_logits_device():
    """A CPU index would cost a host-to-device copy every step on a GPU; 'meta' stands in for the GPU."""
    logits, y = torch.zeros(4, 10, device="meta"), torch.zeros(4, dtype=torch.long, device="meta")
    with CreatedTensors() as created:
        cross_entropy_grad(logits, y)
    assert created.devices and set(created.devices) == {torch.device("meta")}


def assert_manual_gradients_equal_autograd(net: MLP) -> list:
    """One forward (so both backward passes see the same dropout masks and batch statistics), then autograd's
    gradients and `MLP.backward`'s, compared; returns the forward's cache."""
    x, y = torch.randn(11, 13, dtype=torch.float64), torch.randint(0, 5, (11,))
    cache = []
    logits = net(x, cache)
    nn.functional.cross_entropy(logits, y).backward()
    manual = net.backward(cache, cross_entropy_grad(logits.detach(), y))
    params = list(net.parameters())
    assert len(manual) == len(params)
    for grad, p in zip(manual, params):
        assert grad.shape == p.shape
        torch.testing.assert_close(grad, p.grad, rtol=1e-10, atol=1e-10)
    return cache


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "prelu", "sigmoid", "tanh"])
@pytest.mark.parametrize("depth", [0, 1, 2, 4])
def test_manual_gradients_equal_autograd_in_float64(depth, activation):
    torch.manual_seed(depth)
    assert_manual_gradients_equal_autograd(random_net(depth, activation))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["relu", "prelu", "tanh"])
def test_manual_gradients_through_batch_norm_equal_autograd(activation, training):
    torch.manual_seed(0)
    assert_manual_gradients_equal_autograd(random_net(3, activation, dropout=0.2, batch_norm=True).train(training))


def test_manual_gradients_through_dropout_equal_autograd():
    torch.manual_seed(0)
    cache = assert_manual_gradients_equal_autograd(random_net(3, "prelu", dropout=0.4).train())
    assert all(mask is not None and (mask == 0).any() for _, _, mask, _ in cache[:-1])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.5])
def test_label_smoothed_cross_entropy_gradient_equals_autograd(label_smoothing):
    torch.manual_seed(0)
    logits = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (11,))
    nn.functional.cross_entropy(logits, y, label_smoothing=label_smoothing).backward()
    manual = cross_entropy_grad(logits.detach(), y, label_smoothing)
    torch.testing.assert_close(manual, logits.grad, rtol=1e-10, atol=1e-10)
    model = MLPClassifier(label_smoothing=label_smoothing)
    smoothed = model.loss(logits, y)  # the loss training minimises
    reference = nn.functional.cross_entropy(logits, y, label_smoothing=label_smoothing)
    assert smoothed.item() == pytest.approx(reference.item())
    assert model.eval().loss(logits, y).item() == pytest.approx(nn.functional.cross_entropy(logits, y).item())


def train_briefly(data_dir: Path, backward: str, precision: str = "64-true", callbacks: tuple = (),
                  **hparams) -> MLPClassifier:
    L.seed_everything(0, verbose=False)
    model = MLPClassifier(depth=2, width=16, backward=backward, **hparams)
    data = FashionMNISTDataModule(str(data_dir), batch_size=64, val_size=100)
    trainer = L.Trainer(
        callbacks=list(callbacks),
        max_epochs=2,
        precision=precision,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2 * 11  # 700 training images in batches of 64
    return model


@pytest.mark.parametrize(
    "hparams",
    [
        {"activation": "prelu", "dropout": 0.3},  # SGD, Nesterov momentum, weight decay, one-cycle: the defaults
        {"activation": "tanh", "optimizer": "adam", "lr": 0.01, "schedule": "cosine"},
        {"label_smoothing": 0.1},
        {"batch_norm": True, "optimizer": "adam", "lr": 0.01, "schedule": "step"},
    ],
    ids=["sgd-onecycle-prelu-dropout", "adam-cosine-tanh", "label-smoothing", "batch-norm-adam-step"],
)
def test_manual_training_takes_the_same_steps_as_autograd(synthetic_dir, hparams):
    automatic = train_briefly(synthetic_dir, "autograd", **hparams)
    manual = train_briefly(synthetic_dir, "manual", **hparams)
    assert not manual.automatic_optimization
    for (name, auto), by_hand in zip(automatic.state_dict().items(), manual.state_dict().values()):  # and buffers
        torch.testing.assert_close(by_hand, auto, rtol=1e-10, atol=1e-10, msg=name)
    assert manual.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2 * 11  # stepped every batch


def test_manual_training_under_bfloat16_autocast_takes_autograds_steps_to_its_precision(synthetic_dir):
    # A RuntimeError traceback: the hand-computed gradients came out in bfloat16, the parameters' in float32.
    automatic = train_briefly(synthetic_dir, "autograd", "bf16-mixed")
    manual = train_briefly(synthetic_dir, "manual", "bf16-mixed")
    for (name, auto), by_hand in zip(automatic.state_dict().items(), manual.state_dict().values()):
        assert by_hand.dtype == torch.float32
        # They differ by bfloat16's rounding (4e-3 at most, measured), where float32 training differs by 2.6e-2.
        torch.testing.assert_close(by_hand, auto, rtol=0, atol=8e-3, msg=name)


def test_manual_mode_never_calls_autograd_in_training(synthetic_dir, monkeypatch):
    """From the fit's start on: building the model checks the hand-written gradients against autograd's once."""

    def refuse(*args, **kwargs):
        raise AssertionError("autograd was called")

    class RefuseAutograd(L.Callback):
        def setup(self, *_: object, **__: object) -> None:
            monkeypatch.setattr(torch.autograd, "backward", refuse)
            monkeypatch.setattr(torch.autograd, "grad", refuse)

    model = train_briefly(synthetic_dir, "manual", callbacks=(RefuseAutograd(),))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="autograd was called"):
        train_briefly(synthetic_dir, "autograd", callbacks=(RefuseAutograd(),))  # the patch does catch a backward


@pytest.mark.skipif(not real_data_available(), reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist")
def test_manual_and_autograd_reach_the_same_accuracy_on_real_fashion_mnist(tmp_path):
    shutil.rmtree(tmp_path)
    accuracy = {}
    for backward in ("autograd", "manual"):
        args = [
            f"--data.data_dir={tmp_path / 'data'}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            "--progress_bar.refresh_rate=0",
            "--trainer.max_epochs=1",
            "--model.depth=1",
            "--model.width=256",
            f"--model.backward={backward}",
        ]
        accuracy[backward] = fit.main(args)["test/acc"]
    assert accuracy["autograd"] > 0.8 and accuracy["manual"] > 0.8
    assert accuracy["manual"] == pytest.approx(accuracy["autograd"], abs=0.01)
