"""The multilayer perceptron from scratch: explicit weight tensors, our own activations, init and dropout, and a
hand-written backward pass. Everything is a matmul, an addition, an exp or an elementwise comparison."""

import itertools
import math
from typing import Literal

import torch
from torch import Tensor, nn

InitScheme = Literal["normal", "kaiming", "xavier"]
Activation = Literal["relu", "leaky_relu", "prelu", "sigmoid", "tanh"]
PRELU_INIT_SLOPE = 0.25  # He et al. (2015), and PyTorch's default
LEAKY_SLOPE = 0.01  # Maas et al. (2013), and PyTorch's default
BN_EPS, BN_MOMENTUM = 1e-5, 0.1  # PyTorch's BatchNorm1d defaults


def relu(x: Tensor) -> Tensor:
    """max(x, 0), elementwise, as x times the 0/1 mask `relu_grad(x)`. The mask is taken of x detached, so autograd's
    backward is one multiplication: clamp_min's, a `where` over a bool mask, measured six times slower on a CPU
    (docs/results.md#relu-cpu). Where max would give 0 for -inf this gives nan; only a diverged net meets it."""
    return x * relu_grad(x.detach())


def relu_grad(x: Tensor) -> Tensor:
    """1 where x > 0, 0 elsewhere (at 0 too, as PyTorch's): a float mask, which a CPU makes faster than a bool one."""
    return x.sign().clamp_min_(0)


def prelu(x: Tensor, slope: Tensor) -> Tensor:
    """x where x > 0, slope * x elsewhere; the slope is learned."""
    return torch.where(x > 0, x, slope * x)


def prelu_grad(x: Tensor, slope: Tensor) -> tuple[Tensor, Tensor]:
    """d prelu / dx (1 or the slope) and d prelu / d slope (0 or x), elementwise."""
    positive = x > 0
    return torch.where(positive, torch.ones_like(x), slope), torch.where(positive, torch.zeros_like(x), x)


def leaky_relu(x: Tensor) -> Tensor:
    """prelu with a fixed slope, LEAKY_SLOPE: a unit below zero still passes some gradient."""
    return torch.where(x > 0, x, LEAKY_SLOPE * x)


def leaky_relu_grad(x: Tensor) -> Tensor:
    return torch.full_like(x, LEAKY_SLOPE).masked_fill_(x > 0, 1.0)


def sigmoid(x: Tensor) -> Tensor:
    """1 / (1 + exp(-x)), computed from exp(-|x|) so that neither the value nor its gradient overflows."""
    e = torch.exp(-torch.where(x >= 0, x, -x))  # not x.abs(), whose gradient at 0 is 0 rather than 1
    return torch.where(x >= 0, 1 / (1 + e), e / (1 + e))


def sigmoid_grad(x: Tensor) -> Tensor:
    s = sigmoid(x)
    return s * (1 - s)


def tanh(x: Tensor) -> Tensor:
    """(1 - exp(-2x)) / (1 + exp(-2x)), which is 2 sigmoid(2x) - 1."""
    return 2 * sigmoid(2 * x) - 1


def tanh_grad(x: Tensor) -> Tensor:
    return 1 - tanh(x) ** 2


# Activations without parameters, with their derivatives; prelu, which has one, is handled by MLP itself.
ACTIVATIONS = {"relu": (relu, relu_grad), "leaky_relu": (leaky_relu, leaky_relu_grad),
               "sigmoid": (sigmoid, sigmoid_grad), "tanh": (tanh, tanh_grad)}


def dropout_mask(x: Tensor, p: float | Tensor) -> Tensor:
    """0 with probability p, else 1 / (1 - p), so that x * mask has the expected value of x."""
    # In place, which measured faster than fresh tensors, even under vmap, where ge_ loops over the models.
    return torch.rand_like(x).ge_(p).div_(1 - p)


