"""K multilayer perceptrons of one depth trained as one network: every parameter of `MLP` gains a leading model
dimension, and each layer's K matrix products become one batched matmul.

This is horizontal fusion (HFTA, Wang et al., MLSys 2021): K small trials keep the hardware busy where one
cannot. Forward, backward and activations are `MLP`'s own code; only the tensor shapes change.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mlp.net import MLP, dropout_mask


class StackedMLP(MLP):
    """The nets `nets` side by side: W_i of shape (K, fan_in, fan_out), b_i (K, fan_out), prelu slopes (K,).

    The nets must share depth, activation and input and output sizes; widths and dropout may differ. Narrower
    nets are padded with zeros to the widest, and their padded hidden units are multiplied by 0 after the
    activation, so padded weights get zero gradient and stay zero: each model computes exactly what it would
    alone. Inputs are (B, num_inputs), shared by all models; logits are (K, B, num_outputs).
    """

    def __init__(self, nets: Sequence[MLP]) -> None:
        nn.Module.__init__(self)
        first = nets[0]
        self.depth = depth = len(first.layers) - 1
        if any(len(net.layers) - 1 != depth or net.activation != first.activation for net in nets):
            raise ValueError("nets stacked together must share depth and activation")
        self.activation = first.activation
        self.widths = [hidden_width(net) for net in nets]
        self.params = nn.ParameterList(
            nn.Parameter(torch.stack([resized(p.detach(), self.padded_shape(i, p)) for p in group]))
            for i, group in enumerate(zip(*(net.params for net in nets)))
        )
        self.slopes = nn.ParameterList(
            nn.Parameter(torch.stack([s.detach() for s in group])) for group in zip(*(net.slopes for net in nets))
        )
        self.dropout_rates = [net.dropout for net in nets]
        self.register_buffer("width_mask", None)  # (K, 1, W): 1 for each model's real units, 0 for padding
        self.register_buffer("dropouts", None)  # (K, 1, 1)
        self.refresh_masks()

    def refresh_masks(self) -> None:
        """The per-model buffers, from `widths` and `dropout_rates`, after the models changed."""
        like = self.params[0]
        widths = torch.tensor(self.widths, device=like.device)
        self.width_mask = (torch.arange(max(self.widths), device=like.device) < widths[:, None]).to(like)[:, None, :]
        self.dropouts = torch.tensor(self.dropout_rates).to(like)[:, None, None]
        # Python bools: no device sync per step
        self.any_dropout = any(rate > 0 for rate in self.dropout_rates)
        self.has_padding = len(set(self.widths)) > 1

    def hidden_axes(self, i: int) -> list[int]:
        """Which axes of params[i] (W_l at 2l, b_l at 2l + 1; no model axis) count hidden units."""
        layer, is_bias = i // 2, i % 2 == 1
        if is_bias:
            return [0] if layer < self.depth else []
        return [axis for axis, hidden in ((0, layer > 0), (1, layer < self.depth)) if hidden]

    def padded_shape(self, i: int, p: Tensor) -> tuple[int, ...]:
        """The shape of one model's params[i] in the stack: its hidden sizes padded to the widest model's."""
        return tuple(max(self.widths) if axis in self.hidden_axes(i) else n for axis, n in enumerate(p.shape))

    @property
    def size(self) -> int:
        """K, the number of models in the stack."""
        return len(self.widths)

    def slope(self, layer: int) -> Tensor:
        return self.slopes[layer][:, None, None]

    def affine(self, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        if x.dim() == 2:  # the input layer: all K models read the same batch
            x = x.expand(self.size, *x.shape)
        return torch.baddbmm(b[:, None, :], x, w)

    def hidden_mask(self, z: Tensor) -> Tensor | None:
        """Each model's own dropout mask (independent draws) times the mask of its real, unpadded units; None
        when there is neither dropout nor padding."""
        mask = dropout_mask(z, self.dropouts) if self.training and self.any_dropout else None
        if not self.has_padding:
            return mask
        return self.width_mask.expand_as(z) if mask is None else mask * self.width_mask

    def keep(self, models: Tensor) -> None:
        """Keep only the models at the indices `models`, in that order, padded to the widest of them: the
        others stop costing compute.

        The Parameter objects stay the same (their data is replaced), so references to them remain valid.
        """
        for p in self.parameters():
            p.data = p.data.index_select(0, models)
            p.grad = None
        self.widths = [self.widths[i] for i in models.tolist()]
        self.dropout_rates = [self.dropout_rates[i] for i in models.tolist()]
        if self.size:
            self.pad_to_widest()

    def add(self, net: MLP) -> None:
        """Append `net` as the stack's last model, widening the others' padding if it is the widest."""
        if len(net.layers) - 1 != self.depth or net.activation != self.activation:
            raise ValueError("nets stacked together must share depth and activation")
        self.widths.append(hidden_width(net))
        self.dropout_rates.append(net.dropout)
        for i, (p, q) in enumerate(zip(self.params, net.params)):
            shape = self.padded_shape(i, q)  # one model's, padded to the widest now
            new = resized(q.detach().to(p), shape)[None]
            p.data, p.grad = torch.cat([resized(p.data, (len(p), *shape)), new]), None
        for p, q in zip(self.slopes, net.slopes):
            p.data, p.grad = torch.cat([p.data, q.detach().to(p)[None]]), None
        self.refresh_masks()

    def pad_to_widest(self) -> None:
        """Pad every model's hidden units to the widest model's, adding or removing padding only."""
        for i, p in enumerate(self.params):
            p.data = resized(p.data, (self.size, *self.padded_shape(i, p[0])))
        self.refresh_masks()

    def state_of(self, model: int) -> dict[str, Tensor]:
        """Model `model`'s parameters, unpadded, as the state dict of an `MLP` of its width."""
        state = {}
        for i, p in enumerate(self.params):
            one = p.detach()[model]
            for axis in self.hidden_axes(i):
                one = one.narrow(axis, 0, self.widths[model])
            state[f"params.{i}"] = one.clone()
        for i, s in enumerate(self.slopes):
            state[f"slopes.{i}"] = s.detach()[model].clone()
        return state


def hidden_width(net: MLP) -> int:
    """The number of units in each of the net's hidden layers (0 when it has none)."""
    return net.layers[0][0].shape[1] if len(net.layers) > 1 else 0


def resized(t: Tensor, shape: Sequence[int]) -> Tensor:
    """t in the top-left corner of a zero tensor of `shape`: padded with zeros, or cut where `shape` is smaller."""
    out = t.new_zeros(shape)
    corner = tuple(slice(0, min(n, m)) for n, m in zip(t.shape, shape))
    out[corner] = t[corner]
    return out
