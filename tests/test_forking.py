"""Forking: a change to the one model reaches stacked trials by itself, and docs/forking.md's worked example runs:
a copy of the project with momentum added to the search, by the page's own line, tunes it two trials stacked."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mlp import final
from mlp.cli import MLPCLI, build_cli, fit
from mlp.data import FashionMNISTDataModule
from mlp.errors import UserError
from mlp.fused import hooks_a_stack_skips, padding_error, probe_step, reads_progress, stack_error
from mlp.gpu_sizing import why_unfusable
from mlp.loading import load_model
from mlp.module import MLPClassifier, cross_entropy_grad
from mlp.net import relu
from mlp.run import train
from mlp.trials import train_runs
from mlp.tune import check_trials_can_train_as_fit

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "forking.md").read_text()


def example_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language} fork-example\n(.*?)```", PAGE, flags=re.S)


def insert_after(path: Path, anchor: str, line: str) -> None:
    text = path.read_text()
    assert text.count(anchor) == 1, f"{path.name}: the anchor {anchor!r} moved; update docs/forking.md and this test"
    path.write_text(text.replace(anchor, anchor + line + "\n"))


def test_the_momentum_example_of_forking_md_tunes_momentum(synthetic_dir, tmp_path):
    fork = tmp_path / "fork"
    for folder in ("mlp", "scripts"):
        shutil.copytree(ROOT / folder, fork / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (field,) = [line.strip() for line in example_blocks("python")[0].strip().splitlines()]
    search = fork / "mlp" / "search.py"
    last_field = '    label_smoothing: tuple[float, float] | None = searched(0.0, 0.2, "model.label_smoothing")\n'
    insert_after(search, last_field, f"    {field}")

    (command,) = example_blocks("bash")
    args = command.replace("\\\n", " ").split()[2:]  # after `python scripts/tune.py`
    args += [f"--data.data_dir={synthetic_dir}", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
             "--data.val_size=100"]
    env = {**os.environ, "PYTHONPATH": str(fork)}
    result = subprocess.run([sys.executable, "scripts/tune.py", *args], cwd=fork, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "logs" / "tune" / "momentum" / "report.json").read_text())
    assert 0.5 <= report["best_params"]["momentum"] <= 0.95
    first = yaml.safe_load((tmp_path / "logs" / "tune" / "momentum" / "trial_0" / "config.yaml").read_text())
    assert first["model"]["momentum"] == 0.9  # fit's own, as the page says
    # A range is checked beside the fit flags' other hyperparameters: momentum 0 is no bound with Nesterov's on (the
    # default), and one with --model.nesterov false.
    code = ("from mlp.errors import UserError\nfrom mlp.search import MODEL_DEFAULTS, SearchSpace\n"
            "space = SearchSpace(momentum=(0.0, 0.9))\nspace.validate({**MODEL_DEFAULTS, 'nesterov': False})\n"
            "try:\n    space.validate()\nexcept UserError as error:\n    print(error)")
    checked = subprocess.run([sys.executable, "-c", code], cwd=fork, env=env, capture_output=True, text=True)
    assert checked.stdout.strip() == "--momentum 0.0 0.9: nesterov needs momentum > 0", checked.stderr[-2000:]
    assert sum(report["trials"].get(state, 0) for state in ("complete", "pruned")) == 2


# A fork changes the one model and --fuse follows: trials stacked two at a time train exactly as alone.


class ResidualMLP(torch.nn.Module):
    """A fork's own net, built where MLPClassifier builds its `MLP`: x W_in, then `depth` residual blocks
    h + relu(h W + b), then the logits. Per-example operations only, and no line of stacking code."""

    def __init__(self, num_inputs: int, depth: int, width: int, num_outputs: int, *_: object) -> None:
        super().__init__()
        self.w_in = torch.nn.Parameter(torch.randn(num_inputs, width) / num_inputs**0.5)
        self.blocks = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(width, width) / width) for _ in range(depth))
        self.biases = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(width)) for _ in range(depth))
        self.w_out = torch.nn.Parameter(torch.randn(width, num_outputs) / width**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1) @ self.w_in
        for w, b in zip(self.blocks, self.biases):
            h = h + relu(h @ w + b)
        return h @ self.w_out

    def multiply_adds(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.dim() == 2)


def penalised_loss(self: MLPClassifier, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A fork's loss: the template's plus a penalty on the logits' size."""
    return ORIGINAL_LOSS(self, logits, y) + 0.01 * logits.pow(2).mean()


ORIGINAL_LOSS = MLPClassifier.loss


