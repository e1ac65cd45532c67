"""K models trained at once on the same batches, each exactly as alone: horizontal fusion of `MLPClassifier` (or a
fork's subclass) with no second copy of its math. One `torch.func.vmap` over `functional_call` computes a stack
(PyTorch's model-ensembling recipe); each model's parameters are views of its slice, stepped by its own optimiser."""

import copy
import inspect
import math
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.func import functional_call, vmap

from mlp.errors import UserError
from mlp.module import NUM_CLASSES, MLPClassifier, ProbeTrainer, probing, start_run
from mlp.records import Ending

# vmap has no batching rule for `mlp.net.dropout_mask`'s in-place ge_ and warns that it loops, which measured faster.
warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented the batch")


class ModelStep(nn.Module):
    """One model's step (loss, predictions, with `manual` its gradients) as the forward `functional_call` calls."""

    def __init__(self, model: MLPClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, y: Tensor, manual: bool) -> tuple:
        return self.model.manual_gradients(x, y) if manual else self.model.model_step((x, y))


class Stack:
    """Models of one `stack_key`, their tensors stacked and zero-padded to the largest shape (MLPs of one depth,
    several widths). Model j's parameters are views of slice j cut to its shape, so its optimiser never sees the
    padding, which stays zero; the parameter objects stay the same, so restacking keeps the optimisers' state."""

    def __init__(self, models: list[MLPClassifier]) -> None:
        self.models = models
        # One model's code runs for all: one that draws dropout masks if any does. A rate of 0 draws a mask of ones
        # (x * 1 is x exactly), so a model without dropout still trains as it would alone.
        self.step = ModelStep(max(self.models, key=lambda model: model.hparams.dropout > 0))
        self.manual = self.step.model.hparams.backward == "manual"  # one for all: `stack_key` holds it
        self.model_params = transposed([dict(ModelStep(m).named_parameters()) for m in self.models])
        self.params = {name: stacked(group).requires_grad_() for name, group in self.model_params.items()}
        buffers = [dict(ModelStep(m).named_buffers()) for m in self.models]
        self.buffers = {name: stacked(group) for name, group in transposed(buffers).items()}

    def __call__(self, x: Tensor, y: Tensor, manual: bool) -> tuple:
        """Every model's step on the batch, outputs with a first model axis. A stack of one runs without vmap, so
        that a net vmap cannot run (data-dependent Python) still trains one trial at a time (--fuse 1)."""

        def one(state: dict[str, Tensor]) -> tuple:
            return functional_call(self.step, state, (x, y, manual))

        state = {**self.params, **self.buffers}
        if len(self.models) > 1:
            return vmap(one, randomness="different")(state)
        outputs = one({name: tensor[0] for name, tensor in state.items()})
        return tuple([t[None] for t in out] if isinstance(out, list) else out[None] for out in outputs)

    def hand_out_grads(self) -> None:
        for name, p in self.params.items():
            for model_p, grad in zip(self.model_params[name], p.grad):
                model_p.grad = grad[tuple(map(slice, model_p.shape))]

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None


def stack_key(model: MLPClassifier, pad_widths: bool) -> tuple:
    """Models with equal keys compute the same function of their own tensors, so they stack: they differ only in
    `PER_MODEL`, their weights and with `pad_widths` an `MLP`'s width. Whether augmentation is on decides whether
    images are redrawn, so it is part of the key; its settings are not, nor is dropout (see `Stack`)."""
    pads = pad_widths and getattr(model.net, "widths_pad_exactly", False)
    shared = {k: v for k, v in model.hparams.items() if k not in model.PER_MODEL and not (pads and k == "width")}
    shapes = () if pads else tuple(tuple(t.shape) for t in model.net.parameters())
    return type(model), type(model.net), repr(sorted(shared.items())), model.augments, shapes


def stack_error(model: MLPClassifier) -> str | None:
    """Why models like `model` cannot be stacked, or None, from one stacked step of two copies. Per-example
    operations stack, as do batch statistics over a model's own batch (batch_norm); data-dependent Python does not."""
    copies = [copy.deepcopy(model).train() for _ in range(2)]
    try:
        with probing(copies[0]), probing(copies[1]):
            stack = Stack(copies)
            stack(*probe_batch(model), stack.manual)
    except Exception as error:  # whatever the net raises under vmap
        return f"{type(error).__name__}: {error}".splitlines()[0]
    return None


def probe_batch(model: MLPClassifier) -> tuple[Tensor, Tensor]:
    """Two blank images and their labels, as the probes of a model's step feed it."""
    return (torch.zeros(2, model.hparams.input_size, dtype=model.dtype, device=model.device),
            torch.zeros(2, dtype=torch.long, device=model.device))


