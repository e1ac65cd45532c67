"""The from-scratch network against its PyTorch references."""

from pathlib import Path

import pytest
import torch
from torch import nn

from mlp.module import MLPClassifier
from mlp.net import (
    MLP,
    batch_norm,
    batch_norm_grad,
    dropout_mask,
    init_weight,
    leaky_relu,
    leaky_relu_grad,
    prelu,
    prelu_grad,
    relu,
    relu_grad,
    sigmoid,
    sigmoid_grad,
    tanh,
    tanh_grad,
)


def test_relu_matches_torch_relu_in_value_and_gradient():
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    x.data[:3] = torch.tensor([0.0, -0.0, 1e-12], dtype=torch.float64)
    x_ref.data[:3] = x.data[:3]
    ours, reference = relu(x), torch.relu(x_ref)
    assert torch.equal(ours, reference)
    ours.sum().backward()
    reference.sum().backward()
    assert torch.equal(x.grad, x_ref.grad)


def extreme_inputs() -> torch.Tensor:
    """Ordinary values plus the ones where naive formulas break: 0, tiny, and large enough to overflow exp."""
    special = torch.tensor([0.0, -0.0, 1e-12, -1e-12, 30.0, -30.0, 800.0, -800.0], dtype=torch.float64)
    return torch.cat([special, torch.randn(1000, dtype=torch.float64) * 4])