def batch_norm(z: Tensor, scale: Tensor, shift: Tensor, running_mean: Tensor, running_var: Tensor, training: bool
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Each unit of z (batch, units) standardised, then scaled and shifted: d2l's from-scratch batch normalisation.

    In training it uses the batch's mean and (biased) variance and moves the running statistics towards them, in
    place, the variance's unbiased (as PyTorch's BatchNorm1d); in evaluation it uses the running statistics.
    Returns the output, the standardised z (`z_hat`) and 1 / std, which the backward pass needs.
    """
    if training:
        var, mean = torch.var_mean(z, 0, correction=0)
        with torch.no_grad():
            running_mean.lerp_(mean, BN_MOMENTUM)
            running_var.lerp_(var * len(z) / max(len(z) - 1, 1), BN_MOMENTUM)
    else:
        mean, var = running_mean, running_var
    inv_std = (var + BN_EPS).rsqrt()
    z_hat = (z - mean) * inv_std
    return torch.addcmul(shift, z_hat, scale), z_hat, inv_std


def batch_norm_grad(grad: Tensor, z_hat: Tensor, inv_std: Tensor, scale: Tensor, training: bool
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """d loss / d z, d loss / d scale and d loss / d shift, from `grad` = d loss / d output. In training the mean
    and variance depend on every example, so d z_hat / d z carries the batch's averages (Ioffe & Szegedy 2015)."""
    grad_z_hat = grad * scale
    if training:
        grad_z = inv_std * (grad_z_hat - grad_z_hat.mean(0) - z_hat * (grad_z_hat * z_hat).mean(0))
    else:
        grad_z = grad_z_hat * inv_std
    return grad_z, (grad * z_hat).sum(0), grad.sum(0)


def init_weight(fan_in: int, fan_out: int, scheme: InitScheme) -> Tensor:
    """A (fan_in, fan_out) weight matrix drawn from a zero-mean normal whose std the scheme sets.

    normal: std 0.01, the d2l default; fine for one hidden layer, too small for deep nets.
    kaiming: std sqrt(2 / fan_in), which keeps the activation variance constant through relu layers.
    xavier: std sqrt(2 / (fan_in + fan_out)), which balances forward and backward variance for linear units.
    """
    stds = {"normal": 0.01, "kaiming": math.sqrt(2.0 / fan_in), "xavier": math.sqrt(2.0 / (fan_in + fan_out))}
    if scheme not in stds:
        raise ValueError(f"unknown init scheme {scheme!r}; choose one of {sorted(stds)}")
    return torch.randn(fan_in, fan_out) * stds[scheme]


