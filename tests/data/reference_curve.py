"""Deterministic synthetic loss curves with the shape of the reference Coqui VITS Bangla run.

Per epoch, generator (`avg_loss_1`): 68.87 at epoch 0 falling exponentially to ~27.5 by epoch 20,
a 26-28 plateau (minimum 25.24 at epoch 60), a jump peaking at 42 at epoch 85 that stays above the
plateau band for a few epochs and decays back to ~27.5 by epoch 139. Discriminator
(`avg_loss_0`): 1.98 at the start, oscillating between 1.4 and 4.5, 2.65 at the end.
Noise comes from `random.Random(seed)` so the curves are identical everywhere.
"""

from __future__ import annotations

import math
import random

EPOCHS = 140
START = 68.87
PLATEAU = 27.5
SPIKE_EPOCH = 85
SPIKE_PEAK = 42.0
MIN_EPOCH = 60
MIN_VALUE = 25.24


def _clean_generator(epoch: float) -> float:
    """The noise-free per-epoch shape, defined for fractional epochs too (per-step curves)."""
    value = PLATEAU + (START - PLATEAU) * math.exp(-0.25 * epoch)
    if SPIKE_EPOCH - 2 < epoch < SPIKE_EPOCH:
        # The loss climbs for two epochs before the peak.
        value += (SPIKE_PEAK - PLATEAU) * ((epoch - (SPIKE_EPOCH - 2)) / 2) ** 2
    elif epoch >= SPIKE_EPOCH:
        value += (SPIKE_PEAK - PLATEAU) * math.exp(-(epoch - SPIKE_EPOCH) / 6.0)
    return value


def generator_per_epoch(seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    values = []
    for epoch in range(EPOCHS):
        value = _clean_generator(epoch)
        if epoch >= 20 and epoch != SPIKE_EPOCH:
            value += rng.uniform(-1.3, 0.5)
        values.append(value)
    values[0] = START
    values[SPIKE_EPOCH] = SPIKE_PEAK
    values[MIN_EPOCH] = MIN_VALUE
    return values


def generator_per_step(steps_per_epoch: int = 40, seed: int = 1) -> list[float]:
    """Per-step generator loss: the epoch shape plus GAN step noise and isolated single-step jumps
    (each far above the plateau band, never two in a row)."""
    rng = random.Random(seed)
    values = []
    for step in range(EPOCHS * steps_per_epoch):
        value = _clean_generator(step / steps_per_epoch) + rng.gauss(0.0, 1.0)
        if step % 97 == 50 and step > 20 * steps_per_epoch:
            value += rng.uniform(10.0, 20.0)
        values.append(value)
    return values


def discriminator_per_epoch(seed: int = 2) -> list[float]:
    rng = random.Random(seed)
    values = [2.95 + 1.3 * math.sin(2 * math.pi * epoch / 9.0 + 0.4) + rng.uniform(-0.25, 0.25)
              for epoch in range(EPOCHS)]
    values[0], values[-1] = 1.98, 2.65
    return values
