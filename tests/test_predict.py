"""The study's answer as a model: loaded from report.json or checkpoints, used on raw images by scripts/predict.py,
and exported as one file that runs without this project; on synthetic data in seconds."""

import csv
import json
import os
import site
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image, ImageOps

from mlp.answer import Answer, Member, answer_checkpoints, export, load_answer
from mlp.data import CLASS_NAMES, FashionMNISTDataModule, load_split, locate_fashion_mnist
from mlp.errors import UserError, run_script
from mlp.images import read_images
from mlp.loading import load_model
from mlp.module import MLPClassifier
from mlp.net import MLP
from tests.conftest import Payload, real_data_available, write_idx, write_synthetic_dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import ensemble  # noqa: E402
import fit  # noqa: E402
import predict  # noqa: E402
import tune  # noqa: E402

FINAL_MODELS = ("refit_ensemble", "ensemble", "refit", "best")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """The folder of a finished two-trial study on synthetic data, run as a user runs tune.py: from its own
    folder, with the default relative log folder, so report.json holds paths relative to that folder."""
    home = tmp_path_factory.mktemp("study")
    data_dir = write_synthetic_dataset(home / "data")
    args = [
        "--n-trials=2", "--pruner=none", "--study-name=test", "--quiet", "--lr", "0.003", "0.03",
        "--model.depth=1", "--model.width=8", "--trainer.max_epochs=1",
        f"--data.data_dir={data_dir}", "--data.val_size=100", "--data.batch_size=32",
    ]
    cwd = Path.cwd()
    os.chdir(home)
    try:
        tune.main(args)
    finally:
        os.chdir(cwd)
    return home / "lightning_logs" / "tune" / "test"


def fashion_mnist_like() -> Image.Image:
    """A 28x28 image of a light item on black, taken as it is."""
    return ImageOps.expand(Image.new("L", (20, 20), 255), border=4)