def final_weights(synthetic_dir: Path, tmp_path: Path, fuse: int, precision: str, *flags: str) -> dict[str, dict]:
    """Two trials' final weights (their lr differs), trained by `train_runs` one at a time or stacked. Both are
    seeded as the group is, so they start alike and every run draws the same batches (a stack's order is its
    group's, a run alone's its own)."""
    args = [f"--data.data_dir={synthetic_dir}", "--data.val_size=0", "--trainer.max_epochs=2", "--model.depth=1",
            "--model.width=16", "--data.batch_size=64", f"--trainer.precision={precision}", *flags]

    def run(name: str, lr: float) -> MLPCLI:
        return build_cli([*args, f"--trainer.logger.init_args.save_dir={tmp_path / str(fuse)}",
                          f"--trainer.logger.init_args.version={name}", f"--model.lr={lr}"])

    runs, ends = {"a": run("a", 0.05), "b": run("b", 0.2)}, {}
    if fuse == 1:
        for name, cli in runs.items():
            train_runs({name: cli}, args, 1, ends.__setitem__)
    else:
        train_runs(runs, args, fuse, ends.__setitem__)
    assert {name: end.how for name, end in ends.items()} == {"a": "finished", "b": "finished"}
    return {name: torch.load(end.checkpoint, weights_only=True)["state_dict"] for name, end in ends.items()}


@pytest.mark.parametrize("fork", ["loss", "net", "manual backward"])
@pytest.mark.parametrize("precision,tolerance", [("64-true", 1e-9), ("32-true", 1e-5)])
def test_a_forks_loss_or_net_trains_stacked_exactly_as_alone(fork, precision, tolerance, synthetic_dir, tmp_path,
                                                              monkeypatch):
    flags = ["--model.backward=manual"] if fork == "manual backward" else []
    if fork == "loss":
        monkeypatch.setattr(MLPClassifier, "loss", penalised_loss)
    if fork == "net":
        monkeypatch.setattr("mlp.module.MLP", ResidualMLP)
    alone = final_weights(synthetic_dir, tmp_path, 1, precision, *flags)
    stacked = final_weights(synthetic_dir, tmp_path, 2, precision, *flags)
    if fork == "net":
        assert any("blocks" in key for key in alone["a"])
    for name in ("a", "b"):
        assert alone[name].keys() == stacked[name].keys()
        for key, value in alone[name].items():
            torch.testing.assert_close(stacked[name][key], value, rtol=tolerance, atol=tolerance)
    if fork == "loss":  # the override was trained on: without it, the weights differ
        monkeypatch.setattr(MLPClassifier, "loss", ORIGINAL_LOSS)
        plain = final_weights(synthetic_dir, tmp_path / "plain", 2, precision, *flags)
        assert (plain["a"]["net.params.0"] - stacked["a"]["net.params.0"]).abs().max() > 1e-4


def test_a_forks_loss_or_net_without_its_hand_written_gradient_is_refused_with_the_manual_backward(monkeypatch):
    """--model.backward manual differentiates the template's loss and net by hand: a fork's loss or net without its
    gradient written there too would train on the template's cross-entropy while logging its own loss."""
    monkeypatch.setattr(MLPClassifier, "loss", penalised_loss)
    MLPClassifier(depth=1, width=16)  # autograd differentiates the fork's loss
    with pytest.raises(UserError, match="not those of MLPClassifier.loss and the net"):
        MLPClassifier(depth=1, width=16, backward="manual")

    def penalised_loss_grad(logits: torch.Tensor, y: torch.Tensor, label_smoothing: torch.Tensor) -> torch.Tensor:
        return cross_entropy_grad(logits, y, label_smoothing) + 0.02 * logits / logits.numel()

    monkeypatch.setattr("mlp.module.cross_entropy_grad", penalised_loss_grad)  # the fork writes the gradient too
    MLPClassifier(depth=1, width=16, backward="manual", dropout=0.5, label_smoothing=0.1)

    monkeypatch.setattr(MLPClassifier, "loss", ORIGINAL_LOSS)
    monkeypatch.setattr("mlp.module.MLP", ResidualMLP)
    with pytest.raises(UserError, match="needs the net's forward.*ResidualMLP lacks"):
        MLPClassifier(depth=1, width=16, backward="manual")


