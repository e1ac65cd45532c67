"""The multilayer perceptron itself, from scratch: explicit weight tensors, our own relu, our own init.

Everything here is a matmul, an addition or an elementwise max; no library layers or activations.
"""

import math
from typing import Literal

import torch
from torch import Tensor, nn

InitScheme = Literal["normal", "kaiming", "xavier"]


def relu(x: Tensor) -> Tensor:
    """max(x, 0), elementwise. Its gradient is 1 where x > 0 and 0 elsewhere (0 at x == 0, as PyTorch's)."""
    return x.clamp_min(0.0)


def init_weight(fan_in: int, fan_out: int, scheme: InitScheme) -> Tensor:
    """A (fan_in, fan_out) weight matrix drawn from a zero-mean normal whose std the scheme sets.

    normal: std 0.01, the d2l default; fine for one hidden layer, too small for deep nets.
    kaiming: std sqrt(2 / fan_in), which keeps the activation variance constant through relu layers.
    xavier: std sqrt(2 / (fan_in + fan_out)), which balances forward and backward variance for linear units.
    """
    stds = {
        "normal": 0.01,
        "kaiming": math.sqrt(2.0 / fan_in),
        "xavier": math.sqrt(2.0 / (fan_in + fan_out)),
    }
    if scheme not in stds:
        raise ValueError(f"unknown init scheme {scheme!r}; choose one of {sorted(stds)}")
    return torch.randn(fan_in, fan_out) * stds[scheme]


class MLP(nn.Module):
    """num_inputs -> `depth` hidden relu layers of `width` units -> num_outputs logits.

    depth 0 is softmax regression; depth 1, width 256 is d2l's 784-256-10 net.
    Parameters are stored as [W_1, b_1, W_2, b_2, ...] with W_i of shape (fan_in, fan_out).
    """

    def __init__(
        self,
        num_inputs: int = 784,
        depth: int = 1,
        width: int = 256,
        num_outputs: int = 10,
        init: InitScheme = "kaiming",
    ) -> None:
        super().__init__()
        sizes = [num_inputs] + [width] * depth + [num_outputs]
        self.params = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            self.params.append(nn.Parameter(init_weight(fan_in, fan_out, init)))
            self.params.append(nn.Parameter(torch.zeros(fan_out)))

    @property
    def layers(self) -> list[tuple[Tensor, Tensor]]:
        """The (W, b) pairs, input layer first."""
        return list(zip(self.params[0::2], self.params[1::2]))

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        *hidden, (w_out, b_out) = self.layers
        for w, b in hidden:
            x = relu(x @ w + b)
        return x @ w_out + b_out
