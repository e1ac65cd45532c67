"""K trials trained at once: a LightningModule over `StackedMLP`s (one per depth, or per depth and width),
stepped together on the same batches, each model with its own hyperparameters, optimiser state, schedule,
metrics, TensorBoard run and fate.

Each model learns exactly as the `MLPClassifier` it was built from would alone on the same batches: the loss
is the sum of the models' mean cross-entropies, so each model's gradient is its own; each model is its own
parameter group (leaf views of its slice of the stacked storage) with its own lr, weight decay and
`LambdaLR` schedule over its own epochs. A model leaves the stack when it finishes its epochs, diverges or
is stopped (pruned), and the others go on untouched; a model added at an epoch's end (`add`) trains from the
next epoch for its own epochs, counting its epochs and steps from there.
"""

import math
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from mlp.module import NUM_CLASSES, MLPClassifier, cross_entropy_grad, make_optimizer, start_run
from mlp.net import MLP
from mlp.schedules import SCHEDULES
from mlp.stacked import StackedMLP, hidden_width, resized

# Hyperparameters that may differ between the models of one module; every other one must be the same. Models
# share a stack by depth (and width, without padding: see FusedClassifier).
PER_MODEL = ("lr", "weight_decay", "dropout", "width", "depth", "label_smoothing")
# FusedClassifier's lists with one entry per model, in model order, besides its metrics and optimiser views.
PER_MODEL_LISTS = ("names", "epochs", "hparams_per_model", "loggers_per_model", "first_epochs", "first_steps")


def shared_hparams(classifier: MLPClassifier) -> dict:
    """The hyperparameters all models fused together must share."""
    return {key: v for key, v in classifier.hparams.items() if key not in PER_MODEL}