def epoch_weighted_loss(self: MLPClassifier, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A fork's loss that reads the run's progress, as a warm-up or a curriculum does."""
    ramp = (self.current_epoch + 1) / self.trainer.max_epochs if self.training else 1.0
    return ORIGINAL_LOSS(self, logits, y) + 0.05 * ramp * logits.pow(2).mean() + 1e-3 * self.global_step


def test_a_loss_that_reads_the_runs_epoch_trains_in_a_stack_as_in_fit(synthetic_dir, tmp_path, monkeypatch):
    """A stacked model sees its own epoch, step and epochs (MemberTrainer), as its fit.py run does: the epoch and
    step of a stack's Trainer were 0 to a model in it, and such a loss trained differently in every trial."""
    monkeypatch.setattr(MLPClassifier, "loss", epoch_weighted_loss)
    stacked = final_weights(synthetic_dir, tmp_path / "stacked", 2, "64-true")["a"]
    cli = build_cli([f"--data.data_dir={synthetic_dir}", "--data.val_size=0", "--trainer.max_epochs=2",
                     "--model.depth=1", "--model.width=16", "--data.batch_size=64", "--trainer.precision=64-true",
                     f"--trainer.logger.init_args.save_dir={tmp_path / 'fit'}", "--model.lr=0.05"])
    fit(cli)
    for key, value in cli.model.state_dict().items():
        torch.testing.assert_close(stacked[key], value, rtol=1e-9, atol=1e-9)
    monkeypatch.setattr(MLPClassifier, "loss", ORIGINAL_LOSS)  # the progress read changes what is trained
    plain = final_weights(synthetic_dir, tmp_path / "plain", 2, "64-true")["a"]
    assert (plain["net.params.0"] - stacked["net.params.0"]).abs().max() > 1e-4


def test_models_whose_step_reads_its_progress_stack_only_with_models_at_the_same_point_of_runs_as_long(
        synthetic_dir, tmp_path, monkeypatch):
    """A stack runs one model's Python for all: a second trial of 3 epochs beside one of 2 had read 2 as its
    max_epochs (as a trial joining a stack read the epoch of the one it joined)."""
    assert not reads_progress(MLPClassifier(depth=1, width=16))  # the template's stacks are unchanged
    monkeypatch.setattr(MLPClassifier, "loss", epoch_weighted_loss)
    assert reads_progress(MLPClassifier(depth=1, width=16)) and stack_error(MLPClassifier(depth=1, width=16)) is None
    args = [f"--data.data_dir={synthetic_dir}", "--data.val_size=0", "--model.depth=1", "--model.width=16",
            "--data.batch_size=64", "--trainer.precision=64-true", "--trainer.max_epochs=2"]

    def weights(fuse: int) -> dict[str, dict]:
        logs = [f"--trainer.logger.init_args.save_dir={tmp_path / str(fuse)}", "--trainer.logger.init_args.version"]
        runs = {name: build_cli([*args, f"--trainer.max_epochs={epochs}", *logs[:1], f"{logs[1]}={name}"])
                for name, epochs in (("a", 2), ("b", 3))}
        ends: dict = {}
        for group in ([runs] if fuse == 2 else [{name: cli} for name, cli in runs.items()]):
            train_runs(group, args, fuse, ends.__setitem__)
        return {name: torch.load(end.checkpoint, weights_only=True)["state_dict"] for name, end in ends.items()}

    alone, stacked = weights(1), weights(2)
    for key, value in alone["b"].items():
        torch.testing.assert_close(stacked["b"][key], value, rtol=1e-9, atol=1e-9)


class ItemNet(ResidualMLP):
    """A fork's net with data-dependent Python, which vmap cannot run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return logits if logits.abs().max().item() < 1e6 else logits.clamp(-1e6, 1e6)


def test_a_net_vmap_cannot_run_trains_one_trial_at_a_time_and_is_refused_in_stacks(synthetic_dir, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setattr("mlp.module.MLP", ItemNet)
    assert stack_error(MLPClassifier(depth=1, width=16)) is not None  # what --fuse K > 1 refuses
    alone = final_weights(synthetic_dir, tmp_path, 1, "32-true")  # --fuse 1: a stack of one runs without vmap
    assert any("blocks" in key for key in alone["a"])


def test_a_loss_that_logs_is_refused_in_a_trial_and_a_subclass_hook_trials_skip_is_refused_by_tune(
        synthetic_dir, tmp_path, monkeypatch):
    def logging_loss(self: MLPClassifier, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = ORIGINAL_LOSS(self, logits, y)
        self.log("train/own", loss)
        return loss

    monkeypatch.setattr(MLPClassifier, "loss", logging_loss)
    with pytest.raises(UserError, match="calls self.log as it trains.*train_epoch_scalars"):
        final_weights(synthetic_dir, tmp_path, 1, "32-true")

    class Fork(MLPClassifier):
        def configure_optimizers(self) -> dict:
            return super().configure_optimizers()

        def on_after_batch_transfer(self, batch: tuple, dataloader_idx: int) -> tuple:
            return batch

    assert hooks_a_stack_skips(MLPClassifier(depth=1, width=16)) == []
    assert hooks_a_stack_skips(Fork(depth=1, width=16)) == ["configure_optimizers", "on_after_batch_transfer"]

    cli = build_cli([f"--data.data_dir={synthetic_dir}", "--model.depth=1", "--model.width=16",
                     f"--trainer.logger.init_args.save_dir={tmp_path / 'tune'}"])
    cli.model = Fork(depth=1, width=16)
    with pytest.raises(UserError, match="Fork overrides configure_optimizers, on_after_batch_transfer, which fit.py"):
        check_trials_can_train_as_fit(cli, 1)
    cli.model = MLPClassifier(depth=1, width=16)
    cli.model.net = ItemNet(784, 1, 16, 10)
    check_trials_can_train_as_fit(cli, 1)  # it counts its multiply-adds
    cli.model.net.multiply_adds = None
    with pytest.raises(UserError, match="multiply_adds\\(\\), which ItemNet lacks"):
        check_trials_can_train_as_fit(cli, 1)


class PaddedResidualMLP(ResidualMLP):
    widths_pad_exactly = True  # zero-padded units stay zero through x W_in, the blocks and the residuals


class LayerNormedMLP(PaddedResidualMLP):
    """A fork that normalises over the hidden units, which zero-padded units change, and keeps the claim."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1) @ self.w_in
        return ((h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-5)) @ self.w_out


def test_a_net_that_claims_its_widths_pad_exactly_is_checked_before_stacks_pad_it(synthetic_dir, monkeypatch):
    assert padding_error(MLPClassifier(depth=2, width=16, batch_norm=True, dropout=0.3)) is None
    monkeypatch.setattr("mlp.module.MLP", PaddedResidualMLP)
    assert padding_error(MLPClassifier(depth=1, width=16)) is None
    monkeypatch.setattr("mlp.module.MLP", LayerNormedMLP)
    assert "set widths_pad_exactly = False" in padding_error(MLPClassifier(depth=1, width=16))
    cli = build_cli([f"--data.data_dir={synthetic_dir}", "--model.depth=1", "--model.width=16"])
    assert why_unfusable(cli) is None  # the CPU pads no width
    monkeypatch.setattr("mlp.gpu_sizing.pads_widths", lambda cli: True)  # as on a GPU
    assert "widths_pad_exactly" in why_unfusable(cli)[0]


def test_a_step_reading_the_trainer_beyond_its_progress_is_refused_by_tune_and_manual_backward_checks_it(
        synthetic_dir, tmp_path, monkeypatch):
    def batches_loss(self: MLPClassifier, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ORIGINAL_LOSS(self, logits, y) * (1 + 1 / self.trainer.estimated_stepping_batches)

    monkeypatch.setattr(MLPClassifier, "loss", batches_loss)  # the trial's own length: stacks of its like
    assert reads_progress(MLPClassifier(depth=1, width=16)) and not probe_step(MLPClassifier()).other_reads
    with pytest.raises(UserError, match="the loss reads the run's progress, which the one check"):
        MLPClassifier(depth=1, width=16, backward="manual")

    def clipping_loss(self: MLPClassifier, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ORIGINAL_LOSS(self, logits, y) * self.trainer.accumulate_grad_batches

    monkeypatch.setattr(MLPClassifier, "loss", clipping_loss)
    cli = build_cli([f"--data.data_dir={synthetic_dir}", "--model.depth=1", "--model.width=16",
                     f"--trainer.logger.init_args.save_dir={tmp_path}"])
    with pytest.raises(UserError, match="reads self.trainer.accumulate_grad_batches as it trains, which no trial"):
        check_trials_can_train_as_fit(cli, 1)


class PenalisedModel(MLPClassifier):
    """A fork's model, a subclass named in mlp/classes.py."""

    loss = penalised_loss


class CountedData(FashionMNISTDataModule):
    """A fork's data module, a subclass named in mlp/classes.py, counting its builds."""

    built = 0

    def setup(self, stage: str) -> None:
        CountedData.built += 1
        super().setup(stage)


def test_a_fork_names_its_model_and_data_module_once_and_runs_loading_and_final_tests_use_them(
        synthetic_dir, tmp_path, monkeypatch):
    """fit.py and every trial built the classes build_cli named, while loading and the final models' tests named the
    template's: a fork's data module's refit ensemble was tested on Fashion-MNIST, its model's checkpoint loaded as
    MLPClassifier."""
    monkeypatch.setattr("mlp.classes.MODEL", PenalisedModel)
    monkeypatch.setattr("mlp.classes.DATA", CountedData)
    cli = build_cli([f"--data.data_dir={synthetic_dir}", "--data.val_size=100", "--trainer.max_epochs=1",
                     "--model.depth=1", "--model.width=16", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert isinstance(cli.model, PenalisedModel) and isinstance(cli.datamodule, CountedData)
    checkpoint = train(cli)
    assert isinstance(load_model(Path(checkpoint)), PenalisedModel)
    built = CountedData.built
    final.test_checkpoints([checkpoint])
    assert CountedData.built == built + 1
