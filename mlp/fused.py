"""K models trained at once on the same batches, each exactly as it would train alone: horizontal fusion derived
from the one model, `MLPClassifier` (or a fork's subclass), with no second copy of its math.

Models whose `stack_key`s agree have their parameters and buffers stacked along a new first axis, and one
`torch.func.vmap` over `functional_call` of one of them computes them all (PyTorch's model-ensembling recipe). Each
model's parameters are views of its slice of the stack, so its own optimiser steps the stack in place. Models leave
(finished, diverged, pruned) and join (`add`) at epochs' ends; the others go on untouched.
"""

import copy
import math
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

from mlp.module import MLPClassifier, start_run
from mlp.records import Ending

# vmap has no batching rule for `mlp.net.dropout_mask`'s in-place ge_ and warns that it loops, which measured faster.
warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented the batch")


class ModelStep(nn.Module):
    """One model's step as a module's forward, which is what `functional_call` calls: its loss and predictions, and
    with `manual` its hand-written gradients too."""

    def __init__(self, model: MLPClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, y: Tensor, manual: bool) -> tuple:
        return self.model.manual_gradients(x, y) if manual else self.model.model_step((x, y))


class Stack:
    """Models of one `stack_key`: their tensors stacked along a first model axis, each zero-padded to the largest
    shape (MLPs of one depth and several widths). Model j's parameters are views of slice j, cut to its own shape:
    its optimiser never sees the padding, which stays zero."""

    def __init__(self, models: list[MLPClassifier]) -> None:
        """Stack the models' current tensors; the parameter objects stay the same, so that when a model joins or
        leaves and `FusedClassifier.restack` builds new stacks, the models' optimisers keep their state."""
        self.models = models
        # One model's code runs for all: one that draws dropout masks if any does. A rate of 0 then draws a mask of
        # ones (x * 1 is x exactly), so a model without dropout shares the stack and still trains as it would alone.
        self.step = ModelStep(max(self.models, key=lambda model: model.hparams.dropout > 0))
        self.model_params = transposed([dict(ModelStep(m).named_parameters()) for m in self.models])
        self.params = {name: stacked(group).requires_grad_() for name, group in self.model_params.items()}
        buffers = [dict(ModelStep(m).named_buffers()) for m in self.models]
        self.buffers = {name: stacked(group) for name, group in transposed(buffers).items()}

    def __call__(self, x: Tensor, y: Tensor, manual: bool) -> tuple:
        """Every model's step on the batch, outputs with a first model axis."""

        def one(state: dict[str, Tensor]) -> tuple:
            return functional_call(self.step, state, (x, y, manual))

        return vmap(one, randomness="different")({**self.params, **self.buffers})

    def hand_out_grads(self) -> None:
        """Give each model's parameters their slices of the stacked gradients."""
        for name, p in self.params.items():
            for model_p, grad in zip(self.model_params[name], p.grad):
                model_p.grad = grad[tuple(map(slice, model_p.shape))]

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None


def stack_key(model: MLPClassifier, pad_widths: bool) -> tuple:
    """Models with equal keys compute the same function of their own tensors, so they stack: they differ only in
    `PER_MODEL`, their weights, and with `pad_widths` an `MLP`'s width (zero-padded to the widest). Whether
    augmentation is on decides whether images are redrawn, so it is part of the key; its settings are not, nor is
    dropout (see `Stack`)."""
    pads = pad_widths and getattr(model.net, "widths_pad_exactly", False)
    shared = {k: v for k, v in model.hparams.items() if k not in model.PER_MODEL and not (pads and k == "width")}
    shapes = () if pads else tuple(tuple(t.shape) for t in model.net.parameters())
    return type(model), type(model.net), repr(sorted(shared.items())), model.augments, shapes


def stack_error(model: MLPClassifier) -> str | None:
    """Why models like `model` cannot be stacked, or None: one stacked step of two copies on a batch of two. A net
    made of per-example operations stacks, and so does one with batch statistics over its own batch (batch_norm);
    one with data-dependent Python does not."""
    copies = [copy.deepcopy(model).train() for _ in range(2)]
    try:
        x = torch.zeros(2, model.hparams.input_size, dtype=model.dtype, device=model.device)
        Stack(copies)(x, torch.zeros(2, dtype=torch.long, device=model.device), model.hparams.backward == "manual")
    except Exception as error:  # whatever the net raises under vmap
        return f"{type(error).__name__}: {error}".splitlines()[0]
    return None


def transposed(dicts: list[dict[str, Tensor]]) -> dict[str, list[Tensor]]:
    return {name: [d[name] for d in dicts] for name in dicts[0]}


def stacked(tensors: list[Tensor]) -> Tensor:
    """The tensors along a new first axis, each zero-padded to the largest; each tensor's data becomes a view of
    its slice, so that what changes the stack in place (an optimiser's step, a running statistic) changes it."""
    shape = [max(sizes) for sizes in zip(*(t.shape for t in tensors))]
    out = tensors[0].new_zeros((len(tensors), *shape))
    for j, t in enumerate(tensors):
        corner = out[j][tuple(map(slice, t.shape))]
        corner.copy_(t.detach())
        t.data = corner
    return out