class ModelMetrics(nn.Module):
    """One model's metrics, as MLPClassifier keeps them (NaN kept: a diverging loss must show). The predictions
    are argmaxes of 10 logits, valid by construction, so torchmetrics' input checks are skipped: K models
    would pay them K times an epoch (2.2 against 0.3 ms for 55,000 predictions on the 2-core CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.train_acc = MulticlassAccuracy(NUM_CLASSES, average="micro", validate_args=False)
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.val_acc = MulticlassAccuracy(NUM_CLASSES, average="micro", validate_args=False)
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.val_acc_best = MaxMetric()


class FusedClassifier(L.LightningModule):
    """The models of `classifiers` (same optimiser, schedule kind, activation, init and backward) trained
    together, each for its epochs, named by its name in logged metric keys (`val/acc/<name>`).

    With `pad_widths`, models of one depth share a stack, padded to its widest model: the fewest batched
    matmuls, which is what a GPU wants. Without it, only models of the same depth and width share one, and no
    multiply-add is spent on padding, which is what a CPU wants: there a step costs its arithmetic, and the
    default search's widths (128 to 1024) padded per depth cost 1.78x the nets' own (see the README).
    The models are kept in stack order (`names`, `epochs` and the other per-model lists follow it), and model
    k's logits are row k of the stacks' logits concatenated.

    loggers[k], when given, receives model k's scalars and hyperparameters as MLPClassifier writes its own.
    on_leave(name, how, detail), when given, is called as each model leaves the stack (see `outcomes`).
    refill(module), when given, is called at each epoch's end once the leaving models have left; it may `add`
    models to train from the next epoch.
    """

    def __init__(
        self,
        classifiers: Sequence[MLPClassifier],
        epochs: Sequence[int],
        names: Sequence[str],
        loggers: Sequence[Logger] | None = None,
        on_leave: Callable[[str, str, str], None] | None = None,
        refill: Callable[["FusedClassifier"], None] | None = None,
        pad_widths: bool = True,
    ) -> None:
        super().__init__()
        self.shared, self.pad_widths = shared_hparams(classifiers[0]), pad_widths
        for classifier in classifiers:
            self.check_shares_settings(classifier)
        loggers = list(loggers) if loggers else [None] * len(classifiers)
        keys = [self.stack_key(c.net) for c in classifiers]
        order = sorted(range(len(classifiers)), key=lambda k: keys[k])  # stable
        classifiers = [classifiers[k] for k in order]
        self.hparams_per_model = [dict(c.hparams) for c in classifiers]
        self.epochs, self.names = [epochs[k] for k in order], [names[k] for k in order]
        self.loggers_per_model, self.on_leave, self.refill = [loggers[k] for k in order], on_leave, refill
        # Where each model's own run began: the epoch and the optimiser step (0 but for models added later).
        self.first_epochs, self.first_steps = [0] * len(classifiers), [0] * len(classifiers)
        keys = [keys[k] for k in order]
        self.stacks = nn.ModuleList(
            StackedMLP([c.net for c, its_key in zip(classifiers, keys) if its_key == key]) for key in sorted(set(keys))
        )
        self.metrics = nn.ModuleList(ModelMetrics() for _ in classifiers)
        self.automatic_optimization = self.shared["backward"] == "autograd"
        self.train_step_outputs: list[tuple[Tensor, Tensor, Tensor]] = []
        # name -> (how, detail) for models that leave the stack at this epoch's end, and for those that left:
        # ("finished", ""), ("diverged", when and why) or what `stop` was told (e.g. ("pruned", "")).
        self.stopping: dict[str, tuple[str, str]] = {}
        self.outcomes: dict[str, tuple[str, str]] = {}
        self.views: list[list[Tensor]] = []  # per model, its slices of the stacked parameters (the optimiser's)
        self.steps_per_epoch = 0  # set with the optimiser
        for stack in self.stacks:
            self.hand_out_grads_of(stack)

    def hand_out_grads_of(self, stack: StackedMLP) -> None:
        for i, p in enumerate(stack.parameters()):
            # As soon as backward completes a stacked gradient, not later: Lightning's mixed precision
            # unscales the gradients the optimiser holds before its on_before_optimizer_step hook runs.
            p.register_post_accumulate_grad_hook(partial(self.hand_out_grad, stack, i))

    def check_shares_settings(self, classifier: MLPClassifier) -> None:
        if shared_hparams(classifier) != self.shared:
            raise ValueError(f"models fused together may differ only in {PER_MODEL}")

    def stack_key(self, net: MLP) -> tuple[int, int]:
        """Nets (or stacks) with the same key share a stack: (depth, width), the width 0 with `pad_widths`."""
        if isinstance(net, StackedMLP):
            return net.depth, 0 if self.pad_widths else net.widths[0]
        return len(net.layers) - 1, 0 if self.pad_widths else hidden_width(net)

    def placement(self) -> list[tuple[StackedMLP, int]]:
        """Model k's stack and its index in that stack, for every model k."""
        return [(stack, j) for stack in self.stacks for j in range(stack.size)]

    def progress(self, k: int) -> tuple[int, int]:
        """Model k's own epoch (from 0) and optimiser steps done, counted from where it joined."""
        return self.current_epoch - self.first_epochs[k], self.global_step - self.first_steps[k]

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([stack(x) for stack in self.stacks])

    def losses(self, logits: Tensor, y: Tensor) -> Tensor:
        """Per-example cross-entropy of each model, (K, B); in training with each model's own label smoothing,
        mixed as F.cross_entropy mixes it: (1 - s) * the target's loss + s * the mean loss over all classes."""
        k, b = logits.shape[:2]
        plain = F.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="none").view(k, b)
        smoothing = [hp["label_smoothing"] for hp in self.hparams_per_model]
        if not self.training or not any(smoothing):
            return plain
        share = torch.tensor(smoothing, dtype=logits.dtype, device=logits.device)[:, None]
        return (1 - share) * plain + share * -logits.log_softmax(-1).mean(-1)

    # Training

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        steps = self.global_step  # read before the manual path steps
        if self.automatic_optimization:
            logits = self(x)
            loss_per_model = self.losses(logits, y).mean(1)
        else:
            logits, loss_per_model = self.manual_training_step(x, y)
        self.train_step_outputs.append((loss_per_model.detach(), logits.detach().argmax(-1), y))
        every = self.trainer.log_every_n_steps
        for k, first_step in enumerate(self.first_steps):  # each model's steps done, as its own run counts them
            if (steps - first_step + 1) % every == 0:  # where Lightning writes MLPClassifier's, and how
                self.write(k, {"train/loss_step": loss_per_model[k]}, steps - first_step)
        return loss_per_model.sum()  # each model's gradient is that of its own mean loss

    @torch.no_grad()
    def manual_training_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """MLPClassifier.manual_training_step with a model dimension: `MLP.backward` serves the stack as is."""
        caches = [[] for _ in self.stacks]
        logits = torch.cat([stack(x, cache) for stack, cache in zip(self.stacks, caches)])
        grad_logits = torch.stack(
            [cross_entropy_grad(one, y, hp["label_smoothing"]) for one, hp in zip(logits, self.hparams_per_model)]
        )
        for stack, cache, grad_stack in zip(self.stacks, caches, grad_logits.split([s.size for s in self.stacks])):
            for i, (p, grad) in enumerate(zip(stack.parameters(), stack.backward(cache, grad_stack))):
                p.grad = grad
                self.hand_out_grad(stack, i, p)
        self.optimizers().step()
        self.lr_schedulers().step()
        return logits, self.losses(logits, y).mean(1)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        """Clear the stacked gradients, which backward accumulates into; the optimiser holds only views of them."""
        for p in self.stacks.parameters():
            p.grad = None

    def hand_out_grad(self, stack: StackedMLP, i: int, p: Tensor) -> None:
        """Give each of the stack's models' parameter groups its slice of the stack's gradient of parameter i."""
        if not self.views:  # before configure_optimizers
            return
        for k, (model_stack, j) in enumerate(self.placement()):
            if model_stack is stack:
                self.views[k][i].grad = p.grad[j]

    def configure_optimizers(self):
        """One parameter group per model, over leaf views of its slices: torch.optim steps each model with its
        own lr and weight decay, and a LambdaLR moves each group's lr along its own schedule."""
        self.views = [[p.detach()[j] for p in stack.parameters()] for stack, j in self.placement()]
        groups = [
            {"params": views, "lr": hp["lr"], "weight_decay": hp["weight_decay"]}
            for views, hp in zip(self.views, self.hparams_per_model)
        ]
        # Each group's lr and weight decay rule; torch's fused step, as K models make K groups of few tensors
        # (8 models of 784-256-10: 0.78 ms a step against 2.25 ms, measured on the 2-core CPU).
        optimizer = make_optimizer(groups, self.hparams_per_model[0], fused=True)
        self.steps_per_epoch = self.trainer.estimated_stepping_batches // self.trainer.max_epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [self.schedule(k) for k in range(len(self.names))])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def schedule(self, k: int) -> Callable[[int], float]:
        """Model k's learning-rate factor at each optimiser step of the module, along its own schedule."""
        factor = SCHEDULES[self.shared["schedule"]](self.epochs[k] * self.steps_per_epoch)
        first_step = self.first_steps[k]
        return lambda step: factor(step - first_step)

    def on_train_start(self) -> None:
        for metrics in self.metrics:  # the sanity check's validation ran on untrained nets
            metrics.val_acc_best.reset()
        for k in range(len(self.names)):
            self.start_run(k)

    def start_run(self, k: int) -> None:
        start_run(self.loggers_per_model[k], self.hparams_per_model[k], self.trainer.datamodule, self.epochs[k])

    def on_train_epoch_start(self) -> None:
        self.epoch_start = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        """Write each model's training metrics, let the models whose run ends here leave the stack, then let
        `refill` add others; with no model left, training stops."""
        losses, preds, targets = zip(*self.train_step_outputs)
        self.train_step_outputs.clear()
        batch_sizes = torch.tensor([len(y) for y in targets], device=self.device)
        losses, preds, targets = torch.stack(losses, 1), torch.cat(preds, 1), torch.cat(targets)
        # Every model saw every example: the stack's throughput is each model's.
        examples_per_sec = torch.tensor(len(targets) / (time.perf_counter() - self.epoch_start))
        for k, metrics in enumerate(self.metrics):
            # One loss per example, as MLPClassifier does, so the short last batch weighs what it holds.
            metrics.train_loss.update(losses[k].repeat_interleave(batch_sizes))
            metrics.train_acc.update(preds[k], targets)
            scalars = {"train/loss_epoch": metrics.train_loss.compute(), "train/acc": metrics.train_acc.compute(),
                       "train/examples_per_sec": examples_per_sec}
            self.write(k, scalars)
            if not self.trainer.limit_val_batches and not scalars["train/loss_epoch"].isfinite():
                # Nothing validates (a refit): the training loss shows a divergence, as a run alone's guard sees it.
                self.diverged(k, "train/loss_epoch", scalars["train/loss_epoch"])
            metrics.train_loss.reset()
            metrics.train_acc.reset()
        for k, name in enumerate(self.names):
            if name not in self.stopping and self.progress(k)[0] + 1 >= self.epochs[k]:
                self.stopping[name] = ("finished", "")
        self.drop([name for name in self.names if name in self.stopping])
        if self.refill is not None:
            self.refill(self)
        if not self.names:
            self.trainer.should_stop = True

    # Validation

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        losses = self.losses(logits, y)
        for k, metrics in enumerate(self.metrics):
            metrics.val_loss.update(losses[k])
            metrics.val_acc.update(logits[k].argmax(-1), y)

    def on_validation_epoch_end(self) -> None:
        """Log each model's val/acc as `val/acc/<name>` (for its checkpoint and pruning) and write its run;
        a model whose validation loss is NaN or infinite has diverged and leaves the stack."""
        for k, (name, metrics) in enumerate(zip(self.names, self.metrics)):
            acc, loss = metrics.val_acc.compute(), metrics.val_loss.compute()
            metrics.val_acc.reset()
            metrics.val_loss.reset()
            metrics.val_acc_best.update(acc)
            self.log(f"val/acc/{name}", acc, logger=False)  # for callbacks only: `write` logs the model's run
            if self.trainer.sanity_checking:
                continue
            self.write(k, {"val/loss": loss, "val/acc": acc, "hp_metric": metrics.val_acc_best.compute()})
            if not math.isfinite(loss.item()):
                self.diverged(k, "val/loss", loss)

    def diverged(self, k: int, key: str, loss: Tensor) -> None:
        """Model k's loss `key` is NaN or infinite at this epoch's end: it leaves the stack, as a run alone stops."""
        self.stop(self.names[k], "diverged", f"epoch {self.progress(k)[0]}: {key} = {loss.item()} is not finite")

    def stop(self, name: str, how: str, detail: str = "") -> None:
        """Take model `name` out of the stack at the end of this epoch (e.g. its trial was pruned). The first
        reason stands, except "surplus": a trial whose place in the study is another's must not count, so it
        overrides even a divergence found in the same epoch."""
        if how == "surplus":
            self.stopping[name] = (how, detail)
        else:
            self.stopping.setdefault(name, (how, detail))

    def write(self, k: int, scalars: dict[str, Tensor], step: int | None = None) -> None:
        """Model k's scalars in its own run, at its own epoch and `step`: by default its epoch's last step, where
        Lightning writes an unfused run's epoch-end scalars."""
        logger = self.loggers_per_model[k]
        if logger is not None:
            values = {key: float(v) for key, v in scalars.items()}
            epoch, steps_done = self.progress(k)
            logger.log_metrics({**values, "epoch": epoch}, steps_done - 1 if step is None else step)

    # Leaving the stack

    def drop(self, names: Sequence[str]) -> None:
        """Remove models from their stacks (and a stack left empty), their optimiser groups, schedules, metrics
        and loggers; the kept models' views are rebound to the new storage (see `rebind_views`)."""
        if not names:
            return
        keep = [k for k, name in enumerate(self.names) if name not in names]
        for k, name in enumerate(self.names):
            if name in names:
                self.outcomes[name] = self.stopping.pop(name)
                # Lightning keeps every key ever logged; a departed model's would pile up, and each checkpoint
                # callback copies them all every epoch.
                self.trainer.callback_metrics.pop(f"val/acc/{name}", None)
                if self.loggers_per_model[k] is not None:
                    self.loggers_per_model[k].finalize("success")
        placement = self.placement()
        for stack in self.stacks:
            kept = [j for k, (model_stack, j) in enumerate(placement) if model_stack is stack and k in keep]
            stack.keep(torch.tensor(kept, dtype=torch.long, device=self.device))
        self.stacks = nn.ModuleList(stack for stack in self.stacks if stack.size)
        if self.views:
            optimizer, scheduler = self.optimizer_and_scheduler()
            for k in sorted(set(range(len(self.names))) - set(keep), reverse=True):
                for view in self.views[k]:
                    optimizer.state.pop(view, None)
                # The scheduler's get_last_lr() stays stale until its next step() resets it from param_groups.
                del optimizer.param_groups[k], scheduler.lr_lambdas[k], scheduler.base_lrs[k]
            self.views = [self.views[k] for k in keep]
            self.rebind_views(optimizer)
        for attr in PER_MODEL_LISTS:
            setattr(self, attr, [getattr(self, attr)[k] for k in keep])
        self.metrics = nn.ModuleList(self.metrics[k] for k in keep)
        if self.on_leave is not None:
            for name in names:
                self.on_leave(name, *self.outcomes[name])

    # Joining the stack

    def add(self, classifier: MLPClassifier, epochs: int, name: str, logger: Logger | None = None) -> None:
        """At an epoch's end, add model `name` to train from the next epoch for its own `epochs`, as it would
        alone: in the stack of its key (`stack_key`; a new stack for a new key), with its own parameter group,
        schedule (counted from its first step), metrics and run. The Trainer's max_epochs grows to cover it."""
        self.check_shares_settings(classifier)
        hp = dict(classifier.hparams)
        net = classifier.net.to(device=self.device, dtype=self.dtype)
        stack = next((s for s in self.stacks if self.stack_key(s) == self.stack_key(net)), None)
        if stack is None:
            stack = StackedMLP([net])
            self.stacks.append(stack)
            self.hand_out_grads_of(stack)
        else:
            stack.add(net)
        k = [model_stack for model_stack, _ in self.placement()].index(stack) + stack.size - 1  # stack order
        first_epoch = self.current_epoch + 1
        per_model = (name, epochs, hp, logger, first_epoch, self.global_step)
        for attr, value in zip(PER_MODEL_LISTS, per_model):
            getattr(self, attr).insert(k, value)
        self.metrics.insert(k, ModelMetrics().to(self.device))
        optimizer, scheduler = self.optimizer_and_scheduler()
        self.views.insert(k, [p.detach()[stack.size - 1] for p in stack.parameters()])
        self.rebind_views(optimizer)
        optimizer.add_param_group({"params": self.views[k], "lr": hp["lr"], "weight_decay": hp["weight_decay"]})
        group = optimizer.param_groups.pop()
        optimizer.param_groups.insert(k, group)
        factor = self.schedule(k)
        group["initial_lr"], group["lr"] = hp["lr"], hp["lr"] * factor(self.global_step)
        scheduler.lr_lambdas.insert(k, factor)
        scheduler.base_lrs.insert(k, hp["lr"])
        self.trainer.fit_loop.max_epochs = max(self.trainer.max_epochs, first_epoch + epochs)
        self.start_run(k)

    def optimizer_and_scheduler(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        return self.trainer.optimizers[0], self.trainer.lr_scheduler_configs[0].scheduler

    def rebind_views(self, optimizer: torch.optim.Optimizer) -> None:
        """Point each model's views at its slices of the stacks' current storage. The optimiser's state is keyed
        by the views, so it stays each model's; where a stack's padding changed, the state is padded or cut the
        same way (its padded entries are 0, as the padded weights and their gradients are)."""
        for model_views, (stack, j) in zip(self.views, self.placement()):
            for view, p in zip(model_views, stack.parameters()):
                data = p.data[j]
                if data.shape != view.shape:
                    state = optimizer.state.get(view, {})
                    for key, value in state.items():
                        if isinstance(value, Tensor) and value.shape == view.shape:
                            state[key] = resized(value, data.shape)
                view.data, view.grad = data, None

    def model_state(self, name: str) -> dict[str, Tensor]:
        """Model `name`'s parameters, unpadded, as the state dict of an `MLP` of its depth and width."""
        stack, j = self.placement()[self.names.index(name)]
        return stack.state_of(j)

    def single(self, name: str) -> MLPClassifier:
        """Model `name` as an ordinary single MLPClassifier with its own hyperparameters."""
        k = self.names.index(name)
        with torch.random.fork_rng(devices=[]):  # its throwaway init must not move the training's random stream
            single = MLPClassifier(**self.hparams_per_model[k]).to(self.dtype)
        single.net.load_state_dict(self.model_state(name))
        return single


class ModelInStackCheckpoint(ModelCheckpoint):
    """The best checkpoint (by val/acc) of one model of a FusedClassifier, or when nothing `validates` (a refit)
    its latest weights, written as an ordinary MLPClassifier checkpoint that `MLPClassifier.load_from_checkpoint`
    loads alone, under the name a run alone gives it (`mlp.cli.MLPCLI`).

    Lightning's ModelCheckpoint keeps the bookkeeping (best score and path, top-k, file names); only what is
    written differs. It stops when its model leaves the stack.
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

    def setup(self, trainer: L.Trainer, module: "FusedClassifier", stage: str) -> None:
        super().setup(trainer, module, stage)
        self.module = module

    def on_validation_end(self, trainer: L.Trainer, module: "FusedClassifier") -> None:
        if self.name in module.names:  # not once its model has left the stack
            super().on_validation_end(trainer, module)

    def format_checkpoint_name(self, metrics: dict[str, Tensor], *args: Any, **kwargs: Any) -> str:
        """The model's own epoch and step, not the module's, name its checkpoint files."""
        if self.name in self.module.names:
            epoch, step = self.module.progress(self.module.names.index(self.name))
            metrics = {**metrics, "epoch": torch.tensor(epoch), "step": torch.tensor(step)}
        return super().format_checkpoint_name(metrics, *args, **kwargs)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """What is written: the model alone, as an MLPClassifier checkpoint. ModelCheckpoint has no public hook
        for it (trainer.save_checkpoint would write the whole stack), so this private method, the one every save
        of ModelCheckpoint goes through, is overridden here and nowhere else; tests/test_private_apis.py fails if
        an upgrade stops calling it. Lightning's own also notes the step saved, to skip saving twice at one
        step, which a checkpoint saved once an epoch never needs."""
        single = self.module.single(self.name)
        epoch, step = self.module.progress(self.module.names.index(self.name))
        checkpoint = {
            "epoch": epoch,
            "global_step": step,
            "pytorch-lightning_version": L.__version__,
            "state_dict": single.state_dict(),
        }
        # The model's and the data module's settings, as Lightning's own checkpoints hold them: test_checkpoints
        # and scripts/ensemble.py rebuild the split a checkpoint was trained on from the data module's.
        for part in (single, trainer.datamodule):
            if part is not None and part.hparams:
                checkpoint[part.CHECKPOINT_HYPER_PARAMS_KEY] = dict(part.hparams)
        trainer.strategy.save_checkpoint(checkpoint, filepath)