@pytest.mark.parametrize(
    "ours, derivative, reference",
    [
        (sigmoid, sigmoid_grad, torch.sigmoid), (tanh, tanh_grad, torch.tanh), (relu, relu_grad, torch.relu),
        (leaky_relu, leaky_relu_grad, torch.nn.functional.leaky_relu),
    ],
    ids=["sigmoid", "tanh", "relu", "leaky_relu"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_activation_matches_pytorch_in_value_autograd_gradient_and_hand_derivative(ours, derivative, reference, dtype):
    x = extreme_inputs().to(dtype).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    value, value_ref = ours(x), reference(x_ref)
    torch.testing.assert_close(value, value_ref)
    value.sum().backward()
    value_ref.sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(derivative(x.detach()), x_ref.grad)


def test_prelu_matches_torch_prelu_in_value_and_gradients():
    x = extreme_inputs().requires_grad_(True)
    slope = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    x_ref, slope_ref = (t.detach().clone().requires_grad_(True) for t in (x, slope))
    value, value_ref = prelu(x, slope), nn.functional.prelu(x_ref, slope_ref.reshape(1))
    torch.testing.assert_close(value, value_ref)
    upstream = torch.randn_like(value)
    (value * upstream).sum().backward()
    (value_ref * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(slope.grad, slope_ref.grad)
    d_x, d_slope = prelu_grad(x.detach(), slope.detach())
    torch.testing.assert_close(d_x, x_ref.grad / upstream)
    torch.testing.assert_close((d_slope * upstream).sum(), slope_ref.grad)


def test_prelu_net_learns_one_slope_per_hidden_layer_starting_at_a_quarter():
    net = MLP(784, 3, 16, 10, activation="prelu")
    assert [s.item() for s in net.slopes] == [0.25] * 3
    assert len(MLP(784, 3, 16, 10, activation="relu").slopes) == 0


def test_dropout_mask_zeroes_a_fraction_p_and_preserves_the_expected_value():
    torch.manual_seed(0)
    x = torch.full((1000, 1000), 3.0)
    for p in (0.1, 0.5, 0.9):
        dropped = x * dropout_mask(x, p)
        assert (dropped == 0).float().mean().item() == pytest.approx(p, abs=0.005)
        assert dropped.unique().tolist() == [0.0, pytest.approx(3.0 / (1 - p))]
        assert dropped.mean().item() == pytest.approx(3.0, rel=0.01)


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    net = MLP(20, 2, 64, 5, dropout=0.5)
    plain = MLP(20, 2, 64, 5, dropout=0.0)
    plain.load_state_dict(net.state_dict())
    x = torch.randn(8, 20)
    net.train()
    assert not torch.equal(net(x), net(x))  # a fresh mask each call
    net.eval()
    assert torch.equal(net(x), net(x))
    assert torch.equal(net(x), plain.eval()(x))


@pytest.mark.parametrize("depth, width", [(0, 7), (1, 256), (2, 512), (5, 3)])
def test_shapes_and_parameter_count(depth, width):
    net = MLP(784, depth, width, 10)
    sizes = [784] + [width] * depth + [10]
    expected = sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:]))
    assert sum(p.numel() for p in net.parameters()) == expected
    assert len(net.params) == 2 * (depth + 1)
    assert net(torch.randn(4, 1, 28, 28)).shape == (4, 10)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_matches_torch_batch_norm_in_value_gradients_and_running_statistics(training):
    torch.manual_seed(0)
    z = (torch.randn(9, 5, dtype=torch.float64) * 3 + 1).requires_grad_(True)
    scale = torch.rand(5, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(5, dtype=torch.float64, requires_grad=True)
    mean, var = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    z_ref, scale_ref, shift_ref = (t.detach().clone().requires_grad_(True) for t in (z, scale, shift))
    mean_ref, var_ref, mean_before = mean.clone(), var.clone(), mean.clone()
    out, z_hat, inv_std = batch_norm(z, scale, shift, mean, var, training)
    reference = nn.functional.batch_norm(z_ref, mean_ref, var_ref, scale_ref, shift_ref, training)
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(mean, mean_ref)  # moved towards the batch's statistics in training, kept in eval
    torch.testing.assert_close(var, var_ref)
    assert torch.equal(mean, mean_before) != training
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (reference * upstream).sum().backward()
    for ours, theirs in [(z, z_ref), (scale, scale_ref), (shift, shift_ref)]:
        torch.testing.assert_close(ours.grad, theirs.grad)
    by_hand = batch_norm_grad(upstream, z_hat.detach(), inv_std.detach(), scale.detach(), training)
    for grad, theirs in zip(by_hand, [z_ref, scale_ref, shift_ref]):
        torch.testing.assert_close(grad, theirs.grad)


def test_batch_norm_net_normalises_each_hidden_layer_and_keeps_its_statistics_in_the_state_dict():
    net = MLP(20, 3, 8, 5, batch_norm=True)
    assert [name for name, _ in net.named_buffers() if name.startswith("running")] == ["running_mean", "running_var"]
    assert {"running_mean", "running_var", "norm_scale"} <= set(net.state_dict())
    assert net.norm_scale.shape == net.running_var.shape == (3, 8)
    x = torch.randn(64, 20) * 5 + 3
    net.train()(x)
    assert not torch.equal(net.running_mean, torch.zeros(3, 8))
    assert not hasattr(MLP(20, 0, 8, 5, batch_norm=True), "norm_scale")  # no hidden layer, nothing to normalise


def test_forward_equals_a_linear_relu_stack_with_the_same_weights():
    net = MLP(12, 2, 8, 3).double()
    reference = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        for layer, (w, b) in zip(reference[0::2], net.layers):
            layer.weight.copy_(w.T)  # nn.Linear stores (out, in)
            layer.bias.copy_(b)
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(net(x), reference(x))


def test_module_holds_only_explicit_parameters():
    model = MLPClassifier(depth=3, width=16)
    library_layers = (nn.Linear, nn.ReLU, nn.Conv2d, nn.Bilinear)
    assert not [m for m in model.modules() if isinstance(m, library_layers)]
    assert isinstance(model.net.params, nn.ParameterList)


def test_package_source_uses_no_library_layers_or_activations():
    layers = ("Linear", "ReLU", "PReLU", "Sigmoid", "Tanh", "Dropout", "relu", "prelu", "sigmoid", "tanh", "dropout")
    banned = [f"{prefix}{name}" for prefix in ("nn.", "F.", "functional.", "torch.") for name in layers]
    banned += [".relu(", ".sigmoid(", ".tanh("]  # the Tensor methods
    package = Path(__file__).resolve().parent.parent / "mlp"
    offending = [
        f"{path.name}: {word}" for path in package.glob("*.py") for word in banned if word in path.read_text()
    ]
    assert offending == []


def test_autograd_gradients_match_finite_differences():
    torch.manual_seed(0)
    net = MLP(6, 2, 5, 3).double()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 2, 1, 2])

    def loss() -> torch.Tensor:
        return nn.functional.cross_entropy(net(x), y)

    loss().backward()
    eps = 1e-6
    for p in net.parameters():
        numeric = torch.zeros_like(p)
        for i in range(p.numel()):
            original = p.data.view(-1)[i].item()
            p.data.view(-1)[i] = original + eps
            up = loss().item()
            p.data.view(-1)[i] = original - eps
            down = loss().item()
            p.data.view(-1)[i] = original
            numeric.view(-1)[i] = (up - down) / (2 * eps)
        torch.testing.assert_close(p.grad, numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "scheme, fan_in, fan_out, std",
    [("normal", 400, 300, 0.01), ("kaiming", 400, 300, (2 / 400) ** 0.5), ("xavier", 400, 300, (2 / 700) ** 0.5)],
)
def test_init_scheme_std(scheme, fan_in, fan_out, std):
    torch.manual_seed(0)
    w = init_weight(fan_in, fan_out, scheme)
    assert w.shape == (fan_in, fan_out)
    assert abs(w.mean().item()) < 0.05 * std
    assert w.std().item() == pytest.approx(std, rel=0.02)


def test_kaiming_init_matches_torch_kaiming_normal_statistics():
    torch.manual_seed(0)
    ours = init_weight(500, 400, "kaiming")
    reference = nn.init.kaiming_normal_(torch.empty(400, 500), nonlinearity="relu")  # (out, in)
    assert ours.std().item() == pytest.approx(reference.std().item(), rel=0.02)


@pytest.mark.parametrize("depth, width", [(0, 64), (1, 256), (2, 512), (3, 33)])
def test_multiply_adds_are_what_torch_counts_for_one_examples_forward_pass(depth, width):
    from torch.utils.flop_counter import FlopCounterMode

    net = MLP(784, depth, width)
    with FlopCounterMode(display=False) as counter:
        net(torch.randn(1, 784))
    assert net.multiply_adds() == counter.get_total_flops() // 2  # torch counts a multiply-add as two flops
