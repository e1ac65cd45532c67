"""Learning-rate schedules as a factor of the peak rate per step, for `torch.optim.lr_scheduler.LambdaLR`.

A LambdaLR takes one factor function per parameter group, which lets models stacked in one optimiser each
follow their own schedule over their own number of steps. The values equal torch's OneCycleLR and
CosineAnnealingLR, which `MLPClassifier` uses (tests/test_fused.py checks it).
"""

import math
from collections.abc import Callable

# OneCycleLR's defaults, which MLPClassifier keeps: 30 % warm-up from lr / 25, then down to lr / 25 / 1e4.
PCT_START, DIV_FACTOR, FINAL_DIV_FACTOR = 0.3, 25.0, 1e4


def cosine_between(start: float, end: float, fraction: float) -> float:
    """From start (fraction 0) to end (fraction 1) along half a cosine, as OneCycleLR's annealing."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * fraction) + 1)


def one_cycle(total_steps: int) -> Callable[[int], float]:
    """OneCycleLR(max_lr=1, total_steps, cycle_momentum=False): warm up to 1, then anneal to ~0."""
    initial = 1 / DIV_FACTOR
    final = initial / FINAL_DIV_FACTOR
    peak_step = float(PCT_START * total_steps) - 1

    def factor(step: int) -> float:
        if step <= peak_step:
            return cosine_between(initial, 1.0, step / peak_step)
        return cosine_between(1.0, final, (step - peak_step) / (total_steps - 1 - peak_step))

    return factor


def cosine(total_steps: int) -> Callable[[int], float]:
    """CosineAnnealingLR(T_max=total_steps, eta_min=0): from 1 to 0 along half a cosine."""
    return lambda step: (1 + math.cos(math.pi * step / total_steps)) / 2


def constant(total_steps: int) -> Callable[[int], float]:
    return lambda step: 1.0


SCHEDULES = {"onecycle": one_cycle, "cosine": cosine, "constant": constant}
