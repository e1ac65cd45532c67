"""Fused trials: the stacked network and FusedClassifier against separate single models, which stay the reference."""

import copy

import lightning as L
import pytest
import torch
from torch.func import functional_call, vmap
from torch.utils.data import DataLoader, TensorDataset

from mlp.fused import FusedClassifier, ModelInStackCheckpoint, Stack, stack_key
from mlp.module import MLPClassifier
from mlp.net import dropout_mask




def random_classifiers(depth: int, activation: str, widths: list[int], dropout: float = 0.0,
                       batch_norm: bool = False) -> list[MLPClassifier]:
    """float64 models with every parameter random, so no gradient is trivially zero or one."""
    models = []
    for width in widths:
        model = MLPClassifier(depth, width, activation=activation, dropout=dropout, input_size=13,
                              batch_norm=batch_norm).double()
        with torch.no_grad():
            if model.net.batch_norm:
                model.net.norm_scale.uniform_(0.5, 1.5)
            for bias in model.net.params[1::2]:
                bias.normal_(0, 0.5)
            for slope in model.net.slopes:
                slope.uniform_(-0.5, 0.5)
        models.append(model)
    return models


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "prelu", "sigmoid", "tanh"])
@pytest.mark.parametrize("depth", [0, 1, 3])
def test_a_stacks_losses_and_gradients_are_each_models_own_padded_or_not(depth, activation, batch_norm):
    torch.manual_seed(depth)
    models = random_classifiers(depth, activation, widths=[4, 7, 2], batch_norm=batch_norm)
    alone = copy.deepcopy(models)
    stack = Stack(models)
    x, y = torch.randn(11, 13, dtype=torch.float64), torch.randint(0, 10, (11,))
    losses, preds = stack(x, y, manual=False)
    losses.sum().backward()
    stack.hand_out_grads()
    with torch.no_grad():
        manual_losses, _, manual_grads = stack(x, y, manual=True)
    for k, (model, reference) in enumerate(zip(models, alone)):
        loss, reference_preds = reference.model_step((x, y))
        loss.backward()
        torch.testing.assert_close(losses[k], loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(manual_losses[k], loss, rtol=1e-12, atol=1e-12)
        assert torch.equal(preds[k], reference_preds)
        for p, grad, q in zip(model.net.parameters(), manual_grads, reference.net.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)  # its slice of the stacked gradient
            torch.testing.assert_close(grad[k][tuple(slice(0, n) for n in q.shape)], q.grad, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(p, q, rtol=0, atol=0)  # a view of the stack, with the model's own values
        if model.net.batch_norm:  # the stack stepped twice, the reference once more: each kept its own statistics
            with torch.no_grad():
                reference.model_step((x, y))
            for name in ("running_mean", "running_var"):
                torch.testing.assert_close(getattr(model.net, name), getattr(reference.net, name), rtol=1e-12, atol=0)
    for p in stack.params.values():  # each model's parameters are views of the stack, padded with zeros
        real = sum(q.numel() for q in stack.model_params[next(n for n, v in stack.params.items() if v is p)])
        assert (p != 0).sum() <= real


def test_dropout_masks_are_drawn_per_model_at_each_models_own_rate():
    torch.manual_seed(0)
    models = random_classifiers(2, "relu", widths=[30, 30], dropout=0.5)
    models[1] = MLPClassifier(2, 30, dropout=0.2, input_size=13).double()
    stack = Stack(models)
    rates = stack.buffers["model.net.dropout_rate"]
    assert rates.tolist() == pytest.approx([0.5, 0.2])  # each model's own, which vmap hands to its forward
    masks = vmap(dropout_mask, in_dims=(None, 0), randomness="different")(torch.ones(64, 300), rates)
    assert not torch.equal(masks[0] == 0, masks[1] == 0)  # each model draws its own
    assert 0.45 < (masks[0] == 0).double().mean() < 0.55 and 0.15 < (masks[1] == 0).double().mean() < 0.25
    assert torch.equal(masks[1][masks[1] != 0], torch.full_like(masks[1][masks[1] != 0], 1 / 0.8))


def test_a_model_without_dropout_shares_a_stack_with_one_that_drops_and_trains_as_alone():
    torch.manual_seed(1)
    (plain,), (drops,) = random_classifiers(2, "relu", widths=[30]), random_classifiers(2, "relu", [30], dropout=0.5)
    assert stack_key(plain, False) == stack_key(drops, False)  # one stack, not two stack calls a step
    alone = copy.deepcopy(plain)
    stack = Stack([plain, drops])  # the model that drops comes second: the stack still draws masks
    x, y = torch.randn(64, 13, dtype=torch.float64), torch.randint(0, 10, (64,))
    losses, _ = stack(x, y, manual=False)
    losses.sum().backward()
    stack.hand_out_grads()
    loss, _ = alone.train().model_step((x, y))
    loss.backward()
    torch.testing.assert_close(losses[0], loss, rtol=1e-12, atol=1e-12)  # masks of ones: the plain model's step
    with torch.no_grad():
        _, _, manual_grads = stack(x, y, manual=True)  # the hand-written backward, through the same masks
    for p, manual, q in zip(plain.net.parameters(), manual_grads, alone.net.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(manual[0], q.grad, rtol=1e-10, atol=1e-12)
    no_dropout = copy.deepcopy(drops)
    no_dropout.net.dropout = 0.0
    assert (losses[1] - no_dropout.train().model_step((x, y))[0]).abs() > 1e-3  # the other one did drop units


def shifted(image: torch.Tensor, dy: int, dx: int, background: float) -> torch.Tensor:
    """A 28x28 image moved by (dy, dx), the pixels moved in set to `background`: the reference for mlp.augment."""
    moved = torch.full((68, 68), background, dtype=image.dtype)
    moved[20 + dy : 48 + dy, 20 + dx : 48 + dx] = image
    return moved[20:48, 20:48]


def test_stacked_models_each_augment_their_batch_by_their_own_settings():
    always_mirrors = MLPClassifier(1, 8, augment_flip=1.0).train()
    shifts = MLPClassifier(1, 8, augment_shift=2).train()
    assert stack_key(always_mirrors, False) == stack_key(shifts, False)  # they differ only in per-model tensors
    assert stack_key(shifts, False) != stack_key(MLPClassifier(1, 8), False)  # one that draws nothing stacks apart
    for model in (always_mirrors, shifts):
        model.background.fill_(-1.0)
    stack = Stack([always_mirrors, shifts])

    class Inputs(torch.nn.Module):  # named as the stack's tensors are (mlp.fused.ModelStep)
        def __init__(self, model: MLPClassifier) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model.inputs(x)  # what each model's step feeds its net

    torch.manual_seed(0)
    x = torch.rand(64, 784)
    each = Inputs(always_mirrors)
    seen = vmap(lambda state: functional_call(each, state, (x,)), randomness="different")(
        {**stack.params, **stack.buffers})
    images = x.view(64, 28, 28)
    assert torch.equal(seen[0], images.flip(-1).reshape(64, 784))  # mirrored every time, never moved
    offsets = set()
    for image, got in zip(images, seen[1].view(64, 28, 28)):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(got, shifted(image, dy, dx, -1.0))]
        assert len(matches) == 1  # moved by at most 2 pixels each way, never mirrored
        offsets.add(matches[0])
    assert len(offsets) > 10  # each image by its own offset


# FusedClassifier against separate MLPClassifier runs on the same batches in the same order.

HPARAMS = [  # lr, weight decay, width, label smoothing and epochs all differ
    {"lr": 0.05, "weight_decay": 1e-3, "width": 12, "label_smoothing": 0.1, "epochs": 3},
    {"lr": 0.2, "weight_decay": 0.0, "width": 20, "label_smoothing": 0.0, "epochs": 2},
    {"lr": 0.01, "weight_decay": 5e-4, "width": 7, "label_smoothing": 0.2, "epochs": 4},
]


def loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(150, 784, generator=g), torch.randint(0, 10, (150,), generator=g)
    train = DataLoader(TensorDataset(x[:100], y[:100]), batch_size=32)  # not shuffled: the same batches for all
    return train, DataLoader(TensorDataset(x[100:], y[100:]), batch_size=64)


def trainer(epochs: int, callbacks: list | None = None) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs, precision="64-true", accelerator="cpu", logger=False, callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, ModelInStackCheckpoint) for c in callbacks or []),
        enable_progress_bar=False, enable_model_summary=False,
    )