class MLP(nn.Module):
    """num_inputs -> `depth` hidden layers of `width` units -> num_outputs logits; depth 0 is softmax regression,
    depth 1, width 256 d2l's 784-256-10 net. Each hidden layer is activation(x @ W + b), in training followed by
    dropout. `params` holds [W_1, b_1, W_2, b_2, ...], W_i (fan_in, fan_out); with prelu, `slopes` one per layer.
    With `batch_norm`, a hidden layer is activation(batch_norm(x @ W) * s + b) (`batch_norm`): b, which the
    normalisation would cancel before it, shifts after it; the scales s are the rows of `norm_scale` (depth, width),
    the running statistics those of `running_mean` and `running_var`.
    """

    # Nets of one depth and several widths stack (`mlp.fused`) zero-padded to the widest: a padded unit's weights
    # in and out are zero and stay zero (no model's optimiser sees them), so it adds nothing to any output.
    widths_pad_exactly = True

    def __init__(self, num_inputs: int = 784, depth: int = 1, width: int = 256, num_outputs: int = 10,
                 init: InitScheme = "kaiming", activation: Activation = "relu", dropout: float = 0.0,
                 batch_norm: bool = False) -> None:
        super().__init__()
        if activation != "prelu" and activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted([*ACTIVATIONS, 'prelu'])}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.activation, self.dropout = activation, dropout
        # A tensor too, each stacked model's own under vmap (`mlp.fused`); the float says whether masks are drawn.
        self.register_buffer("dropout_rate", torch.tensor(float(dropout)), persistent=False)
        sizes = [num_inputs] + [width] * depth + [num_outputs]
        self.params = nn.ParameterList()
        for fan_in, fan_out in itertools.pairwise(sizes):
            self.params.append(nn.Parameter(init_weight(fan_in, fan_out, init)))
            self.params.append(nn.Parameter(torch.zeros(fan_out)))
        n_slopes = depth if activation == "prelu" else 0
        self.slopes = nn.ParameterList([nn.Parameter(torch.tensor(PRELU_INIT_SLOPE)) for _ in range(n_slopes)])
        self.batch_norm = batch_norm and depth > 0
        if self.batch_norm:  # a module's own parameters come first in `parameters()`, and so in `backward`'s list
            self.norm_scale = nn.Parameter(torch.ones(depth, width))
            self.register_buffer("running_mean", torch.zeros(depth, width))
            self.register_buffer("running_var", torch.ones(depth, width))

    @property
    def layers(self) -> list[tuple[Tensor, Tensor]]:
        """The (W, b) pairs, input layer first (sliced from a list: slicing the ParameterList builds a new one)."""
        params = list(self.params)
        return list(zip(params[0::2], params[1::2]))

    def multiply_adds(self) -> int:
        """Multiply-adds of one example's forward pass: what a study counts a trial's work in (a fork's net its own)."""
        return sum(weight.numel() for weight, _ in self.layers)

    def forward(self, x: Tensor, cache: list | None = None) -> Tensor:
        """Logits for x. If a `cache` list is given, each layer appends what `backward` needs: its input, and for
        hidden layers also the activation's input, the dropout mask (None when dropout is off) and with batch_norm
        its z_hat and 1 / std (else None)."""
        x = x.flatten(1)
        *hidden, (w_out, b_out) = self.layers
        for layer, (w, b) in enumerate(hidden):
            if self.batch_norm:
                z, *norm = batch_norm(x @ w, self.norm_scale[layer], b, self.running_mean[layer],
                                      self.running_var[layer], self.training)
            else:  # b added in place: under vmap addmm is a batched matmul and an add into one more tensor
                z, norm = (x @ w).add_(b), None
            mask = dropout_mask(z, self.dropout_rate) if self.training and self.dropout > 0 else None
            if cache is not None:
                cache.append((x, z, mask, norm))
            x = prelu(z, self.slopes[layer]) if self.activation == "prelu" else ACTIVATIONS[self.activation][0](z)
            if mask is not None:
                x = x * mask
        if cache is not None:
            cache.append((x, None, None, None))
        return (x @ w_out).add_(b_out)

    def backward(self, cache: list, grad_logits: Tensor) -> list[Tensor]:
        """Gradients of the loss with respect to `self.parameters()`, in that order, by the chain rule by hand, from
        grad_logits = d loss / d logits and the `cache` that `forward(x, cache)` filled. For y = x @ W + b,
        dW = x^T dy, db = dy summed over the batch, dx = dy W^T; through the activation, dz = dx * act'(z)."""
        grads = [None] * len(self.params)
        slope_grads = [None] * len(self.slopes)
        scale_grads = [None] * (len(cache) - 1)
        grad = grad_logits
        layers = self.layers
        for layer in reversed(range(len(cache))):
            x = cache[layer][0]
            w, _ = layers[layer]
            grads[2 * layer] = x.mT @ grad
            if grads[2 * layer + 1] is None:  # else b is the layer's batch_norm shift, its gradient found below
                grads[2 * layer + 1] = grad.sum(-2)
            if layer == 0:
                break
            _, z, mask, norm = cache[layer - 1]
            grad = grad @ w.mT
            if mask is not None:
                grad = grad * mask
            if self.activation == "prelu":
                d_z, d_slope = prelu_grad(z, self.slopes[layer - 1])
                slope_grads[layer - 1] = (grad * d_slope).sum((-2, -1))
                grad = grad * d_z
            else:
                grad = grad * ACTIVATIONS[self.activation][1](z)
            if norm is not None:
                grad, scale_grads[layer - 1], grads[2 * layer - 1] = batch_norm_grad(
                    grad, *norm, self.norm_scale[layer - 1], self.training)
        grads = ([torch.stack(scale_grads)] if self.batch_norm else []) + grads + slope_grads
        # Under autocast (--trainer.precision bf16-mixed) the matmuls ran in bfloat16; each parameter gets its
        # gradient in its own dtype, as from autograd.
        return [grad.to(p.dtype) for grad, p in zip(grads, self.parameters())]
