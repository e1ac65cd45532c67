"""Random flips and shifts of a batch of flat images on the training device: one gather and one `torch.where` a
batch, where a per-sample torchvision transform would move every image through Python."""

import torch
from torch import Tensor

from mlp.data import IMAGE_SIDE


def shift_and_flip(images: Tensor, max_shift: Tensor | int, flip_chance: Tensor | float, background: Tensor | float
                   ) -> Tensor:
    """Each flat 28x28 image mirrored left-right with probability `flip_chance`, then moved by its own random
    whole-pixel offset in [-max_shift, max_shift] on both axes; pixels moved in from outside are `background`.
    Tensors or numbers: under vmap each stacked model passes its own (`mlp.fused`)."""
    n, side = images.shape[0], IMAGE_SIDE
    grid, pixels = images.reshape(n, side, side), torch.arange(side, device=images.device)
    mirrored = torch.rand(n, 1, device=images.device) < flip_chance
    dy, dx = ((torch.rand(2, n, 1, device=images.device) * (2 * max_shift + 1)).floor() - max_shift).long()
    # Output pixel (i, j) reads pixel (i - dy, j - dx) of the image, mirrored or not: the image moves by (dy, dx).
    rows, cols = pixels - dy, pixels - dx
    inside = ((rows >= 0) & (rows < side))[:, :, None] & ((cols >= 0) & (cols < side))[:, None, :]
    cols = torch.where(mirrored, side - 1 - cols, cols)
    moved = grid[torch.arange(n, device=images.device)[:, None, None], rows.clamp(0, side - 1)[:, :, None],
                 cols.clamp(0, side - 1)[:, None, :]]
    return torch.where(inside, moved, background).reshape(n, side * side)