def raw_test_images(data_dir: Path, cache_dir: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split as stored: uint8 images (N, 28, 28) and their labels, not standardised."""
    return load_split(locate_fashion_mnist(data_dir), "test", cache_dir or data_dir)


def accuracy(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    return (probabilities.argmax(dim=1) == labels).float().mean().item()


def test_each_final_model_of_a_study_scores_its_reported_test_acc_on_raw_images(study):
    report = json.loads((study / "report.json").read_text())
    images, labels = raw_test_images(study.parents[2] / "data")

    for name in FINAL_MODELS:
        model = load_answer(study, answer=name)
        assert accuracy(model(images), labels) == pytest.approx(report["final"][name]["test_acc"], abs=1e-4), name
    answer = load_answer(study / "report.json")
    probabilities = answer(images)
    assert accuracy(probabilities, labels) == pytest.approx(report["test_acc"], abs=1e-4)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(len(images)))
    # Float pixels in [0, 1], as rows, are the same images.
    assert torch.allclose(answer(images.reshape(-1, 784).float() / 255), probabilities, atol=1e-6)
    with pytest.raises(ValueError, match="784 pixels"):
        answer(images[:, :27])


def test_each_member_standardises_images_as_its_own_training_split_did(study):
    """A trial trained on 100 fewer images than a refit: their means differ, and each member keeps its own."""
    report = json.loads((study / "report.json").read_text())
    trial, refit = report["best_checkpoint"], report["final"]["refit"]["checkpoint"]
    cwd = Path.cwd()
    os.chdir(study.parents[2])  # where the study ran, so that the report's relative paths resolve
    try:
        model = load_answer([trial, refit])
        splits = [FashionMNISTDataModule(str(study.parents[2] / "data"), val_size=n) for n in (100, 0)]
        expected = []
        for checkpoint, data in zip((trial, refit), splits):
            data.setup("test")
            net = MLPClassifier.load_from_checkpoint(checkpoint, map_location="cpu").eval()
            with torch.no_grad():
                expected.append(net(data.test_set.tensors[0]).softmax(dim=1))
    finally:
        os.chdir(cwd)

    assert [member.mean.item() for member in model.members] == [data.mean for data in splits]
    assert [member.std.item() for member in model.members] == [data.std for data in splits]
    assert splits[0].mean != splits[1].mean
    images, _ = raw_test_images(study.parents[2] / "data")
    assert torch.allclose(model(images), torch.stack(expected).mean(dim=0), atol=1e-6)


def test_an_answer_of_nets_of_every_activation_and_depth_exports_and_predicts_as_the_module(tmp_path):
    nets = [MLP(784, depth, 16, 10, activation=activation, batch_norm=batch_norm).eval()
            for depth, activation, batch_norm in ((0, "relu", False), (1, "prelu", False), (2, "sigmoid", False),
                                                  (1, "tanh", False), (2, "leaky_relu", False), (2, "relu", True))]
    with torch.no_grad():  # statistics as training would leave them, not the identity they start as
        nets[-1].running_mean.normal_(0, 0.5)
        nets[-1].running_var.uniform_(0.5, 2)
    standardisations = [(0.2, 0.3), (0.3, 0.35), (0.25, 0.4), (0.3, 0.3), (0.28, 0.33), (0.3, 0.32)]
    model = Answer([Member(net, mean, std) for net, (mean, std) in zip(nets, standardisations)])
    images = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)

    export(model, tmp_path / "answer.pt2")

    exported = torch.export.load(tmp_path / "answer.pt2").module()
    assert torch.allclose(exported(images), model(images), atol=1e-6, rtol=0)
    pixels = images.reshape(-1, 784).float() / 255
    by_hand = [net((pixels - mean) / std).softmax(dim=1) for net, (mean, std) in zip(nets, standardisations)]
    assert torch.allclose(model(images), torch.stack(by_hand).mean(dim=0), atol=1e-6)


def run_without_the_project(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Python code run in a fresh interpreter that sees torch but not this project: -I ignores PYTHONPATH and
    the current folder, -S skips site's .pth files, among them the editable install's path to `mlp`."""
    path = f"import sys; sys.path += {site.getsitepackages()!r}\n"
    return subprocess.run([sys.executable, "-I", "-S", "-c", path + NO_PROJECT + code], cwd=cwd, capture_output=True,
                          text=True)


NO_PROJECT = """
try:
    import mlp
except ImportError:
    pass
else:
    raise SystemExit(f"mlp is importable from {mlp.__file__}")
"""


def test_the_exported_answer_runs_without_the_project_and_predicts_as_the_module(study, tmp_path):
    report = json.loads((study / "report.json").read_text())
    images, labels = raw_test_images(study.parents[2] / "data")
    torch.save(images, tmp_path / "images.pt")
    predict.main([str(study), "--export", str(tmp_path / "answer.pt2")])

    code = """
import torch
model = torch.export.load("answer.pt2").module()
torch.save(model(torch.load("images.pt")), "probabilities.pt")
"""
    finished = run_without_the_project(code, tmp_path)

    assert finished.returncode == 0, finished.stderr
    exported = torch.load(tmp_path / "probabilities.pt")
    assert torch.allclose(exported, load_answer(study)(images), atol=1e-6, rtol=0)
    assert accuracy(exported, labels) == pytest.approx(report["test_acc"], abs=1e-4)


def test_the_answer_exported_as_onnx_runs_in_onnxruntime_without_the_project_and_predicts_as_the_module(
    study, tmp_path
):
    for package in ("onnxscript", "onnxruntime"):
        pytest.importorskip(package, reason='the ONNX export is an optional extra: pip install -e ".[onnx]"')
    images, _ = raw_test_images(study.parents[2] / "data")
    numpy.save(tmp_path / "images.npy", images.numpy())
    predict.main([str(study), "--export", str(tmp_path / "answer.onnx")])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["answer.onnx", "images.npy"]  # no weights beside

    code = """
import numpy, onnxruntime
session = onnxruntime.InferenceSession("answer.onnx")
images = numpy.load("images.npy")
numpy.save("probabilities.npy", session.run(None, {"images": images})[0])
numpy.save("one.npy", session.run(None, {"images": images[:1]})[0])
"""
    finished = run_without_the_project(code, tmp_path)

    assert finished.returncode == 0, finished.stderr
    exported = torch.from_numpy(numpy.load(tmp_path / "probabilities.npy"))
    expected = load_answer(study)(images)
    assert torch.allclose(exported, expected, atol=1e-5, rtol=0)
    assert torch.equal(exported.argmax(dim=1), expected.argmax(dim=1))
    assert numpy.load(tmp_path / "one.npy").shape == (1, 10)  # any number of images, one included


def test_onnx_export_without_its_packages_says_how_to_install_them(study, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed: importing it raises ImportError

    with pytest.raises(SystemExit) as exit:
        run_script(lambda: predict.main([str(study), "--export", str(tmp_path / "answer.onnx")]), interrupted="")

    assert len(exit.value.code.splitlines()) == 1 and 'pip install -e ".[onnx]"' in exit.value.code
    assert not (tmp_path / "answer.onnx").exists()


@pytest.mark.parametrize("batch_norm", [False, True])  # with it, the test needs the checkpoint's running statistics
def test_fit_best_checkpoint_loads_and_exports_with_its_test_accuracy(synthetic_dir, tmp_path, batch_norm):
    results = fit.main([
        f"--data.data_dir={synthetic_dir}", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--data.val_size=100", "--data.batch_size=32", "--model.depth=1", "--model.width=8",
        "--trainer.max_epochs=1", "--progress_bar.refresh_rate=0", f"--model.batch_norm={batch_norm}",
    ])
    (best,) = (tmp_path / "logs" / "fit" / "version_0" / "checkpoints").glob("epoch*.ckpt")
    images, labels = raw_test_images(synthetic_dir)

    model = load_answer([best])
    assert accuracy(model(images), labels) == pytest.approx(results["test/acc"], abs=1e-4)
    export(model, tmp_path / "fit.pt2")
    exported = torch.export.load(tmp_path / "fit.pt2").module()
    assert torch.allclose(exported(images), model(images), atol=1e-6, rtol=0)
    assert exported(images[:1]).shape == (1, 10)  # any number of images, one included


def test_a_checkpoint_carries_its_standardisation_so_predict_reads_no_training_images(
    synthetic_dir, tmp_path, no_download, monkeypatch
):
    """fit.py's checkpoints hold the data module's state_dict, the split's mean and standard deviation: predict
    needs no training images, and creates nothing where they were. One without them (an older checkpoint, or a
    stacked trial's) recomputes them from the training images, and asks for --data_dir when they are gone."""
    fit.main([
        f"--data.data_dir={synthetic_dir}", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--data.val_size=100", "--model.depth=1", "--model.width=8", "--trainer.max_epochs=1",
        "--progress_bar.refresh_rate=0",
    ])
    (best,) = (tmp_path / "logs" / "fit" / "version_0" / "checkpoints").glob("epoch*.ckpt")
    data = FashionMNISTDataModule(str(synthetic_dir), val_size=100)
    data.setup("fit")
    content = torch.load(best, map_location="cpu", weights_only=True)
    assert content["FashionMNISTDataModule"] == {"mean": data.mean, "std": data.std}
    without = {key: value for key, value in content.items() if key != "FashionMNISTDataModule"}
    torch.save(without, tmp_path / "without.ckpt")
    monkeypatch.setattr("mlp.data.DEBIAN_DIR", tmp_path / "nowhere")
    synthetic_dir.rename(tmp_path / "moved")
    fashion_mnist_like().save(tmp_path / "black.png")

    model = load_answer([best])
    assert (model.members[0].mean.item(), model.members[0].std.item()) == pytest.approx((data.mean, data.std))
    assert len(predict.main([str(best), str(tmp_path / "black.png")])) == 1
    assert not synthetic_dir.exists()  # nothing created or downloaded where the training images were

    with pytest.raises(SystemExit) as exit:
        run_script(lambda: predict.main([str(tmp_path / "without.ckpt"), str(tmp_path / "black.png")]), interrupted="")
    assert len(exit.value.code.splitlines()) == 1 and "pass their folder with --data_dir" in exit.value.code
    with pytest.raises(SystemExit) as exit:  # a --data_dir that is no such folder: why, as ensemble.py says it
        run_script(lambda: predict.main([str(tmp_path / "without.ckpt"), str(tmp_path / "black.png"), "--data_dir",
                                         str(tmp_path / "black.png")]), interrupted="")
    assert len(exit.value.code.splitlines()) == 1 and "black.png is a file, not a folder" in exit.value.code
    recomputed = load_answer([tmp_path / "without.ckpt"], data_dir=str(tmp_path / "moved")).members[0]
    assert (recomputed.mean, recomputed.std) == (model.members[0].mean, model.members[0].std)


def test_predict_prints_the_class_of_test_images_given_as_png_jpeg_and_idx(study, tmp_path, capsys):
    images, labels = raw_test_images(study.parents[2] / "data")
    pngs = []
    for i in range(4):
        pngs.append(tmp_path / f"test{i}.png")
        Image.fromarray(images[i].numpy()).save(pngs[-1])
    Image.fromarray(images[0].numpy()).convert("RGB").save(tmp_path / "colour.jpg")
    write_idx(tmp_path / "some-images-idx3-ubyte.gz", images[:3])

    rows = predict.main([str(study), *map(str, pngs), str(tmp_path / "colour.jpg"),
                         str(tmp_path / "some-images-idx3-ubyte.gz")])

    probabilities, predicted = load_answer(study)(images[:4]).max(dim=1)
    lines = capsys.readouterr().out.splitlines()
    for png, c, p, line in zip(pngs, predicted, probabilities, lines):
        assert line == f"{png}: {CLASS_NAMES[c]} ({p:.4f})"
    assert [name for name, _, _ in rows[4:]] == [
        str(tmp_path / "colour.jpg"), *(f"{tmp_path / 'some-images-idx3-ubyte.gz'}[{i}]" for i in range(3))
    ]
    assert [c for _, c, _ in rows[5:]] == [CLASS_NAMES[c] for c in predicted[:3]]
    assert len(lines) == 8
    assert accuracy(load_answer(study)(images[:4]), labels[:4]) > 0.7  # it learned the bands, so the lines say it


@pytest.mark.parametrize("log_folder", ["relative", "absolute"])
def test_a_study_folder_copied_elsewhere_loads_its_own_checkpoints(study, tmp_path, log_folder):
    """Trained on one machine, copied to another: report.json names the checkpoints, and itself, relative to the
    folder tune.py ran in (the default log folder) or by absolute paths (an absolute one)."""
    import shutil

    from mlp.answer import report_checkpoints

    copy = tmp_path / "elsewhere" / "study"
    shutil.copytree(study, copy)
    report = json.loads((study / "report.json").read_text())
    assert not Path(report["best_checkpoint"]).is_absolute()  # as tune.py wrote it, with the default log folder
    if log_folder == "absolute":  # as an absolute log folder has tune.py write every path
        ran_in = study.parents[2]
        report.update(report_json=str(ran_in / report["report_json"]),
                      best_checkpoint=str(ran_in / report["best_checkpoint"]))
        for candidate in report["final"].values():
            if isinstance(candidate, dict) and candidate.get("checkpoint"):
                candidate["checkpoint"] = str(ran_in / candidate["checkpoint"])
            if isinstance(candidate, dict) and candidate.get("checkpoints"):
                candidate["checkpoints"] = [str(ran_in / path) for path in candidate["checkpoints"]]
        (copy / "report.json").write_text(json.dumps(report))

    # It was refused: the checkpoints lay outside the copy's folder.
    answers = [answer for answer in FINAL_MODELS if report["final"][answer]["test_acc"] is not None]
    assert len(answers) == len(FINAL_MODELS)
    for answer in answers:
        assert all(path.is_relative_to(copy) and path.is_file() for path in report_checkpoints(copy, answer))
    images, _ = raw_test_images(study.parents[2] / "data")
    assert torch.equal(load_answer(copy)(images[:8]), load_answer(study)(images[:8]))


def product_photos(folder: Path, images: torch.Tensor) -> list[Path]:
    """Each image as a photo of the item: dark on white, 100x100, RGB, with a white margin, JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        photo = Image.new("RGB", (130, 110), "white")
        photo.paste(Image.fromarray(255 - image.numpy()).resize((100, 100)).convert("RGB"), (20, 5))
        paths.append(folder / f"photo{i}.jpg")
        photo.save(paths[-1], quality=90)
    return paths


def test_predict_prepares_photos_in_a_folder_says_so_once_and_saves_what_it_classified(study, tmp_path, capsys):
    images, _ = raw_test_images(study.parents[2] / "data")
    photos = product_photos(tmp_path / "photos", images[:3])
    (tmp_path / "photos" / "notes.txt").write_text("not an image, and not picked: its suffix is no image's")

    rows = predict.main([str(study), str(tmp_path / "photos"), "--top", "3", "--save-prepared", str(tmp_path / "seen")])

    out, err = capsys.readouterr()
    assert err.count("images prepared as Fashion-MNIST's were made") == 1 and len(err.splitlines()) == 1
    saved = [tmp_path / "seen" / f"{photo.name}-28x28.png" for photo in photos]
    assert sorted(tmp_path.joinpath("seen").iterdir()) == saved
    seen = torch.stack([torch.from_numpy(numpy.array(Image.open(path))) for path in saved])
    assert torch.equal(seen, torch.cat([read_images(photo, prepare_images=True) for photo in photos]))
    probabilities, predicted = load_answer(study)(seen).topk(3, dim=1)
    expected = [f"{photo}: " + ", ".join(f"{CLASS_NAMES[c]} ({p:.4f})" for c, p in zip(cs, ps))
                for photo, cs, ps in zip(photos, predicted.tolist(), probabilities.tolist())]
    assert out.splitlines() == expected
    assert [row[0] for row in rows] == list(map(str, photos)) and len(rows[0]) == 7

    # --no-prepare takes them as they are, which for photos is a refusal naming the size.
    with pytest.raises(SystemExit) as exit:
        run_script(lambda: predict.main([str(study), str(photos[0]), "--no-prepare"]), interrupted="")
    assert "images are 130x110 pixels; with --no-prepare" in exit.value.code


def test_a_refused_image_in_a_folder_is_skipped_saying_why_and_the_others_are_classified(study, tmp_path, capsys):
    # One such image had left the whole folder unclassified, with one error line.
    images, _ = raw_test_images(study.parents[2] / "data")
    photos = product_photos(tmp_path / "photos", images[:2])
    blank = tmp_path / "photos" / "blank.png"
    Image.new("RGB", (40, 30), "white").save(blank)

    rows = predict.main([str(study), str(tmp_path / "photos")])

    out, err = capsys.readouterr()
    assert [row[0] for row in rows] == list(map(str, photos)) and len(out.splitlines()) == 2
    assert f"skipped {blank}: the image is all one colour" in err
    with pytest.raises(UserError, match="all one colour"):  # named on its own, it is still refused
        predict.main([str(study), str(blank)])
    for photo in photos:
        photo.unlink()
    with pytest.raises(UserError, match="no image could be classified: each was skipped, saying why, above"):
        predict.main([str(study), str(tmp_path / "photos")])


def test_predict_top_k_writes_one_column_pair_per_rank(study, tmp_path):
    images, _ = raw_test_images(study.parents[2] / "data")
    write_idx(tmp_path / "images-idx3-ubyte", images[:4])

    predict.main([str(study), str(tmp_path / "images-idx3-ubyte"), "--top", "2", "--output", str(tmp_path / "o.csv")])

    with open(tmp_path / "o.csv", newline="") as file:
        written = list(csv.reader(file))
    assert written[0] == ["file", "class", "probability", "class_2", "probability_2"]
    probabilities, predicted = load_answer(study)(images[:4]).topk(2, dim=1)
    assert [row[1::2][:2] for row in written[1:]] == [[CLASS_NAMES[c] for c in cs] for cs in predicted.tolist()]
    assert [float(row[2]) >= float(row[4]) for row in written[1:]] == [True] * 4


@pytest.mark.parametrize("flag", ["--output", "--save-prepared", "--export"])
def test_predict_refuses_to_write_over_an_input_and_leaves_it_untouched(study, tmp_path, flag):
    images, _ = raw_test_images(study.parents[2] / "data")
    (photo,) = product_photos(tmp_path, images[:1])
    before = photo.read_bytes()
    target = {"--output": photo, "--export": photo, "--save-prepared": tmp_path}[flag]
    if flag == "--save-prepared":  # an input named as the image saved for another input would be
        Image.open(photo).save(tmp_path / "photo0.jpg-28x28.png")
    args = [str(study), str(photo), *([str(tmp_path / "photo0.jpg-28x28.png")] if flag == "--save-prepared" else []),
            flag, str(target)]

    with pytest.raises(SystemExit) as exit:
        run_script(lambda: predict.main(args), interrupted="")

    assert exit.value.code.startswith(f"error: {flag} ") and "is one of the input files" in exit.value.code
    assert len(exit.value.code.splitlines()) == 1 and photo.read_bytes() == before


def test_predict_refuses_to_export_over_the_report_or_a_checkpoint_a_study_folder_reads(study):
    """Named by its folder alone, a study's report.json and the answer's checkpoints are inputs all the same."""
    report = study / "report.json"
    for target in (report, answer_checkpoints(study)[0]):
        before = target.read_bytes()
        with pytest.raises(SystemExit) as exit:
            run_script(lambda: predict.main([str(study), "--export", str(target)]), interrupted="")
        assert "--export" in exit.value.code and "is one of the input files" in exit.value.code
        assert target.read_bytes() == before


@pytest.mark.parametrize(
    "case, expected",
    [
        ("folder without images", "holds no image files"),
        ("top 11", "--top must be 1-10"),
        ("save-prepared onto a file", "is a file; pass a folder"),
        ("export and output one file", "both name"),  # the CSV had overwritten the model just exported
        ("checkpoint after an image", "is a checkpoint among the images: the model comes first"),
        # It wrote the prepared image, then failed as the CSV met the folder ("Is a directory").
        ("output and save-prepared one path", "--output and --save-prepared both name"),
        # It had said tune.py writes report.json, of a fit run's folder.
        ("a fit run's folder", "holds no report.json (a study's) but checkpoints: pass them, e.g. "),
    ],
)
def test_bad_predict_options_are_one_line_and_a_nonzero_exit(study, tmp_path, case, expected):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for name in ("last.ckpt", "epoch00-val_acc0.5000.ckpt"):
        (tmp_path / "run" / "checkpoints" / name).write_bytes(b"")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    fashion_mnist_like().save(tmp_path / "fine.png")
    for pipe in ("pipe.png", "pipe.ckpt", "pipe.json"):
        os.mkfifo(tmp_path / pipe)
    args = {
        "folder without images": [str(study), str(tmp_path / "empty")],
        "top 11": [str(study), str(tmp_path / "fine.png"), "--top", "11"],
        "save-prepared onto a file": [str(study), str(tmp_path / "fine.png"), "--save-prepared",
                                      str(tmp_path / "empty" / "notes.txt")],
        "export and output one file": [str(study), str(tmp_path / "fine.png"), "--export", str(tmp_path / "a.pt2"),
                                       "--output", str(tmp_path / "a.pt2")],
        "checkpoint after an image": [str(tmp_path / "fine.png"), str(tmp_path / "model.ckpt")],  # "no image"
        "output and save-prepared one path": [str(study), str(tmp_path / "fine.png"), "--save-prepared",
                                              str(tmp_path / "out"), "--output", str(tmp_path / "out")],
        "a fit run's folder": [str(tmp_path / "run"), str(tmp_path / "fine.png")],
    }[case]

    with pytest.raises(SystemExit) as exit:
        run_script(lambda: predict.main(args), interrupted="nothing was written")

    assert isinstance(exit.value.code, str) and len(exit.value.code.splitlines()) == 1
    assert exit.value.code.startswith("error: ") and expected in exit.value.code
    assert not (tmp_path / "out").exists()
    if case == "a fit run's folder":
        assert exit.value.code.endswith("epoch00-val_acc0.5000.ckpt")  # the best by val/acc, not last.ckpt


@pytest.mark.skipif(not real_data_available(), reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist")
def test_predict_names_the_class_of_real_test_images_saved_as_png_after_a_short_fit(tmp_path, capsys):
    fit.main([
        f"--data.data_dir={tmp_path / 'data'}", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--model.depth=1", "--model.width=32", "--trainer.max_epochs=1", "--trainer.limit_train_batches=50",
        "--progress_bar.refresh_rate=0",
    ])
    (best,) = (tmp_path / "logs" / "fit" / "version_0" / "checkpoints").glob("epoch*.ckpt")
    images, labels = raw_test_images(tmp_path / "data", tmp_path)
    pngs = [tmp_path / f"test{i}.png" for i in range(4)]  # an ankle boot, a pullover and two trousers
    for png, image in zip(pngs, images):
        Image.fromarray(image.numpy()).save(png)
    capsys.readouterr()

    predict.main([str(best), *map(str, pngs)])

    lines = capsys.readouterr().out.splitlines()
    # What fit.py's own test pipeline predicts for the same images: standardised by its data module, its net.
    data = FashionMNISTDataModule(str(tmp_path / "data"))
    data.setup("test")
    model = MLPClassifier.load_from_checkpoint(best, map_location="cpu").eval()
    with torch.no_grad():
        probabilities = model.net(data.test_set.tensors[0][:4]).softmax(dim=1)
    best_probability, predicted = probabilities.max(dim=1)
    expected = [f"{png}: {CLASS_NAMES[c]}" for png, c in zip(pngs, predicted)]
    assert [line.rsplit(" (", 1)[0] for line in lines] == expected
    printed = [float(line.rsplit("(", 1)[1].rstrip(")")) for line in lines]
    assert printed == pytest.approx(best_probability.tolist(), abs=1e-4)
    # A 50-step net gets most of them right (1 in 10 by chance); which ones depends on the machine's arithmetic.
    assert sum(line.startswith(f"{png}: {CLASS_NAMES[y]} (") for line, png, y in zip(lines, pngs, labels)) >= 2


def test_predict_writes_csv_with_output(study, tmp_path, capsys):
    images, _ = raw_test_images(study.parents[2] / "data")
    write_idx(tmp_path / "images-idx3-ubyte", images[:5])

    rows = predict.main([str(study / "report.json"), str(tmp_path / "images-idx3-ubyte"),
                         "--output", str(tmp_path / "out.csv")])

    with open(tmp_path / "out.csv", newline="") as file:
        written = list(csv.reader(file))
    probabilities, predicted = load_answer(study)(images[:5]).max(dim=1)
    assert written[0] == ["file", "class", "probability"]
    assert [row[1] for row in written[1:]] == [CLASS_NAMES[c] for c in predicted]
    assert [float(row[2]) for row in written[1:]] == pytest.approx(probabilities.tolist(), abs=1e-6)
    assert len(rows) == 5 and "5 predictions written" in capsys.readouterr().out


def edited_report(study: Path, folder: Path, edit: Callable[[dict], object]) -> Path:
    """`folder` holding a copy of the study's report.json as `edit` changed it."""
    report = json.loads((study / "report.json").read_text())
    edit(report)
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def untested_report(study: Path, tmp_path: Path) -> Path:
    """A copy of the study's report whose every final model lacks a test figure, as when all checkpoints are gone."""

    def untested(report: dict) -> None:
        for name in FINAL_MODELS:
            report["final"][name].update(test_acc=None, why_no_test="its checkpoints are gone")
        report["final"].update(answer=None, test_acc=None)

    return edited_report(study, tmp_path / "untested", untested)


def small_idx(tmp_path: Path) -> Path:
    write_idx(tmp_path / "small-idx3-ubyte", torch.zeros(2, 5, 5))
    return tmp_path / "small-idx3-ubyte"


def best_checkpoint(study: Path) -> dict:
    """The content of the study's best checkpoint, as torch loads it."""
    report = json.loads((study / "report.json").read_text())
    return torch.load(study.parents[2] / report["best_checkpoint"], weights_only=True)  # relative to where it ran


def edited_checkpoint(study: Path, path: Path, edit: Callable[[dict], object]) -> Path:
    """A copy of the study's best checkpoint as `edit` changed it."""
    content = best_checkpoint(study)
    edit(content)
    torch.save(content, path)
    return path


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing image", "missing.png not found"),
        ("wrong size", "images are 32x28 pixels"),
        ("IDX file of another size", "images are 5x5 pixels; an IDX file's are taken as they are"),  # "--no-prepare"
        ("not an image", "neither an image (PNG, JPEG...) nor an IDX file"),
        ("untested study", "has no tested answer"),
        ("missing study", "nowhere not found"),
        ("image as model", "is not a study's folder, its report.json or a .ckpt file"),
        ("missing checkpoint", "checkpoint nowhere.ckpt not found"),
        ("image that is a named pipe", "pipe.png is no regular file"),  # had said "not found"
        ("checkpoint that is a named pipe", "pipe.ckpt is no regular file"),
        ("report that is a named pipe", "pipe.json is no regular file"),  # had said it "holds no report.json"
        ("no images", "nothing to do"),
        ("report without an answer", "is not a report.json as tune.py writes it (final.answer: field required)"),
        ("report of wrong types", "(trials.complete: input should be a valid integer; final.best.test_acc: input "
         "should be a valid number)"),
        ("checkpoint without val_size", "(datamodule_hyper_parameters.val_size: field required)"),
        ("checkpoint whose weights do not fit its net", "its model does not load (Error(s) in loading state_dict"),
        ("checkpoint of a diverged run", "its weights are not all finite (its run diverged)"),  # had answered NaN
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_exit(study, tmp_path, case, expected):
    Image.new("L", (32, 28)).save(tmp_path / "wide.png")
    (tmp_path / "notes.png").write_text("not an image")
    fashion_mnist_like().save(tmp_path / "fine.png")
    for pipe in ("pipe.png", "pipe.ckpt", "pipe.json"):
        os.mkfifo(tmp_path / pipe)
    args = {
        "missing image": [str(study), str(tmp_path / "missing.png")],
        "wrong size": [str(study), str(tmp_path / "wide.png"), "--no-prepare"],
        "IDX file of another size": [str(study), str(small_idx(tmp_path))],
        "not an image": [str(study), str(tmp_path / "notes.png")],
        "untested study": [str(untested_report(study, tmp_path)), str(tmp_path / "fine.png")],
        "missing study": [str(tmp_path / "nowhere"), str(tmp_path / "fine.png")],
        "image as model": [str(tmp_path / "fine.png"), str(tmp_path / "fine.png")],
        "missing checkpoint": ["nowhere.ckpt", str(tmp_path / "fine.png")],
        "image that is a named pipe": [str(study), str(tmp_path / "pipe.png")],
        "checkpoint that is a named pipe": [str(tmp_path / "pipe.ckpt"), str(tmp_path / "fine.png")],
        "report that is a named pipe": [str(tmp_path / "pipe.json"), str(tmp_path / "fine.png")],
        "no images": [str(study)],
        "report without an answer": [str(edited_report(study, tmp_path / "a", lambda r: r["final"].pop("answer"))),
                                     str(tmp_path / "fine.png")],
        "report of wrong types": [
            str(edited_report(study, tmp_path / "b", lambda r: (r["trials"].update(complete="2"),
                                                               r["final"]["best"].update(test_acc="high")))),
            str(tmp_path / "fine.png"),
        ],
        "checkpoint without val_size": [
            str(edited_checkpoint(study, tmp_path / "c.ckpt",
                                  lambda content: content["datamodule_hyper_parameters"].pop("val_size"))),
            str(tmp_path / "fine.png"),
        ],
        "checkpoint whose weights do not fit its net": [
            str(edited_checkpoint(study, tmp_path / "d.ckpt", lambda c: c["hyper_parameters"].update(width=9))),
            str(tmp_path / "fine.png"),
        ],
        "checkpoint of a diverged run": [
            str(edited_checkpoint(study, tmp_path / "e.ckpt",
                                  lambda content: [*content["state_dict"].values()][-1].fill_(torch.nan))),
            str(tmp_path / "fine.png"),
        ],
    }[case]

    with pytest.raises(SystemExit) as exit:
        run_script(lambda: predict.main(args), interrupted="nothing was written")

    assert isinstance(exit.value.code, str) and len(exit.value.code.splitlines()) == 1
    assert exit.value.code.startswith("error: ") and expected in exit.value.code


def test_a_path_predict_cannot_write_is_an_error_naming_the_flags_that_choose_it(study, tmp_path):
    (tmp_path / "folder.pt2").mkdir()
    fashion_mnist_like().save(tmp_path / "fine.png")
    for args in ([str(study), "--export", str(tmp_path / "folder.pt2")],
                 [str(study), str(tmp_path / "fine.png"), "--output", str(tmp_path / "nowhere" / "rows.csv")]):
        with pytest.raises(SystemExit) as exit:
            run_script(lambda: predict.main(args), "", writes_with="--output, --export or --save-prepared")
        error, hint = exit.value.code.splitlines()
        assert error.startswith("error: [Errno") and args[-1] in error
        assert hint == "choose another path with --output, --export or --save-prepared"  # no disk is full


def test_predict_on_a_bad_file_prints_one_line_without_a_traceback(study, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    finished = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict.py"), str(study),
                               str(tmp_path / "notes.png")], capture_output=True, text=True, env=env, cwd=tmp_path)

    assert finished.returncode != 0
    assert finished.stderr.strip().splitlines() == [f"error: {tmp_path / 'notes.png'} is neither an image "
                                                    "(PNG, JPEG...) nor an IDX file of images"]


# -- files that would run code -------------------------------------------------------------------------------


def booby_trapped(study: Path, path: Path, marker: Path) -> Path:
    """A copy of the study's best checkpoint that also carries a pickle payload writing `marker` as it loads."""
    torch.save({**best_checkpoint(study), "payload": Payload(marker)}, path)
    return path


def error_line(main: Callable[[], object]) -> str:
    """The one line a script prints when `main` fails, asserting it is one line and an error."""
    with pytest.raises(SystemExit) as exit:
        run_script(main, interrupted="")
    assert isinstance(exit.value.code, str) and len(exit.value.code.splitlines()) == 1
    assert exit.value.code.startswith("error: ")
    return exit.value.code


@pytest.mark.parametrize("script", ["predict", "ensemble"])
def test_a_checkpoint_that_would_run_code_is_refused_in_one_line_and_its_code_never_runs(study, tmp_path, script):
    marker = tmp_path / "payload_ran"
    trapped = booby_trapped(study, tmp_path / "shared.ckpt", marker)
    fashion_mnist_like().save(tmp_path / "fine.png")
    main = {"predict": lambda: predict.main([str(trapped), str(tmp_path / "fine.png")]),
            "ensemble": lambda: ensemble.main([str(trapped)])}[script]

    line = error_line(main)

    assert f"{trapped} is refused: it would call {Payload.CALLS} as it loads, which could run any code" in line
    with pytest.raises(UserError, match=f"is refused: it would call {Payload.CALLS}"):  # as a study's trials load
        load_model(trapped)
    assert not marker.exists()
    # The trap is live: a loader that unpickles anything runs it.
    torch.load(trapped, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("where", ["absolute path", "../ path", "inside the folder"])
def test_a_report_naming_a_checkpoint_that_would_run_code_is_refused_in_one_line(study, tmp_path, where):
    marker = tmp_path / "payload_ran"
    shared = tmp_path / "shared"  # a study folder someone handed over, its report.json crafted
    named = {"absolute path": tmp_path / "elsewhere.ckpt", "../ path": Path("../elsewhere.ckpt"),
             "inside the folder": Path("trial_0.ckpt")}[where]
    booby_trapped(study, tmp_path / "elsewhere.ckpt", marker)
    edited_report(study, shared, lambda report: (report["final"].update(answer="best"),
                                                 report.update(best_checkpoint=str(named))))
    booby_trapped(study, shared / "trial_0.ckpt", marker)
    fashion_mnist_like().save(tmp_path / "fine.png")

    line = error_line(lambda: predict.main([str(shared), str(tmp_path / "fine.png")]))

    if where == "inside the folder":
        assert f"{shared / named} is refused: it would call {Payload.CALLS} as it loads" in line
    else:
        assert f"{shared / 'report.json'} names {named}, outside its study's folder {shared}" in line
    assert not marker.exists()


def test_a_report_of_a_study_that_completed_no_trial_says_so(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"study": "t", "trials": {"skipped (budget)": 2}}))
    with pytest.raises(UserError, match=r"holds no final model: its study completed no trial \({'skipped"):
        load_answer(tmp_path)
