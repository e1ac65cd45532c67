"""scripts/fit.py end to end: on synthetic data in seconds, and briefly on the real Fashion-MNIST."""

import shutil
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mlp.data import FashionMNISTDataModule
from mlp.errors import UserError
from tests.conftest import real_data_available

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import ensemble  # noqa: E402
import fit  # noqa: E402


def fit_args(data_dir: Path, log_dir: Path, *extra: str) -> list[str]:
    return [
        f"--data.data_dir={data_dir}",
        f"--trainer.logger.init_args.save_dir={log_dir}",
        "--data.val_size=100",
        "--data.batch_size=32",
        "--trainer.max_epochs=3",
        "--progress_bar.refresh_rate=0",
        *extra,
    ]


def test_predictions_figure_shows_each_image_in_its_place_titled_predicted_over_true_red_where_wrong():
    import torch
    from matplotlib import pyplot

    from mlp.data import CLASS_NAMES
    from mlp.plots import predictions_figure

    images = torch.rand(10, 784) * 3 - 1  # normalised images: any range, each shown scaled to its own
    predicted, true = torch.arange(10), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 9, 8])
    figure = predictions_figure(images, predicted, true, columns=4)
    (axes,) = figure.axes
    grid = torch.from_numpy(axes.images[0].get_array().data)
    assert grid.shape == (3 * (14 + 28), 4 * 30)  # three rows of four, each image under its title band
    for k, image in enumerate(images):
        row, column = divmod(k, 4)
        shown = grid[row * 42 + 14 : (row + 1) * 42, column * 30 + 1 : column * 30 + 29]
        scaled = (image - image.min()) / (image.max() - image.min())
        assert torch.allclose(shown, scaled.reshape(28, 28), atol=1e-6)
    assert (grid[:14] == 1).all() and (grid[84:, 60:] == 1).all()  # title bands and the empty places are blank
    titles = [(text.get_text(), text.get_color()) for text in axes.texts]
    assert titles[:8] == [(f"{CLASS_NAMES[k]}\n{CLASS_NAMES[k]}", "black") for k in range(8)]
    assert titles[8:] == [("Bag\nAnkle boot", "red"), ("Ankle boot\nBag", "red")]
    pyplot.close(figure)


def test_val_size_zero_trains_on_everything_without_validation_and_tests_the_final_weights(synthetic_dir, tmp_path,
                                                                                           capsys):
    args = fit_args(synthetic_dir, tmp_path / "logs", "--model.depth=1", "--model.width=32")
    results = fit.main([*args, "--data.val_size=0"])

    assert results["test/acc"] > 0.9
    run = tmp_path / "logs" / "fit" / "version_0"
    assert "epoch02.ckpt" in {p.name for p in (run / "checkpoints").iterdir()}  # the third and last epoch
    assert "val/acc" not in EventAccumulator(str(run)).Reload().Tags()["scalars"]
    assert "epoch02.ckpt" in capsys.readouterr().out


def test_fit_trains_tests_and_writes_logs_checkpoints_and_config(synthetic_dir, tmp_path, capfd):
    log_dir = tmp_path / "logs"
    results = fit.main(fit_args(synthetic_dir, log_dir, "--model.depth=1", "--model.width=32"))

    assert results["test/acc"] > 0.9  # the bands are easy to tell apart; an untrained net scores ~0.1
    run = log_dir / "fit" / "version_0"
    assert (run / "config.yaml").read_text().count("width: 32") == 1
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and any(name.startswith("epoch") for name in checkpoints)

    events = EventAccumulator(str(run)).Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {"train/loss_step", "train/loss_epoch", "train/acc", "val/loss", "val/acc", "hp_metric",
                "test/acc", "test/loss", "train/examples_per_sec"}
    assert expected <= scalars
    assert {"activations", "test/confusion_matrix", "test/predictions"} <= set(events.Tags()["images"])
    assert len(events.Images("activations")) == 1  # once per run
    best_val = max(e.value for e in events.Scalars("val/acc"))
    assert events.Scalars("hp_metric")[-1].value == pytest.approx(best_val)

    printed, logged = capfd.readouterr()
    assert f"test accuracy {results['test/acc']:.4f}" in printed
    assert str(run) in printed
    assert "Tip:" not in printed + logged  # Lightning's advertisements (litlogger, litmodels) are filtered out


