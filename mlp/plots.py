"""Figures for TensorBoard: the activation functions and their derivatives (d2l's plots in 5.1), and test images
with their predicted and true labels (d2l's predict_ch3)."""

from functools import cache
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # figures are written to TensorBoard, never shown on a screen

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from mlp.data import CLASS_NAMES, IMAGE_SIDE
from mlp.net import ACTIVATIONS, PRELU_INIT_SLOPE, prelu, prelu_grad

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter
    from torchmetrics.classification import MulticlassConfusionMatrix


@cache
def activations_image(selected: str) -> np.ndarray:
    """Each activation and its derivative on [-8, 8], side by side, `selected` (this run's) titled in bold, as an
    RGB image (channels, height, width), drawn once per process: a study writes it into every trial's run, and
    drawing it costs more than a fused trial's epoch on a GPU."""
    x = torch.linspace(-8, 8, 401)
    slope = torch.tensor(PRELU_INIT_SLOPE)
    curves = {name: (value(x), derivative(x)) for name, (value, derivative) in ACTIVATIONS.items()}
    curves["prelu"] = (prelu(x, slope), prelu_grad(x, slope)[0])  # at its initial slope
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 2.8), sharey=True)
    for ax, (name, (value, derivative)) in zip(axes, curves.items()):
        ax.plot(x, value, label=f"{name}(x)")
        ax.plot(x, derivative, "--", label=f"{name}'(x)")
        this_run = name == selected
        ax.set_title(f"{name} (this run)" if this_run else name, fontweight="bold" if this_run else "normal")
        ax.set_xlabel("x")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_ylim(-1.5, 3)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].transpose(2, 0, 1).copy()
    plt.close(fig)
    image.flags.writeable = False  # shared by every caller
    return image


def predictions_figure(images: Tensor, predicted: Tensor, true: Tensor, columns: int = 8) -> Figure:
    """A grid of images titled 'predicted / true', red where the two differ: one picture in one axes, each image
    scaled to its own range, since an axes per image made drawing this figure most of a test run on a CPU."""
    side, title = IMAGE_SIDE, 14  # pixels of an image, and of the blank band above it that holds its title
    rows = (len(images) + columns - 1) // columns
    pictures = images.detach().cpu().float().reshape(-1, side, side)
    low = pictures.amin(dim=(1, 2), keepdim=True)
    pictures = (pictures - low) / (pictures.amax(dim=(1, 2), keepdim=True) - low).clamp_min(1e-12)
    grid = torch.ones(rows, title + side, columns, side + 2)  # white bands between the images
    for k, picture in enumerate(pictures):
        grid[k // columns, title:, k % columns, 1:-1] = picture
    grid = grid.reshape(rows * (title + side), columns * (side + 2))
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 22, grid.shape[0] / 22 + 0.3))  # 22 pixels of the grid an inch
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    for k, (p, t) in enumerate(zip(predicted.tolist(), true.tolist())):
        x, y = (k % columns) * (side + 2) + (side + 2) / 2, (k // columns) * (title + side) + title - 1
        ax.text(x, y, f"{CLASS_NAMES[p]}\n{CLASS_NAMES[t]}", fontsize=7, ha="center", va="bottom",
                color="black" if p == t else "red")
    ax.set_title("predicted / true", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.3 / fig.get_figheight())
    return fig


def add_test_figures(writer: "SummaryWriter", confusion: "MulticlassConfusionMatrix", examples: tuple) -> None:
    """The test's confusion matrix, and its first images with their predicted and true labels, in TensorBoard."""
    confusion_figure, _ = confusion.plot(labels=CLASS_NAMES)
    confusion_figure.set_size_inches(9, 9)
    writer.add_figure("test/confusion_matrix", confusion_figure)
    writer.add_figure("test/predictions", predictions_figure(*examples))