def classifiers(hparams: list[dict], **shared) -> list[MLPClassifier]:
    models = []
    for seed, hp in enumerate(hparams):
        torch.manual_seed(seed)
        models.append(MLPClassifier(**{"depth": 2, **{k: v for k, v in hp.items() if k != "epochs"}}, **shared))
    return models


class FinalStates(L.Callback):
    """Each live model's parameters at the end of every epoch; the module drops models after this hook."""

    def __init__(self) -> None:
        self.states: dict[str, dict[int, dict[str, torch.Tensor]]] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, module: FusedClassifier) -> None:
        for k, name in enumerate(module.names):  # by the model's own epoch
            state = {key: value.clone() for key, value in module.model(name).net.state_dict().items()}
            self.states.setdefault(name, {})[module.progress(k)[0]] = state


def train_fused(
    models: list[MLPClassifier], hparams: list[dict], names: list[str], callbacks=(), pad_widths: bool = True
) -> FinalStates:
    epochs = [hp["epochs"] for hp in hparams]
    fused = FusedClassifier([copy.deepcopy(m) for m in models], epochs, names, pad_widths=pad_widths)
    states = FinalStates()
    train, val = loaders()
    trainer(max(hp["epochs"] for hp in hparams), [states, *callbacks]).fit(fused, train, val)
    assert fused.names == [] and set(fused.outcomes) == set(names)
    return states