def test_fit_trains_with_manual_backward_tanh_and_dropout(synthetic_dir, tmp_path):
    from mlp.module import MLPClassifier

    log_dir = tmp_path / "logs"
    flags = ["--model.backward=manual", "--model.activation=tanh", "--model.dropout=0.2"]
    results = fit.main(fit_args(synthetic_dir, log_dir, "--model.depth=1", "--model.width=32", *flags))

    assert results["test/acc"] > 0.9
    run = log_dir / "fit" / "version_0"
    config = (run / "config.yaml").read_text()
    assert "backward: manual" in config and "activation: tanh" in config and "dropout: 0.2" in config
    model = MLPClassifier.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert not model.automatic_optimization and model.net.activation == "tanh" and model.net.dropout == 0.2


def test_training_metrics_measured_once_an_epoch_equal_step_by_step_updates(synthetic_dir, tmp_path):
    """The module updates its training metrics once an epoch from the collected step outputs; this updates
    fresh torchmetrics objects after every step instead, the usual way, and expects the same figures."""
    import lightning as L
    from torchmetrics import MeanMetric
    from torchmetrics.classification import MulticlassAccuracy

    from mlp.cli import build_cli

    class StepByStep(L.Callback):
        def __init__(self) -> None:
            self.loss, self.acc = MeanMetric(), MulticlassAccuracy(10, average="micro")
            self.expected, self.logged = [], []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            loss, preds, y = module.train_step_outputs[-1]
            self.loss.update(loss, weight=len(y))
            self.acc.update(preds, y)

        def on_train_epoch_end(self, trainer, module) -> None:  # Lightning calls this before the module's hook
            self.expected.append((self.loss.compute().item(), self.acc.compute().item()))
            self.loss.reset(), self.acc.reset()

        def on_train_epoch_start(self, trainer, module) -> None:
            if trainer.current_epoch > 0:
                self.on_train_end(trainer, module)

        def on_train_end(self, trainer, module) -> None:  # what the module logged for the epoch just ended
            metrics = trainer.callback_metrics
            self.logged.append((metrics["train/loss_epoch"].item(), metrics["train/acc"].item()))

    # 700 training images in batches of 32: the last batch holds 28, so the loss mean must be weighted
    cli = build_cli(fit_args(synthetic_dir, tmp_path / "logs", "--model.depth=1", "--model.width=8",
                             "--trainer.max_epochs=2"))
    recorder = StepByStep()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    assert len(recorder.logged) == len(recorder.expected) == 2
    for (logged_loss, logged_acc), (loss, acc) in zip(recorder.logged, recorder.expected):
        assert logged_loss == pytest.approx(loss, rel=1e-6) and logged_acc == pytest.approx(acc, rel=1e-6)
    assert not cli.model.train_step_outputs  # released at the end of every epoch


def test_runs_built_in_one_process_share_the_parser_and_nothing_else(synthetic_dir, tmp_path):
    from mlp.cli import build_cli

    # A run without validation changes its own config (no monitor, the final epoch's file name) and has its own
    # depth and callbacks; the next run, parsed by the same parser, keeps the defaults.
    first = build_cli(fit_args(synthetic_dir, tmp_path / "a", "--data.val_size=0", "--model.depth=3"))
    second = build_cli(fit_args(synthetic_dir, tmp_path / "b"))
    assert first.parser is second.parser
    assert first.config_init["checkpoint"].monitor is None and first.model.hparams.depth == 3
    assert second.config_init["checkpoint"].monitor == "val/acc" and second.model.hparams.depth == 2
    assert second.config.checkpoint.filename == "epoch{epoch:02d}-val_acc{val/acc:.4f}"
    assert second.trainer.limit_val_batches == 1.0 and second.trainer.log_dir.startswith(str(tmp_path / "b"))
    assert not {id(c) for c in first.trainer.callbacks} & {id(c) for c in second.trainer.callbacks}


