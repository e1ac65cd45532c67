"""Figures for TensorBoard: test images with their predicted and true labels (d2l's predict_ch3)."""

import matplotlib

matplotlib.use("Agg")  # figures are written to TensorBoard, never shown on a screen

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from torch import Tensor

from mlp.data import CLASS_NAMES


def predictions_figure(images: Tensor, predicted: Tensor, true: Tensor, columns: int = 8) -> Figure:
    """A grid of images titled 'predicted / true', red where the two differ."""
    rows = (len(images) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, p, t in zip(axes.flat, images.cpu(), predicted.tolist(), true.tolist()):
        ax.imshow(image.reshape(28, 28).numpy(), cmap="gray")
        ax.set_title(f"{CLASS_NAMES[p]}\n{CLASS_NAMES[t]}", fontsize=7, color="black" if p == t else "red")
    fig.suptitle("predicted / true", fontsize=9)
    fig.tight_layout()
    return fig
