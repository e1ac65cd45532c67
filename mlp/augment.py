"""Random shifts and flips of a batch of flat images on the training device: one gather and one `torch.where`
a batch, where a per-sample torchvision transform would move every image through Python."""

import torch
from torch import Tensor

SIDE = 28


def shift_and_flip(images: Tensor, max_shift: int, flip: bool, background: float) -> Tensor:
    """Each flat 28x28 image moved by its own random whole-pixel offset in [-max_shift, max_shift] on both axes
    (pixels moved in from outside are `background`) and, if `flip`, mirrored left-right with probability 1/2."""
    n = len(images)
    grid = images.view(n, SIDE, SIDE)
    if flip:
        mirrored = torch.rand(n, device=images.device) < 0.5
        grid = torch.where(mirrored[:, None, None], grid.flip(-1), grid)
    if max_shift:
        padded = torch.nn.functional.pad(grid, (max_shift,) * 4, value=background)
        # Output pixel (i, j) reads padded pixel (i + max_shift - dy, j + max_shift - dx): the image moves by (dy, dx).
        dy, dx = torch.randint(-max_shift, max_shift + 1, (2, n, 1), device=images.device)
        side = torch.arange(SIDE, device=images.device)
        rows, cols = side + max_shift - dy, side + max_shift - dx
        grid = padded[torch.arange(n, device=images.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return grid.reshape(n, SIDE * SIDE)