def test_checkpoint_reloads_alone(synthetic_dir, tmp_path):
    from mlp.module import MLPClassifier

    log_dir = tmp_path / "logs"
    fit.main(fit_args(synthetic_dir, log_dir, "--model.depth=2", "--model.width=16", "--trainer.max_epochs=1"))
    model = MLPClassifier.load_from_checkpoint(log_dir / "fit" / "version_0" / "checkpoints" / "last.ckpt")
    assert (model.hparams.depth, model.hparams.width) == (2, 16)


@pytest.mark.skipif(not real_data_available(), reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist")
def test_one_epoch_on_real_fashion_mnist_beats_80_percent(tmp_path):
    shutil.rmtree(tmp_path)
    args = fit_args(tmp_path / "data", tmp_path / "logs", "--model.depth=1", "--model.width=256",
                    "--trainer.max_epochs=1")
    results = fit.main([*args, "--data.val_size=5000", "--data.batch_size=256"])
    assert results["test/acc"] > 0.80


def test_ensemble_script_tests_the_average_of_fit_runs_once(synthetic_dir, tmp_path):
    import torch

    from mlp.errors import UserError
    from mlp.module import MLPClassifier

    log_dir = tmp_path / "logs"
    tested = [
        fit.main(fit_args(synthetic_dir, log_dir, "--model.depth=1", "--model.width=4", "--trainer.max_epochs=1",
                          "--model.lr=0.01", f"--seed_everything={seed}"))["test/acc"]
        for seed in (1, 2)
    ]
    checkpoints = [str(next((log_dir / "fit" / f"version_{v}" / "checkpoints").glob("epoch*.ckpt"))) for v in (0, 1)]

    alone = ensemble.main([checkpoints[0]])
    assert alone["test_acc"] == pytest.approx(tested[0], abs=1e-6)  # as Lightning's trainer.test measured it
    both = ensemble.main(checkpoints)
    data = FashionMNISTDataModule(str(synthetic_dir), val_size=100)
    data.setup("test")
    x, y = data.test_set.tensors
    with torch.no_grad():
        average = sum(MLPClassifier.load_from_checkpoint(c).eval()(x).softmax(1) for c in checkpoints) / 2
    assert both["test_acc"] == pytest.approx((average.argmax(1) == y).float().mean().item(), abs=1e-6)
    assert 0 < both["val_acc"] <= 1

    fit.main(fit_args(synthetic_dir, log_dir, "--model.width=4", "--trainer.max_epochs=1", "--data.val_size=0"))
    refit = str(next((log_dir / "fit" / "version_2" / "checkpoints").glob("epoch*.ckpt")))
    with pytest.raises(UserError, match="different validation splits"):
        ensemble.main([checkpoints[0], refit])
    with pytest.raises(UserError, match="not found"):
        ensemble.main([str(tmp_path / "nothing.ckpt")])
    with pytest.raises(UserError, match="is a file, not a folder; pass a folder with --data_dir$"):  # not fit.py's
        ensemble.main([checkpoints[0], f"--data_dir={refit}"])


def test_ckpt_path_last_resumes_the_newest_run_that_saved_a_checkpoint_and_never_restarts(synthetic_dir, tmp_path):
    import torch

    from mlp.errors import UserError

    log_dir = tmp_path / "logs"
    # A constant learning rate: a one-cycle schedule is made for the first run's epochs and cannot be extended.
    args = fit_args(synthetic_dir, log_dir, "--model.depth=1", "--model.width=8", "--model.schedule=constant")
    with pytest.raises(UserError, match="no run in .* saved a checkpoint to resume"):
        fit.main([*args, "--ckpt_path=last"])  # nothing to resume yet

    fit.main([*args, "--trainer.max_epochs=1"])
    with pytest.raises(UserError, match="val_size must be below"):
        fit.main([*args, "--data.val_size=70000"])  # fails in setup, before any step
    # What a run stopped before its first checkpoint leaves behind: a newer folder with no checkpoint in it.
    (log_dir / "fit" / "version_5").mkdir(parents=True)
    (log_dir / "fit" / "version_5" / "config.yaml").write_text("")

    runs = sorted((log_dir / "fit").iterdir())

    fit.main([*args, "--trainer.max_epochs=2", "--ckpt_path=last"])
    last = torch.load(log_dir / "fit" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 1 and last["global_step"] == 2 * 22  # one more epoch on top of the first
    assert sorted((log_dir / "fit").iterdir()) == runs  # continued in version_0's folder


def test_a_run_resumes_only_as_it_began_and_any_other_file_is_one_clear_error(synthetic_dir, tmp_path):
    import torch

    from mlp.errors import UserError

    log_dir = tmp_path / "logs"
    args = fit_args(synthetic_dir, log_dir, "--model.depth=1", "--model.width=8", "--trainer.max_epochs=1")
    fit.main(args)
    last = log_dir / "fit" / "version_0" / "checkpoints" / "last.ckpt"
    (tmp_path / "empty.ckpt").touch()
    torch.save({"epoch": 3}, tmp_path / "other.ckpt")
    (tmp_path / "photo.ckpt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))  # a photo, under a checkpoint's name
    (tmp_path / "cut.ckpt").write_bytes(last.read_bytes()[:1000])  # a copy cut short: it had said "RuntimeError"
    refused = {
        "nowhere.ckpt": "--ckpt_path checkpoint .*nowhere.ckpt not found",
        "logs": "--ckpt_path checkpoint .*logs is a folder; pass .ckpt files",  # it had said "not found"
        "empty.ckpt": "--ckpt_path .*empty.ckpt is not a checkpoint",
        "photo.ckpt": "--ckpt_path .*photo.ckpt is not a checkpoint; pass a .ckpt file",
        "other.ckpt": "--ckpt_path .*other.ckpt is not a checkpoint as fit.py or tune.py write it",
        "cut.ckpt": r"cut.ckpt is not a checkpoint, or one cut short \(PytorchStreamReader failed reading zip archive",
    }
    for name, message in refused.items():
        with pytest.raises(UserError, match=message):
            fit.main([*args, f"--ckpt_path={tmp_path / name}"])
    with pytest.raises(UserError, match=r"began with --model.width 8 \(now 16\), --data.seed 0 \(now 1\): resume"):
        fit.main([*args, "--model.width=16", "--data.seed=1", f"--ckpt_path={last}"])
    # The one-cycle schedule was made for one epoch's steps: two would step past its end.
    with pytest.raises(UserError, match="schedule was made for another number of optimiser steps"):
        fit.main([*args, "--trainer.max_epochs=2", f"--ckpt_path={last}"])
    weights = torch.load(last, weights_only=True)
    torch.save({key: weights[key] for key in ("hyper_parameters", "datamodule_hyper_parameters", "state_dict")},
               tmp_path / "weights.ckpt")  # as tune.py saves a stacked trial's
    with pytest.raises(UserError, match="weights.ckpt holds a model's weights alone"):
        fit.main([*args, f"--ckpt_path={tmp_path / 'weights.ckpt'}"])
    fit.main([*args, f"--ckpt_path={last}"])  # as it began: the run had ended, so it only tests again


def test_runs_built_from_other_classes_get_a_parser_of_their_own(synthetic_dir, tmp_path, monkeypatch):
    from mlp.cli import build_cli
    from mlp.module import MLPClassifier

    args = fit_args(synthetic_dir, tmp_path / "logs")
    first = build_cli(args)

    class OtherData(FashionMNISTDataModule):
        pass

    class OtherModel(MLPClassifier):
        pass

    monkeypatch.setattr("mlp.classes.DATA", OtherData)
    monkeypatch.setattr("mlp.classes.MODEL", OtherModel)
    other = build_cli(args)
    assert type(other.datamodule) is OtherData and type(other.model) is OtherModel
    assert other.parser is not first.parser


def test_the_model_takes_its_input_size_from_the_data_module_and_reloads_alone(synthetic_dir, tmp_path, monkeypatch):
    from mlp.cli import build_cli
    from mlp.module import MLPClassifier

    cli = build_cli(fit_args(synthetic_dir, tmp_path / "logs", "--model.depth=1", "--model.width=8"))
    assert "--model.input_size" not in cli.parser.format_help()  # linked, not a flag of its own
    assert cli.model.hparams.input_size == cli.datamodule.input_size == 784

    class HalfImages(FashionMNISTDataModule):  # a fork's data module serving 392 numbers an example
        input_size = 392

    monkeypatch.setattr("mlp.classes.DATA", HalfImages)
    cli = build_cli(fit_args(synthetic_dir, tmp_path / "logs", "--model.depth=1", "--model.width=8"))
    assert cli.model.net.layers[0][0].shape == (392, 8)
    checkpoint = tmp_path / "model.ckpt"
    cli.trainer.strategy.connect(cli.model)
    cli.trainer.save_checkpoint(checkpoint)
    assert MLPClassifier.load_from_checkpoint(checkpoint).net.layers[0][0].shape == (392, 8)


def test_the_step_schedule_quarters_the_rate_where_the_published_record_did():
    """Nøkland & Eidnes' Adam schedule: x0.25 at epochs 100, 150, 175 and 188 of 200, here as fractions of the run."""
    from mlp.module import MLPClassifier

    config = MLPClassifier(depth=0, optimizer="adam", lr=1e-3, schedule="step").optimizer_and_schedule(steps=200)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(200):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    changes = [step for step in range(1, 200) if rates[step] != rates[step - 1]]
    assert changes == [100, 150, 175, 188]
    assert rates[0] == 1e-3 and rates[-1] == pytest.approx(1e-3 * 0.25**4)


def test_enable_progress_bar_false_hides_our_bar_rather_than_failing(synthetic_dir, tmp_path):
    from mlp.cli import build_cli

    # Lightning refuses the flag beside a progress bar callback, which ours (`--progress_bar.*`) is.
    cli = build_cli(fit_args(synthetic_dir, tmp_path, "--trainer.enable_progress_bar=false"))
    assert cli.trainer.progress_bar_callback.is_disabled


def test_the_shipped_best_mlp_config_builds_its_run_on_all_training_images(synthetic_dir, tmp_path):
    from mlp.cli import build_cli

    config = Path(__file__).resolve().parent.parent / "configs" / "best_mlp.yaml"
    cli = build_cli([f"--config={config}", f"--data.data_dir={synthetic_dir}",
                     f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert cli.model.hparams.batch_norm and cli.model.hparams.width == 1000 and cli.trainer.max_epochs == 40
    assert cli.datamodule.hparams.val_size == 0 and not cli.trainer.limit_val_batches  # the refit: nothing held out


def test_without_a_logger_a_second_run_is_refused_and_ckpt_path_last_resumes_the_first(synthetic_dir, tmp_path):
    # The second run had overwritten the first's last.ckpt; --ckpt_path last then ended in a traceback of the
    # weights' shapes, and after Ctrl-C trained from scratch (Lightning's "last" never looks at on_exception.ckpt).
    root = tmp_path / "root"
    args = fit_args(synthetic_dir, tmp_path / "logs", "--model.depth=1", "--model.width=4", "--trainer.max_epochs=1",
                    "--trainer.logger=false", f"--trainer.default_root_dir={root}", "--model.schedule=constant")
    fit.main(args)
    before = {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}
    with pytest.raises(UserError, match=f"{root} holds a run already, .*--trainer.default_root_dir, or continue"):
        fit.main([*args, "--model.width=8"])
    with pytest.raises(UserError, match="--ckpt_path .*last.ckpt began with --model.width 4 .now 8."):
        fit.main([*args, "--model.width=8", "--ckpt_path=last"])
    assert {path: path.read_bytes() for path in root.rglob("*") if path.is_file()} == before
    (root / "checkpoints" / "last.ckpt").rename(root / "checkpoints" / "on_exception.ckpt")  # as Ctrl-C leaves it
    fit.main([*args, "--trainer.max_epochs=2", "--ckpt_path=last"])
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1  # the second epoch's end


def test_resuming_a_run_from_a_checkpoint_it_went_past_in_its_own_folder_is_refused(synthetic_dir, tmp_path):
    # A resumed run's config.yaml names its folder and the checkpoint it resumed from: run again, it had trained
    # from there once more in that folder, over the later last.ckpt and beside its best.
    args = fit_args(synthetic_dir, tmp_path / "logs", "--model.depth=1", "--model.width=4", "--model.schedule=constant")
    fit.main([*args, "--trainer.max_epochs=1"])
    checkpoints = tmp_path / "logs" / "fit" / "version_0" / "checkpoints"
    shutil.copy(checkpoints / "last.ckpt", tmp_path / "early.ckpt")
    fit.main([*args, "--trainer.max_epochs=2", "--ckpt_path=last"])
    early = shutil.copy(tmp_path / "early.ckpt", checkpoints / "on_exception.ckpt")  # as a Ctrl-C in epoch 1 left it
    before = {path: path.read_bytes() for path in checkpoints.iterdir()}
    with pytest.raises(UserError, match="its run went on past it, to .*last.ckpt, which resuming in that run's"):
        fit.main([*args, "--trainer.max_epochs=2", "--trainer.logger.init_args.version=0", f"--ckpt_path={early}"])
    assert {path: path.read_bytes() for path in checkpoints.iterdir()} == before
    fit.main([*args, "--trainer.max_epochs=2", f"--ckpt_path={early}"])  # in a new folder: no run's files in the way
    assert (tmp_path / "logs" / "fit" / "version_1" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("version", ["myrun", "0"])
def test_a_new_run_in_a_named_run_folder_that_holds_a_run_is_refused_and_that_run_kept(synthetic_dir, tmp_path,
                                                                                        version):
    # The second run had written its checkpoints beside the first's, over its last.ckpt and config.yaml.
    args = fit_args(synthetic_dir, tmp_path / "logs", "--model.depth=1", "--model.width=4", "--trainer.max_epochs=1",
                    f"--trainer.logger.init_args.version={version}")
    fit.main(args)
    folder = tmp_path / "logs" / "fit" / ("version_0" if version == "0" else version)
    before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    with pytest.raises(UserError, match=f"{folder} holds a run already, .*--ckpt_path last"):
        fit.main([*args, "--model.lr=0.01"])
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before
    # One stopped before it saved a checkpoint (Ctrl-C in the sanity check) is no run: its rerun, as its message
    # asks, trains there.
    shutil.rmtree(folder / "checkpoints")
    assert "test/acc" in fit.main([*args, "--model.lr=0.01"])


def test_a_run_into_a_folder_another_process_trains_into_is_refused_until_it_ends(synthetic_dir, tmp_path):
    # Two fit.py in one run folder at once (one --trainer.logger.init_args.version, or --ckpt_path last twice) both
    # passed the check for a run's checkpoints before either saved one, and the later overwrote the other's.
    import fcntl

    args = fit_args(synthetic_dir, tmp_path / "logs", "--model.depth=1", "--model.width=4", "--trainer.max_epochs=1",
                    "--model.schedule=constant", "--trainer.logger.init_args.version=mine")
    folder = tmp_path / "logs" / "fit" / "mine"
    folder.mkdir(parents=True)
    for tries in ([], ["--trainer.max_epochs=2", "--ckpt_path=last"]):
        with open(folder / "training.lock", "w") as training:  # as a fit.py training there in another process holds it
            fcntl.flock(training, fcntl.LOCK_EX)
            before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
            with pytest.raises(UserError, match=f"another process is training into {folder}: wait for it to end"):
                fit.main([*args, *tries])
            assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before
        # Its file, left as by a process killed there, refuses nothing, and the run that ends takes it away.
        assert "test/acc" in fit.main([*args, *tries]) and not (folder / "training.lock").exists()
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1  # resumed to epoch 2


def test_a_lock_its_holder_let_go_of_as_this_process_opened_it_is_refused(tmp_path, monkeypatch):
    # The holder removes the file as it lets go: locked after that, it is no longer the file a third process opens.
    import fcntl

    from mlp.cli import held_alone

    flock = fcntl.flock

    def holder_lets_go_first(file, operation):
        (tmp_path / "run.lock").unlink()
        flock(file, operation)

    monkeypatch.setattr(fcntl, "flock", holder_lets_go_first)
    with pytest.raises(UserError, match="busy"):
        with held_alone(tmp_path / "run.lock", "busy"):
            pass