@pytest.mark.parametrize("backward", ["autograd", "manual"])
@pytest.mark.parametrize(  # with batch_norm, each model normalises over its own batch and keeps its own statistics
    "optimizer,schedule,batch_norm",
    [("sgd", "onecycle", False), ("adam", "cosine", False), ("adam", "step", False), ("sgd", "constant", False),
     ("sgd", "onecycle", True), ("adam", "step", True)],
)
def test_fused_models_train_exactly_as_separate_runs(backward, optimizer, schedule, batch_norm):
    models = classifiers(HPARAMS, optimizer=optimizer, schedule=schedule, backward=backward, activation="prelu",
                         batch_norm=batch_norm)
    states = train_fused(models, HPARAMS, ["a", "b", "c"])
    for model, hp, name in zip(models, HPARAMS, ["a", "b", "c"]):
        initial = copy.deepcopy(model.net.state_dict())
        train, val = loaders()
        trainer(hp["epochs"]).fit(model, train, val)
        final = states.states[name][hp["epochs"] - 1]
        assert (final["params.0"] - initial["params.0"].double()).abs().max() > 1e-4  # it did learn
        assert max(states.states[name]) == hp["epochs"] - 1  # it left the stack after its own last epoch
        assert ("running_mean" in final) == batch_norm
        for key, value in model.net.state_dict().items():
            torch.testing.assert_close(final[key], value, rtol=1e-6, atol=1e-6)


# Depths 3, 1, 0 and 1: stacks stepped together, and model order is not depth order.
MIXED_DEPTHS = [{**HPARAMS[0], "depth": 3}, {**HPARAMS[1], "depth": 1}, {**HPARAMS[2], "depth": 0},
                {**HPARAMS[1], "depth": 1, "width": 9, "lr": 0.1, "epochs": 3}]


