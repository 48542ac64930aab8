"""Floats to integers in Z_M and back: clip to [-c, c], stochastic rounding onto L levels.

As in Flower's SecAgg+ (``flwr.common.secure_aggregation.quantization``), with two changes: the
rounding randomness comes from the caller's generator (Flower draws from NumPy's global state),
and levels are 0..L-1, so n clients' sum is at most n (L - 1) and fits exactly when that is
below the modulus. Rounding is unbiased; each client's error is below one step 2c / (L - 1).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray

from fedrec.secagg.params import SecAggConfig

log = logging.getLogger(__name__)
Layout = tuple[tuple[str, tuple[int, ...]], ...]  # (name, shape) per input, sorted by name


def layout_of(vectors: Mapping[str, NDArray]) -> Layout:
    return tuple((name, tuple(int(d) for d in np.shape(vectors[name]))) for name in sorted(vectors))


def size_of(layout: Layout) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) for _, shape in layout)


def flatten(vectors: Mapping[str, NDArray]) -> NDArray[np.float64]:
    """All inputs as one float vector in name order; refuses NaN and infinities."""
    if not vectors:
        raise ValueError("nothing to aggregate: the update has no arrays.")
    flat = np.concatenate(
        [np.ravel(np.asarray(vectors[n], dtype=np.float64)) for n in sorted(vectors)]
    )
    if not np.all(np.isfinite(flat)):
        raise ValueError("the update holds NaN or infinite values; refusing to mask it.")
    return flat


def unflatten(flat: NDArray[np.float64], layout: Layout) -> dict[str, NDArray[np.float64]]:
    out, start = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = flat[start : start + size].reshape(shape)
        start += size
    return out


def quantize(
    flat: NDArray[np.float64], config: SecAggConfig, rng: np.random.Generator
) -> NDArray[np.unsignedinteger]:
    """Integers in [0, L-1]: [-c, c] mapped linearly, stochastically rounded."""
    c, levels = config.clipping_range, config.quantization_range
    clipped = np.clip(flat, -c, c)
    if (outside := int(np.count_nonzero(clipped != flat))) > 0:
        log.warning(
            "secure aggregation clipped %d of %d coordinates to [-%g, %g]; "
            "raise clipping_range if this is frequent",
            outside,
            flat.size,
            c,
            c,
        )
    scaled = (clipped + c) * ((levels - 1) / (2 * c))
    low = np.floor(scaled)
    up = rng.random(flat.size) < (scaled - low)
    return np.minimum(low + up, levels - 1).astype(config.word())


def dequantize_sum(
    total: NDArray[np.unsignedinteger], n_clients: int, config: SecAggConfig
) -> NDArray:
    """The float sum of ``n_clients`` quantised inputs from their integer sum (no wrap-around)."""
    c = config.clipping_range
    return total.astype(np.float64) * config.step() - n_clients * c
