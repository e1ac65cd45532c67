"""How many trials a stack may hold: what a fit flag forbids of stacks, the device memory a stack needs, and
`--fuse auto`'s choice of K."""

import math
from itertools import pairwise

import torch

from mlp.cli import MLPCLI
from mlp.data import CLASS_NAMES, EVAL_BATCH_SIZE, TEST_IMAGES, TRAIN_IMAGES, FashionMNISTDataModule
from mlp.errors import check
from mlp.fused import padding_error, stack_error
from mlp.search import SearchSpace

INPUTS, CLASSES = FashionMNISTDataModule.input_size, len(CLASS_NAMES)
# The whole of Fashion-MNIST on the device as float pixels and int64 labels.
DATASET_BYTES = (TRAIN_IMAGES + TEST_IMAGES) * (INPUTS * 4 + 8)


def stack_bytes(fuse: int, depth: int, width: int, batch_size: int, optimizer: str, bytes_per_number: int) -> int:
    """A generous estimate of the device memory a stack of `fuse` models of this shape needs to train."""
    sizes = [INPUTS] + [width] * depth + [CLASSES]
    params = sum(fan_in * fan_out + fan_out for fan_in, fan_out in pairwise(sizes)) + depth
    # Parameters, gradients, one more copy while the stack is rebuilt without a model, and the optimiser's
    # state (SGD's momentum; Adam's two moments).
    weights = (3 + {"sgd": 1, "adam": 2}[optimizer]) * params
    # Per example: the input each model reads, and per hidden unit its pre-activation, activation, mask (with
    # batch_norm also x @ W and its standardised value) and their gradients; evaluation keeps no gradients but
    # takes larger batches.
    training = batch_size * (INPUTS + 8 * depth * width + 3 * CLASSES)
    evaluation = max(batch_size, EVAL_BATCH_SIZE) * (INPUTS + 2 * depth * width + CLASSES)
    return fuse * (weights + max(training, evaluation)) * bytes_per_number


def pads_widths(cli: MLPCLI) -> bool:
    """Whether trials of one depth and several widths share a stack: on a GPU, where K cost little more than one;
    not on the CPU, where a step costs its multiply-adds and padding costs more (docs/results.md#padding-cpu)."""
    return cli.trainer.strategy.root_device.type != "cpu"


def free_gpu_bytes(cli: MLPCLI) -> int | None:
    """Free memory on the GPU the trials train on, or None when they train on the CPU."""
    device = cli.trainer.strategy.root_device
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def why_unfusable(cli: MLPCLI) -> tuple[str, str] | None:
    """Why a fit flag keeps stacked trials from training as each would alone, and what to do instead; or None."""
    if (error := stack_error(cli.model)) is not None:
        return (f"the model's step (its net, a {type(cli.model.net).__name__}, and its loss) does not run under "
                f"torch.func.vmap, which stacks trials ({error})",
                "use --fuse 1, or build the net of per-example operations (docs/forking.md)")
    if pads_widths(cli) and (error := padding_error(cli.model)) is not None:
        return error, "fix the net, or use --fuse 1"
    if getattr(cli.trainer.precision_plugin, "scaler", None) is not None:  # 16-mixed on a GPU
        return (f"--trainer.precision {cli.trainer.precision} with --fuse: its one loss scaler would skip every "
                "stacked trial's step whenever one trial's gradients overflow",
                "use --trainer.precision bf16-mixed or --fuse 1")
    return None


def check_fusable(fuse: int, space: SearchSpace, cli: MLPCLI) -> None:
    """Refuse, before any trial, what a stack of `fuse` trials cannot train as the trials would alone."""
    unfusable = why_unfusable(cli)
    check(unfusable is None, "; ".join(unfusable or ()))
    check_stack_fits(fuse, space, cli, free_gpu_bytes(cli))


def stack_fits(space: SearchSpace, cli: MLPCLI, free_bytes: int) -> tuple[int, int, int, int]:
    """How many models of the search space's largest depth and width fit in `free_bytes` of GPU memory, with
    that depth and width and the bytes one model needs."""
    hp = cli.model.hparams
    depth = space.depth[1] if space.depth else hp.depth  # a pinned one is the fit flag's
    width = space.width[1] if space.width else hp.width
    bytes_per_number = 8 if "64" in str(cli.trainer.precision) else 4
    per_model = stack_bytes(1, depth, width, cli.datamodule.hparams.batch_size, hp.optimizer, bytes_per_number)
    return (free_bytes - DATASET_BYTES) // per_model, depth, width, per_model


def check_stack_fits(fuse: int, space: SearchSpace, cli: MLPCLI, free_bytes: int | None) -> None:
    """Stop with a message naming a K that fits, rather than an out-of-memory error mid-study."""
    if free_bytes is None:
        return
    fits, depth, width, per_model = stack_fits(space, cli, free_bytes)
    advice = f"--fuse {fits} fits" if fits >= 1 else "even one does not fit: lower the --width or --depth range"
    check(fuse <= fits, f"--fuse {fuse}: a stack of {fuse} trials of up to depth {depth} and width {width} needs "
          f"about {(fuse * per_model + DATASET_BYTES) / 1e9:.1f} GB of GPU memory and {free_bytes / 1e9:.1f} GB is "
          f"free; {advice}")


AUTO_FUSE_MAX = 128  # the most trials per stack measured on a GPU; it trained the most model-epochs per second
CPU_FUSE = 8  # trials of one width per stack on the CPU (docs/results.md#thirty-trials-cpu, #eight-trials-cpu)


def auto_fuse(space: SearchSpace, cli: MLPCLI, free_bytes: int | None, n_trials: int) -> tuple[int, str]:
    """`--fuse auto` (tune.py's default): K for the device the trials train on and a study of `n_trials`, and why
    (docs/fused-trials.md, "Memory and the default K"). On the CPU, whose stacks hold trials of one width
    (`pads_widths`), CPU_FUSE when every trial has one width, else 1; on a GPU as many as fit, up to AUTO_FUSE_MAX;
    either way at most a quarter of the trials, rounded up, as TPE draws from finished ones (a stack of all the
    trials would be a random search; K = 8 of 30 matched the unfused study: docs/results.md#study-fused-cpu).
    With a fit flag `why_unfusable` names, 1."""
    if unfusable := why_unfusable(cli):
        return 1, "one trial at a time: " + unfusable[0]
    if free_bytes is None:
        if space.width is not None and space.width[0] != space.width[1]:  # not pinned, nor a range of one value
            return 1, ("one trial at a time on the CPU, where trials of searched widths rarely share a stack and "
                       "fusing them measured no faster")
        fuse, why = CPU_FUSE, (f"on the CPU, trials of one width share stacks; {CPU_FUSE} at once measured 1.4-1.6x "
                               "as fast as one at a time")
    else:
        fuse = max(1, min(AUTO_FUSE_MAX, stack_fits(space, cli, free_bytes)[0]))
        why = f"{AUTO_FUSE_MAX} at most, and as many as fit in the GPU's free memory"
    quarter = math.ceil(n_trials / 4)
    if quarter < fuse:
        return quarter, f"{why}; at most a quarter of the {n_trials} trials, so that TPE learns from finished ones"
    return fuse, why