def stack_shapes(module: FusedClassifier) -> list[tuple[int, int]]:
    """(depth, width padded to) of each stack, in stack order."""
    return [(stack.models[0].hparams.depth, stack.params["model.net.params.0"].shape[2] if stack.models[0].hparams.depth
             else 0) for stack in module.stacks]


@pytest.mark.parametrize("backward", ["autograd", "manual"])
@pytest.mark.parametrize(
    "pad_widths,shapes,order",
    [(True, [(3, 12), (1, 20), (0, 0)], "abdc"),  # a stack per depth, b and d padded to 20
     (False, [(3, 12), (1, 20), (0, 0), (1, 9)], "abcd")],  # a stack per depth and width: no padding
)
def test_models_of_different_depths_train_in_one_module_exactly_as_separate_runs(backward, pad_widths, shapes, order):
    names = ["a", "b", "c", "d"]
    models = classifiers(MIXED_DEPTHS, backward=backward, activation="prelu")
    fused = FusedClassifier(models, [hp["epochs"] for hp in MIXED_DEPTHS], names, pad_widths=pad_widths)
    assert stack_shapes(fused) == shapes and fused.names == list(order)
    states = train_fused(models, MIXED_DEPTHS, names, pad_widths=pad_widths)
    for model, hp, name in zip(models, MIXED_DEPTHS, names):
        train, val = loaders()
        trainer(hp["epochs"]).fit(model, train, val)
        assert max(states.states[name]) == hp["epochs"] - 1
        for key, value in model.net.state_dict().items():
            torch.testing.assert_close(states.states[name][hp["epochs"] - 1][key], value, rtol=1e-6, atol=1e-6)


class StopAfterFirstEpoch(L.Callback):
    def __init__(self, name: str) -> None:
        self.name = name

    def on_validation_end(self, trainer: L.Trainer, module: FusedClassifier) -> None:
        if not trainer.sanity_checking:
            module.stop(self.name, "pruned")


class RunningKeys(L.Callback):
    """The models' val/acc keys in the Trainer's callback metrics at the start of every epoch."""

    def __init__(self) -> None:
        self.keys: list[tuple[set[str], set[str]]] = []  # (keys, the names of the models in the stack)

    def on_train_epoch_start(self, trainer: L.Trainer, module: FusedClassifier) -> None:
        keys = {key for key in trainer.callback_metrics if key.startswith("val/acc/")}
        self.keys.append((keys, {f"val/acc/{name}" for name in module.names}))


def test_a_departed_models_val_acc_leaves_the_trainers_callback_metrics():
    keys = RunningKeys()
    train_fused(classifiers(HPARAMS), HPARAMS, ["a", "b", "c"], [keys])
    # Epochs 1-3: after the sanity check's keys, only those of the models still training (b leaves after epoch 1).
    assert [seen for seen, _ in keys.keys[1:]] == [running for _, running in keys.keys[1:]]
    assert keys.keys[2][0] == {"val/acc/a", "val/acc/c"}