def probe_step(model: MLPClassifier) -> ProbeTrainer:
    """What one training step of a copy of `model`, as at a run's start, reads of its Trainer."""
    copied = copy.deepcopy(model).train()  # a copy carries no Trainer (LightningModule.__getstate__)
    with probing(copied) as trainer:
        try:
            copied.model_step(probe_batch(model))
        except AttributeError:
            if not trainer.other_reads:
                raise
    return trainer


def reads_progress(model: MLPClassifier) -> bool:
    """Whether the model's step reads its run's progress (`self.current_epoch`, `self.global_step`,
    `self.trainer.max_epochs`, ...) or anything else of its Trainer: a stack runs one model's Python for all, so
    then only models at one point of runs of one length stack."""
    trainer = probe_step(model)
    return trainer.read_progress or bool(trainer.other_reads)


def padding_error(model: MLPClassifier) -> str | None:
    """Why nets like `model`'s, which claim `widths_pad_exactly`, compute otherwise zero-padded, or None: the loss of
    a copy (without dropout) alone and in a stack padded to a copy one unit wider."""
    hp = {**model.hparams, "dropout": 0.0}
    if not getattr(model.net, "widths_pad_exactly", False) or not hp.get("depth"):
        return None
    with torch.random.fork_rng(devices=[]):  # the caller's RNG kept
        narrow, wide = type(model)(**hp).train(), type(model)(**{**hp, "width": hp["width"] + 1}).train()
        with probing(narrow), probing(wide):
            x, y = torch.rand(4, hp["input_size"]), torch.arange(4) % NUM_CLASSES
            alone, padded = Stack([narrow])(x, y, False)[0][0], Stack([narrow, wide])(x, y, False)[0][0]
    if torch.allclose(alone, padded, rtol=1e-4, atol=1e-6):
        return None
    return (f"{type(model.net).__name__} says its widths pad exactly (widths_pad_exactly), but a stack padded to a "
            f"wider net changes its loss ({alone.item():.6f} alone, {padded.item():.6f} padded): set "
            "widths_pad_exactly = False (docs/forking.md)")


def transposed(dicts: list[dict[str, Tensor]]) -> dict[str, list[Tensor]]:
    return {name: [d[name] for d in dicts] for name in dicts[0]}


def stacked(tensors: list[Tensor]) -> Tensor:
    """The tensors stacked and zero-padded, each one's data now a view of its slice, so in-place updates reach it."""
    shape = [max(sizes) for sizes in zip(*(t.shape for t in tensors))]
    out = tensors[0].new_zeros((len(tensors), *shape))
    for j, t in enumerate(tensors):
        corner = out[j][tuple(map(slice, t.shape))]
        corner.copy_(t.detach())
        t.data = corner
    return out


class Optimizers(torch.optim.Optimizer):
    """The models' own optimisers stepped as the one optimiser Lightning drives (and counts steps by)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        # No super().__init__ (it holds no parameters, only other optimisers), so the step hooks' dicts that torch's
        # step wrapper (profile_hook_step, on `step` below) reads are set here; tests/test_private_apis.py pins them.
        self.optimizers, self.defaults = optimizers, {}
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = OrderedDict(), OrderedDict()  # as torch's

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def state(self) -> dict[Tensor, Any]:
        return {p: s for optimizer in self.optimizers for p, s in optimizer.state.items()}

    @torch.optim.Optimizer.profile_hook_step  # as torch wraps every optimiser's step in Optimizer.__init__
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure() if closure is not None else None
        for optimizer in self.optimizers:
            optimizer.step()
        return loss


@dataclass(eq=False)
class Member:
    """A model in the stack, with the module's epoch and optimiser step it joined at."""

    name: str
    model: MLPClassifier
    epochs: int
    logger: Logger | None
    first_epoch: int = 0
    first_step: int = 0
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None


class MemberTrainer:
    """The Trainer as a stacked model sees it (`self.trainer`): its own epoch, step and epochs, counted from where it
    joined, so a loss that reads them (a warm-up, a curriculum) trains stacked as alone; the rest is the stack's
    Trainer. A model's own `self.log` is refused: the stack writes each model's run (`FusedClassifier.write`)."""

    def __init__(self, module: "FusedClassifier", member: Member) -> None:
        self.module, self.member = module, member

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module.trainer, name)

    current_epoch = property(lambda self: self.module.current_epoch - self.member.first_epoch)
    global_step = property(lambda self: self.module.global_step - self.member.first_step)
    max_epochs = property(lambda self: self.member.epochs)
    estimated_stepping_batches = property(lambda self: self.member.epochs * self.module.steps_per_epoch)

    @property
    def _results(self) -> None:  # what LightningModule.log reads first
        raise UserError(f"{type(self.member.model).__name__} calls self.log as it trains, which a trial in tune.py "
                        "cannot (the stack writes each trial's run): return the figure from train_epoch_scalars or "
                        "val_epoch_scalars, which fit.py and every trial write")