class Optimizers(torch.optim.Optimizer):
    """The stacked models' own optimisers stepped as one, the one optimiser Lightning drives (and counts steps by).
    A model's optimiser joins and leaves with it; the optimisers themselves are never edited."""

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

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none)


@dataclass(eq=False)
class Member:
    """A model in the stack, with what it trains by: its name, epochs and run, where its run began (the module's
    epoch and optimiser step it joined at), its optimiser and schedule."""

    name: str
    model: MLPClassifier
    epochs: int
    logger: Logger | None
    first_epoch: int = 0
    first_step: int = 0
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None


class FusedClassifier(L.LightningModule):
    """The `models` trained together, model k for `epochs[k]` epochs, named `names[k]` in logged metric keys
    (`val/acc/<name>`), each writing its scalars and hyperparameters to `loggers[k]` as it would alone. With
    `pad_widths`, MLPs of one depth share a stack padded to the widest, the fewest matmuls, as a GPU wants; without,
    only models of one shape do, spending nothing on padding, as a CPU wants (docs/results.md#padding-cpu).
    on_leave(name, how, detail) is called as each model leaves (see `outcomes`); refill(module) at each epoch's end
    once the leaving models have left: it may `add` models to train from the next epoch."""

    def __init__(
        self,
        models: Sequence[MLPClassifier],
        epochs: Sequence[int],
        names: Sequence[str],
        loggers: Sequence[Logger | None] | None = None,
        on_leave: Callable[[str, Ending, str], None] | None = None,
        refill: Callable[["FusedClassifier"], None] | None = None,
        pad_widths: bool = True,
    ) -> None:
        super().__init__()
        if len(backwards := {model.hparams.backward for model in models}) > 1:
            raise ValueError("models fused together must share --model.backward")
        self.manual = backwards == {"manual"}
        self.automatic_optimization = False  # each model's optimiser steps in training_step
        self.pad_widths, self.on_leave, self.refill = pad_widths, on_leave, refill
        self.models = nn.ModuleList(models)  # registered, so Lightning moves and converts them with the module
        loggers = loggers or [None] * len(models)
        self.members = [Member(*member) for member in zip(names, models, epochs, loggers)]
        self.restack()  # and again once Lightning has moved the models to their device (on_fit_start)
        self.steps_per_epoch = 0  # set with the optimisers
        # name -> (how, detail), of models that leave at this epoch's end, and of those that left.
        self.stopping: dict[str, tuple[Ending, str]] = {}
        self.outcomes: dict[str, tuple[Ending, str]] = {}

    @property
    def names(self) -> list[str]:
        return [member.name for member in self.members]

    @property
    def epochs(self) -> list[int]:
        return [member.epochs for member in self.members]

    def progress(self, k: int) -> tuple[int, int]:
        """Model k's own epoch (from 0) and optimiser steps done, counted from where it joined."""
        member = self.members[k]
        return self.current_epoch - member.first_epoch, self.global_step - member.first_step

    def model(self, name: str) -> MLPClassifier:
        return self.members[self.names.index(name)].model

    def restack(self) -> None:
        """One stack per `stack_key`; the members in stack order, so that model k is the k-th output."""
        stacks: dict[tuple, list[Member]] = {}
        for member in self.members:
            stacks.setdefault(stack_key(member.model, self.pad_widths), []).append(member)
        self.members = [member for group in stacks.values() for member in group]
        self.stacks = [Stack([member.model for member in group]) for group in stacks.values()]

    def on_fit_start(self) -> None:
        self.restack()

    def per_model(self, outputs: list[tuple]) -> list[tuple[Tensor, Tensor]]:
        """Each model's loss and predictions, in member order, from the stacks' outputs with a model axis."""
        return [(loss[j], preds[j]) for loss, preds, *_ in outputs for j in range(len(loss))]

    def configure_optimizers(self) -> Optimizers:
        self.steps_per_epoch = self.trainer.estimated_stepping_batches // self.trainer.max_epochs
        for member in self.members:
            self.give_optimizer(member)
        self.all_optimizers = Optimizers([member.optimizer for member in self.members])
        return self.all_optimizers

    def give_optimizer(self, member: Member) -> None:
        """The model's own optimiser and schedule, over its own epochs."""
        configured = member.model.optimizer_and_schedule(member.epochs * self.steps_per_epoch, not self.pad_widths)
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
        for stack in self.stacks:
            stack.zero_grad()
        if self.manual:
            with torch.no_grad():  # proves that autograd plays no part
                outputs = [stack(x, y, True) for stack in self.stacks]
            for stack, (_, _, grads) in zip(self.stacks, outputs):
                for p, grad in zip(stack.params.values(), grads):
                    p.grad = grad
        else:
            outputs = [stack(x, y, False) for stack in self.stacks]
            # Each model's gradient is that of its own mean loss.
            self.manual_backward(sum(loss.sum() for loss, *_ in outputs))
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
        """Write each model's training metrics, let the models whose run ends here leave, then let `refill` add
        others; with no model left, training stops."""
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
        """Log each model's val/acc as `val/acc/<name>` (for its checkpoint and pruning) and write its run; a model
        whose validation loss is NaN or infinite has diverged and leaves."""
        for k, member in enumerate(self.members):
            scalars = member.model.val_epoch_scalars()
            self.log(f"val/acc/{member.name}", scalars["val/acc"], logger=False)  # for callbacks: `write` logs
            if self.trainer.sanity_checking:
                continue
            self.write(member, scalars)
            if not math.isfinite(scalars["val/loss"].item()):
                self.diverged(k, "val/loss", scalars["val/loss"])

    def diverged(self, k: int, key: str, loss: Tensor) -> None:
        """Model k's loss `key` is NaN or infinite at this epoch's end: it leaves, as a run alone stops."""
        detail = f"epoch {self.progress(k)[0]}: {key} = {loss.item()} is not finite"
        self.stop(self.members[k].name, Ending.DIVERGED, detail)

    def stop(self, name: str, how: Ending, detail: str = "") -> None:
        """Take model `name` out at the end of this epoch (e.g. its trial was pruned). The first reason stands,
        except SURPLUS: a trial whose place in the study is another's must not count, so it overrides even a
        divergence found in the same epoch."""
        if how == Ending.SURPLUS or name not in self.stopping:
            self.stopping[name] = (how, detail)

    def write(self, member: Member, scalars: dict[str, Tensor], step: int | None = None) -> None:
        """The model's scalars in its own run, at its own epoch and `step`: by default its epoch's last step, where
        Lightning writes a run alone's epoch-end scalars."""
        if member.logger is not None:
            epoch, steps_done = self.progress(self.members.index(member))
            values = {key: float(v) for key, v in scalars.items()}
            member.logger.log_metrics({**values, "epoch": epoch}, steps_done - 1 if step is None else step)

    def drop(self, names: Sequence[str]) -> None:
        """Remove models, their optimisers and their loggers; their stacks are rebuilt without them."""
        if not names:
            return
        for member in self.members:
            if member.name in names:
                self.outcomes[member.name] = self.stopping.pop(member.name)
                # Lightning keeps every key ever logged; a departed model's would pile up, and each checkpoint
                # callback copies them all every epoch.
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
        """At an epoch's end, add model `name` to train from the next epoch for its own `epochs`, as it would alone:
        with its own optimiser, schedule (counted from its first step), metrics and run. The Trainer's max_epochs
        grows to cover it."""
        if (model.hparams.backward == "manual") != self.manual:
            raise ValueError("models fused together must share --model.backward")
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
    """The best checkpoint (by val/acc) of one model of a FusedClassifier, or when nothing `validates` (a refit)
    its latest, written as an ordinary MLPClassifier checkpoint under the name a run alone gives it. Lightning's
    ModelCheckpoint keeps the bookkeeping (best score and path, top-k, file names); only what is written differs.
    """

    def __init__(self, name: str, dirpath: str, validates: bool = True) -> None:
        super().__init__(
            dirpath=dirpath,
            monitor=f"val/acc/{name}" if validates else None,
            mode="max",
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
        """The model's own epoch and step, not the module's, name its checkpoint files."""
        if self.name in self.module.names:
            epoch, step = self.module.progress(self.module.names.index(self.name))
            metrics = {**metrics, "epoch": torch.tensor(epoch), "step": torch.tensor(step)}
        return super().format_checkpoint_name(metrics, *args, **kwargs)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """The model alone, as an MLPClassifier checkpoint. ModelCheckpoint has no public hook for what is written
        (trainer.save_checkpoint would write the whole stack), so this private method, which every save goes
        through, is overridden here alone; tests/test_private_apis.py fails if an upgrade stops calling it.
        Lightning's own also notes the step saved, to skip saving twice in a step: never needed once an epoch."""
        model = self.module.model(self.name)
        epoch, step = self.module.progress(self.module.names.index(self.name))
        checkpoint = {
            "epoch": epoch,
            "global_step": step,
            "pytorch-lightning_version": L.__version__,
            # Cloned: the parameters are views of the whole stack, which torch.save would write with each.
            "state_dict": {key: value.clone() for key, value in model.state_dict().items()},
        }
        # The model's and the data module's settings, as Lightning's own checkpoints hold them: the data module's
        # rebuild the split a checkpoint was trained on (scripts/ensemble.py).
        for part in (model, trainer.datamodule):
            if part is not None and part.hparams:
                checkpoint[part.CHECKPOINT_HYPER_PARAMS_KEY] = dict(part.hparams)
        # And the data module's state, the training split's standardisation, as Lightning keeps it: by class name.
        if trainer.datamodule is not None and (state := trainer.datamodule.state_dict()):
            checkpoint[type(trainer.datamodule).__qualname__] = state
        trainer.strategy.save_checkpoint(checkpoint, filepath)
