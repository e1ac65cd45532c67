"""Random flips and shifts of a batch of flat images on the training device: one gather and one `torch.where` a
batch, where a per-sample torchvision transform would move every image through Python."""

import torch
from torch import Tensor

SIDE = 28


def shift_and_flip(images: Tensor, max_shift: Tensor | int, flip_chance: Tensor | float, background: Tensor | float
                   ) -> Tensor:
    """Each flat 28x28 image mirrored left-right with probability `flip_chance`, then moved by its own random
    whole-pixel offset in [-max_shift, max_shift] on both axes; pixels moved in from outside are `background`.
    Tensors or numbers: under vmap each stacked model passes its own (`mlp.fused`)."""
    n = images.shape[0]
    grid, side = images.reshape(n, SIDE, SIDE), torch.arange(SIDE, device=images.device)
    mirrored = torch.rand(n, 1, device=images.device) < flip_chance
    dy, dx = ((torch.rand(2, n, 1, device=images.device) * (2 * max_shift + 1)).floor() - max_shift).long()
    # Output pixel (i, j) reads pixel (i - dy, j - dx) of the image, mirrored or not: the image moves by (dy, dx).
    rows, cols = side - dy, side - dx
    inside = ((rows >= 0) & (rows < SIDE))[:, :, None] & ((cols >= 0) & (cols < SIDE))[:, None, :]
    cols = torch.where(mirrored, SIDE - 1 - cols, cols)
    moved = grid[torch.arange(n, device=images.device)[:, None, None], rows.clamp(0, SIDE - 1)[:, :, None],
                 cols.clamp(0, SIDE - 1)[:, None, :]]
    return torch.where(inside, moved, background).reshape(n, SIDE * SIDE)