# The hooks by which Lightning trains and validates a model alone: a stack is trained by them (FusedClassifier's),
# and calls its models' `model_step` (or `manual_gradients`), `optimizer_and_schedule` and metrics' methods instead.
TRAINING_HOOKS = re.compile(r"on_(train|validation|before|after|fit)_\w+|optimizer_\w+|configure_(optimizers|model|"
                            r"gradient_clipping|callbacks)|(training|validation)_step|lr_scheduler_step|backward|setup|"
                            r"teardown|transfer_batch_to_device|on_save_checkpoint")


def hooks_a_stack_skips(model: MLPClassifier) -> list[str]:
    """The training hooks `model`'s class overrides beyond MLPClassifier's own, which no trial calls."""
    hooks = {name for cls in L.LightningModule.__mro__ if cls.__module__.startswith("lightning.")
             for name, value in vars(cls).items() if inspect.isfunction(value) and TRAINING_HOOKS.fullmatch(name)}
    return sorted(name for name in hooks if getattr(type(model), name) is not getattr(MLPClassifier, name))


class FusedClassifier(L.LightningModule):
    """The `models` trained together, model k for `epochs[k]` epochs as `val/acc/<names[k]>`, its run in `loggers[k]`.
    With `pad_widths` MLPs of one depth share a stack padded to the widest (fewest matmuls, for a GPU); without, only
    models of one shape do (for a CPU, docs/results.md#padding-cpu). on_leave(name, how, detail) is called as each
    leaves (see `outcomes`); refill(module) at each epoch's end once they left, to `add` models from the next."""

    def __init__(
        self, models: Sequence[MLPClassifier], epochs: Sequence[int], names: Sequence[str],
        loggers: Sequence[Logger | None] | None = None, on_leave: Callable[[str, Ending, str], None] | None = None,
        refill: Callable[["FusedClassifier"], None] | None = None, pad_widths: bool = True,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False  # each model's optimiser steps in training_step
        self.pad_widths, self.on_leave, self.refill = pad_widths, on_leave, refill
        self.models = nn.ModuleList(models)  # registered, so Lightning moves and converts them with the module
        self.members = [Member(*member) for member in zip(names, models, epochs, loggers or [None] * len(models))]
        self.reads_progress: dict[tuple, bool] = {}  # by stack_key
        self.restack()  # and again once Lightning has moved the models to their device (on_fit_start)
        self.steps_per_epoch = 0  # set with the optimisers
        # name -> (how, detail), of models that leave at this epoch's end, and of those that left.
        self.stopping: dict[str, tuple[Ending, str]] = {}
        self.outcomes: dict[str, tuple[Ending, str]] = {}

    @property
    def names(self) -> list[str]:
        return [member.name for member in self.members]

    def progress(self, k: int) -> tuple[int, int]:
        """Model k's own epoch (from 0) and optimiser steps done, counted from where it joined (`MemberTrainer`)."""
        trainer = self.members[k].model.trainer
        return trainer.current_epoch, trainer.global_step

    def model(self, name: str) -> MLPClassifier:
        return self.members[self.names.index(name)].model

    def restack(self) -> None:
        """One stack per `stack_key`, and where the step reads its progress (`reads_progress`) per point of the run
        and its length; the members in stack order, so that model k is the k-th output."""
        stacks: dict[tuple, list[Member]] = {}
        for member in self.members:
            key = stack_key(member.model, self.pad_widths)
            if key not in self.reads_progress:
                self.reads_progress[key] = reads_progress(member.model)
            if self.reads_progress[key]:
                key = (*key, member.first_epoch, member.first_step, member.epochs)
            stacks.setdefault(key, []).append(member)
        self.members = [member for group in stacks.values() for member in group]
        self.stacks = [Stack([member.model for member in group]) for group in stacks.values()]

    def on_fit_start(self) -> None:
        self.restack()

    def per_model(self, outputs: list[tuple]) -> list[tuple[Tensor, Tensor]]:
        """Each model's loss and predictions, in member order, from the stacks' outputs."""
        return [(loss[j], preds[j]) for loss, preds, *_ in outputs for j in range(len(loss))]

    def configure_optimizers(self) -> Optimizers:
        self.steps_per_epoch = self.trainer.estimated_stepping_batches // self.trainer.max_epochs
        for member in self.members:
            self.give_optimizer(member)
        self.all_optimizers = Optimizers([member.optimizer for member in self.members])
        return self.all_optimizers

    def give_optimizer(self, member: Member) -> None:
        member.model.trainer = trainer = MemberTrainer(self, member)  # type: ignore[assignment]
        configured = member.model.optimizer_and_schedule(trainer.estimated_stepping_batches, not self.pad_widths)
        member.optimizer = configured["optimizer"]
        member.scheduler = configured.get("lr_scheduler", {}).get("scheduler")

    def on_train_start(self) -> None:
        for member in self.members:
            start_run(member.model, member.logger, self.trainer.datamodule, member.epochs)

    def on_train_epoch_start(self) -> None:
        for member in self.members:
            member.model.on_train_epoch_start()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        steps = self.global_step  # read before the step
        outputs = []
        for stack in self.stacks:
            stack.zero_grad()
            if stack.manual:
                with torch.no_grad():  # proves that autograd plays no part
                    outputs.append(stack(x, y, True))
                for p, grad in zip(stack.params.values(), outputs[-1][2]):
                    p.grad = grad
            else:
                outputs.append(stack(x, y, False))
        if losses := [loss.sum() for stack, (loss, *_) in zip(self.stacks, outputs) if not stack.manual]:
            self.manual_backward(sum(losses))  # each model's gradient is that of its own mean loss
        for stack in self.stacks:
            stack.hand_out_grads()
        self.optimizers().step()
        every = self.trainer.log_every_n_steps
        for member, (loss, preds) in zip(self.members, self.per_model(outputs)):
            if member.scheduler is not None:
                member.scheduler.step()
            member.model.train_step_outputs.append((loss.detach(), preds, y))
            if (steps - member.first_step + 1) % every == 0:  # where Lightning writes a run alone's, and how
                self.write(member, {"train/loss_step": loss.detach()}, steps - member.first_step)

    def on_train_epoch_end(self) -> None:
        """Write each model's training metrics, drop those whose run ends, then `refill`; with none left, stop."""
        for k, member in enumerate(self.members):
            scalars = member.model.train_epoch_scalars()
            self.write(member, scalars)
            if not self.trainer.limit_val_batches and not scalars["train/loss_epoch"].isfinite():
                # Nothing validates (a refit): the training loss shows a divergence, as a run alone's guard sees it.
                self.diverged(k, "train/loss_epoch", scalars["train/loss_epoch"])
            if member.name not in self.stopping and self.progress(k)[0] + 1 >= member.epochs:
                self.stopping[member.name] = (Ending.FINISHED, "")
        self.drop([name for name in self.names if name in self.stopping])
        if self.refill is not None and not self.trainer.should_stop:  # no model joins a Trainer that is stopping
            self.refill(self)
        if not self.members:
            self.trainer.should_stop = True

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        for member, (loss, preds) in zip(self.members, self.per_model([stack(*batch, False) for stack in self.stacks])):
            member.model.update_val_metrics(loss, preds, batch[1])

    def on_validation_epoch_end(self) -> None:
        """Log each model's `val/acc/<name>` (for its checkpoint and pruning), write its run, stop it if it diverged."""
        for k, member in enumerate(self.members):
            scalars = member.model.val_epoch_scalars()
            self.log(f"val/acc/{member.name}", scalars["val/acc"], logger=False)  # for callbacks: `write` logs
            if self.trainer.sanity_checking:
                continue
            self.write(member, scalars)
            if not math.isfinite(scalars["val/loss"].item()):
                self.diverged(k, "val/loss", scalars["val/loss"])

    def diverged(self, k: int, key: str, loss: Tensor) -> None:
        detail = f"epoch {self.progress(k)[0]}: {key} = {loss.item()} is not finite"
        self.stop(self.members[k].name, Ending.DIVERGED, detail)

    def stop(self, name: str, how: Ending, detail: str = "") -> None:
        """Take model `name` out at this epoch's end. The first reason stands, except SURPLUS: a trial whose place
        is another's must not count, so it overrides even a divergence found in the same epoch."""
        if how == Ending.SURPLUS or name not in self.stopping:
            self.stopping[name] = (how, detail)

    def write(self, member: Member, scalars: dict[str, Tensor], step: int | None = None) -> None:
        """The model's scalars in its run at its own epoch and `step`: by default its epoch's last, as Lightning's."""
        if member.logger is not None:
            epoch, steps_done = self.progress(self.members.index(member))
            values = {key: float(v) for key, v in scalars.items()}
            member.logger.log_metrics({**values, "epoch": epoch}, steps_done - 1 if step is None else step)

    def drop(self, names: Sequence[str]) -> None:
        """Remove models, their optimisers and loggers, and restack without them."""
        if not names:
            return
        for member in self.members:
            if member.name in names:
                self.outcomes[member.name] = self.stopping.pop(member.name)
                # Lightning keeps every key ever logged, and each checkpoint callback copies them all every epoch.
                self.trainer.callback_metrics.pop(f"val/acc/{member.name}", None)
                if member.logger is not None:
                    member.logger.finalize("success")
        self.members = [member for member in self.members if member.name not in names]
        self.models = nn.ModuleList(member.model for member in self.members)
        self.all_optimizers.optimizers[:] = [member.optimizer for member in self.members]
        self.restack()
        if self.on_leave is not None:
            for name in names:
                self.on_leave(name, *self.outcomes[name])

    def add(self, model: MLPClassifier, epochs: int, name: str, logger: Logger | None = None) -> None:
        """At an epoch's end, add model `name` for its own `epochs` from the next, as alone; max_epochs grows to fit."""
        model.to(device=self.device, dtype=self.dtype)
        member = Member(name, model, epochs, logger, self.current_epoch + 1, self.global_step)
        self.members.append(member)
        self.models.append(model)
        self.give_optimizer(member)
        self.all_optimizers.optimizers.append(member.optimizer)
        self.restack()
        self.trainer.fit_loop.max_epochs = max(self.trainer.max_epochs, member.first_epoch + epochs)
        start_run(model, logger, self.trainer.datamodule, epochs)


class ModelInStackCheckpoint(ModelCheckpoint):
    """One model's best checkpoint (by val/acc), or without validation (a refit) its latest, written as an ordinary
    MLPClassifier checkpoint under a run alone's name; ModelCheckpoint keeps the bookkeeping (best, top-k, names)."""

    def __init__(self, name: str, dirpath: str, validates: bool = True) -> None:
        super().__init__(
            dirpath=dirpath, monitor=f"val/acc/{name}" if validates else None, mode="max",
            filename=f"epoch{{epoch:02d}}-val_acc{{val/acc/{name}:.4f}}" if validates else "epoch{epoch:02d}",
            auto_insert_metric_name=False,
            # At validation's end, or without validation at the epoch's end, which `mlp.trials.TrialCheckpoints`
            # calls before the module's own: both before the module drops the models whose run ends there.
            save_on_train_epoch_end=not validates,
        )
        self.name = name

    def setup(self, trainer: L.Trainer, module: FusedClassifier, stage: str) -> None:
        super().setup(trainer, module, stage)
        self.module = module

    def on_validation_end(self, trainer: L.Trainer, module: FusedClassifier) -> None:
        if self.name in module.names:  # not once its model has left the stack
            super().on_validation_end(trainer, module)

    def format_checkpoint_name(self, metrics: dict[str, Tensor], *args: Any, **kwargs: Any) -> str:
        """The model's own epoch and step, not the module's, name its files."""
        if self.name in self.module.names:
            epoch, step = self.module.progress(self.module.names.index(self.name))
            metrics = {**metrics, "epoch": torch.tensor(epoch), "step": torch.tensor(step)}
        return super().format_checkpoint_name(metrics, *args, **kwargs)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """The model alone: ModelCheckpoint has no public hook for what is written (trainer.save_checkpoint writes the
        whole stack), so this private method every save goes through is overridden (tests/test_private_apis.py).
        Lightning's also notes the step, against saving twice in one: needless once an epoch."""
        model, data = self.module.model(self.name), trainer.datamodule
        epoch, step = self.module.progress(self.module.names.index(self.name))
        checkpoint = {
            "epoch": epoch, "global_step": step, "pytorch-lightning_version": L.__version__,
            # Cloned: the parameters are views of the whole stack, which torch.save would write with each.
            "state_dict": {key: value.clone() for key, value in model.state_dict().items()},
        }
        # The model's and data module's settings and the data module's state (its standardisation, by class name),
        # as Lightning's checkpoints hold them; the data module's rebuild the split trained on (scripts/ensemble.py).
        for part in (model, data):
            if part is not None and part.hparams:
                checkpoint[part.CHECKPOINT_HYPER_PARAMS_KEY] = dict(part.hparams)
        if data is not None and (state := data.state_dict()):
            checkpoint[type(data).__qualname__] = state
        trainer.strategy.save_checkpoint(checkpoint, filepath)