@pytest.mark.parametrize("backward", ["autograd", "manual"])
def test_dropping_a_model_mid_run_leaves_the_others_unchanged(backward):
    models = classifiers(HPARAMS, backward=backward)
    names = ["a", "b", "c"]
    alone = train_fused(models, HPARAMS, names)
    dropped = train_fused(models, HPARAMS, names, [StopAfterFirstEpoch("b")])
    assert max(dropped.states["b"]) == 0
    for name, hp in zip(["a", "c"], [HPARAMS[0], HPARAMS[2]]):
        for key, value in alone.states[name][hp["epochs"] - 1].items():
            torch.testing.assert_close(dropped.states[name][hp["epochs"] - 1][key], value, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backward", ["autograd", "manual"])
def test_a_depth_whose_last_model_leaves_takes_its_stack_along_and_the_others_are_unchanged(backward):
    models = classifiers(MIXED_DEPTHS, backward=backward)
    names = ["a", "b", "c", "d"]
    alone = train_fused(models, MIXED_DEPTHS, names)
    dropped = train_fused(models, MIXED_DEPTHS, names, [StopAfterFirstEpoch("a")])  # the only depth-3 model
    assert max(dropped.states["a"]) == 0
    for name, hp in zip(names[1:], MIXED_DEPTHS[1:]):
        for key, value in alone.states[name][hp["epochs"] - 1].items():
            torch.testing.assert_close(dropped.states[name][hp["epochs"] - 1][key], value, rtol=1e-12, atol=1e-12)


class AddAtEpochEnd:
    """A refill that adds models at the end of given epochs: {epoch: [(name, classifier, epochs)]}."""

    def __init__(self, additions: dict[int, list[tuple[str, MLPClassifier, int]]]) -> None:
        self.additions = additions
        self.shapes: list[list[tuple[int, int]]] = []  # after each epoch's changes: see stack_shapes

    def __call__(self, module: FusedClassifier) -> None:
        for name, model, epochs in self.additions.get(module.current_epoch, []):
            module.add(copy.deepcopy(model), epochs, name)
        self.shapes.append(stack_shapes(module))


# With padding: a (width 12) and b (20) start. After epoch 0, c (30) widens their stack and d starts a depth-1
# stack; after epoch 1, b and c leave and a's padding shrinks back to 12; after epoch 2, a leaves, taking its
# stack along, and e starts a new depth-2 one. Without padding each width is a stack of its own: c starts one,
# b's and c's leave with them.
ADDED_SHAPES = {
    True: [[(2, 30), (1, 9)], [(2, 12), (1, 9)], [(1, 9), (2, 7)], []],
    False: [[(2, 12), (2, 20), (2, 30), (1, 9)], [(2, 12), (1, 9)], [(1, 9), (2, 7)], []],
}


@pytest.mark.parametrize("pad_widths", [True, False])
@pytest.mark.parametrize("backward", ["autograd", "manual"])
@pytest.mark.parametrize("optimizer,schedule", [("sgd", "onecycle"), ("adam", "cosine")])
def test_models_added_mid_run_train_as_they_would_alone_and_the_others_are_unchanged(
    backward, optimizer, schedule, pad_widths
):
    # d runs past the first models' epochs (4 in all).
    hparams = {
        "a": HPARAMS[0],
        "b": HPARAMS[1],
        "c": {"lr": 0.1, "weight_decay": 2e-4, "width": 30, "label_smoothing": 0.0, "epochs": 1},
        "d": {**HPARAMS[2], "depth": 1, "width": 9, "epochs": 3},
        "e": {**HPARAMS[1], "width": 7, "epochs": 1},
    }
    models = dict(zip(hparams, classifiers(list(hparams.values()), optimizer=optimizer, schedule=schedule,
                                           backward=backward, activation="prelu")))
    added = {0: [("c", models["c"], 1), ("d", models["d"], 3)], 2: [("e", models["e"], 1)]}
    refill = AddAtEpochEnd(added)
    first = [copy.deepcopy(models[name]) for name in "ab"]
    fused = FusedClassifier(first, [3, 2], ["a", "b"], refill=refill, pad_widths=pad_widths)
    states = FinalStates()
    train, val = loaders()
    run = trainer(3, [states])
    run.fit(fused, train, val)
    assert run.current_epoch == 4 and fused.names == [] and set(fused.outcomes) == set(hparams)
    assert refill.shapes == ADDED_SHAPES[pad_widths]
    first_epochs = {"a": 0, "b": 0, "c": 1, "d": 1, "e": 3}
    for name, hp in hparams.items():
        assert sorted(states.states[name]) == list(range(hp["epochs"]))  # its own epochs, counted from 0
        alone = trainer(hp["epochs"])
        alone.fit(models[name], train, val)  # the same batches: the loader is not shuffled
        final = states.states[name][hp["epochs"] - 1]
        for key, value in models[name].net.state_dict().items():
            torch.testing.assert_close(final[key], value, rtol=1e-6, atol=1e-6)
        assert first_epochs[name] + hp["epochs"] <= run.current_epoch


def test_a_diverging_model_leaves_the_stack_and_the_others_go_on():
    hparams = [HPARAMS[0], {**HPARAMS[1], "lr": 1e300}, HPARAMS[2]]
    models = classifiers(hparams)
    fused = FusedClassifier([copy.deepcopy(m) for m in models], [hp["epochs"] for hp in hparams], ["a", "b", "c"])
    states = FinalStates()
    train, val = loaders()
    trainer(4, [states]).fit(fused, train, val)
    assert fused.outcomes["b"][0] == "diverged" and fused.outcomes["b"][1].startswith("epoch 0: val/loss = nan")
    assert fused.outcomes["a"] == fused.outcomes["c"] == ("finished", "")
    reference = train_fused([models[0], models[2]], [HPARAMS[0], HPARAMS[2]], ["a", "c"])
    for name, epochs in (("a", 3), ("c", 4)):
        for key, value in reference.states[name][epochs - 1].items():
            torch.testing.assert_close(states.states[name][epochs - 1][key], value, rtol=1e-12, atol=1e-12)


class StopAfterValidation(L.Callback):
    """Stops model `name` with reason `how` after its first validation, as JudgeEachEpoch does."""

    def __init__(self, name: str, how: str) -> None:
        self.name, self.how = name, how

    def on_validation_end(self, trainer: L.Trainer, module: FusedClassifier) -> None:
        if not trainer.sanity_checking and self.name in module.names:
            module.stop(self.name, self.how)


@pytest.mark.parametrize("how,outcome", [("surplus", "surplus"), ("pruned", "diverged")])
def test_surplus_overrides_a_divergence_in_the_same_epoch_and_other_reasons_do_not(how, outcome):
    # A trial whose place in the study is another's must not count, even if it diverged (mlp.study.surplus_trials).
    hparams = [HPARAMS[0], {**HPARAMS[1], "lr": 1e300}]
    models = classifiers(hparams)
    fused = FusedClassifier([copy.deepcopy(m) for m in models], [hp["epochs"] for hp in hparams], ["a", "b"])
    train, val = loaders()
    trainer(3, [StopAfterValidation("b", how)]).fit(fused, train, val)
    assert fused.outcomes["b"][0] == outcome
    assert fused.outcomes["a"] == ("finished", "")


def test_each_model_checkpoint_loads_as_a_single_model(tmp_path):
    models = classifiers(HPARAMS)
    names = ["a", "b", "c"]
    checkpoints = [ModelInStackCheckpoint(name, str(tmp_path / name)) for name in names]
    states = train_fused(models, HPARAMS, names, checkpoints)
    _, val = loaders()
    x, y = val.dataset.tensors
    for checkpoint, name, hp in zip(checkpoints, names, HPARAMS):
        assert checkpoint.best_model_path.startswith(str(tmp_path / name))
        saved = torch.load(checkpoint.best_model_path, weights_only=False)
        for key, value in states.states[name][saved["epoch"]].items():
            torch.testing.assert_close(saved["state_dict"][f"net.{key}"], value, rtol=0, atol=0)
        loaded = MLPClassifier.load_from_checkpoint(checkpoint.best_model_path).double().eval()  # float32 inside
        assert loaded.hparams.lr == hp["lr"] and loaded.hparams.width == hp["width"]
        for key, value in loaded.net.state_dict().items():
            torch.testing.assert_close(value, states.states[name][saved["epoch"]][key], rtol=1e-6, atol=1e-7)
        accuracy = (loaded(x.double()).argmax(1) == y).double().mean()
        assert accuracy.item() == pytest.approx(checkpoint.best_model_score.item(), abs=1e-6)
