"""DP-SGD's randomness when it must be unpredictable (``privacy.secure_rng``, every partner site).

Why not a seeded torch generator. torch's CPU generator seeds its Mersenne Twister from the low
32 bits of the seed (``manual_seed(s)`` and ``manual_seed(s % 2**32)`` draw the same numbers),
so noise from a generator seeded with OS entropy is still one of 2^32 sequences. Whoever sees
the update (the server) can search them: replaying a candidate seed's noise through the local
optimizer and correlating with the update separates the true seed, and once the noise is known
the guarantee is gone. Opacus's own answer, ``secure_mode``, needs torchcsprng, which has no
build for current torch. So:

* **The noise** comes from AES-256-CTR keyed with 32 bytes of OS entropy (a cryptographically
  secure generator; ``cryptography`` is a dependency already), turned into Gaussians by
  Box-Muller in float32 (as torch draws them for float32 parameters), and each sample is the
  sum of four such draws over 2, as Opacus's ``secure_mode`` does against floating-point attacks on the Gaussian's
  representation (Holohan and Braghin 2021, section 5.1; attack: Jin et al. 2022).
* **The rest of a step's randomness** (the training negatives, dropout masks) is not the noise,
  but the sensitivity argument needs it secret too: negatives are handed out by position in the
  batch, so with a known stream one user's presence shifts the others' negatives and changes
  their clipped gradients. It comes from torch generators whose whole Mersenne Twister state
  (19,968 bits) is drawn from OS entropy (``entropy_generator``), not from a 32-bit seed.
* **The Poisson sample** comes from NumPy's PCG64 seeded with 63 bits of OS entropy
  (``fedrec.training.poisson_sampler``), which NumPy uses in full.

Seeded runs (``noise_seed`` set: simulations without ``secure_rng``) keep torch's generators,
so they repeat bit for bit; their noise protects nothing against whoever holds the config.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

_TWO_PI = np.float32(2 * np.pi)
_U24 = np.float32(1.0 / (1 << 24))  # 24-bit uniforms: float32's exact integers
_DRAWS = 4  # Gaussians summed per sample (Opacus secure_mode's 2n, n = 2)
# torch's CPU generator state (CPUGeneratorImplState, torch 2.x): the initial seed (u64), left
# (i32), seeded (i32), next (u64), then the 624 words of MT19937, each in a u64 slot
_STATE_BYTES = 5056
_WORDS_AT, _WORDS = 24, 624


class SecureGaussian:
    """N(0, 1) samples from a fresh AES-256-CTR keystream (module doc)."""

    def __init__(self) -> None:
        key = os.urandom(32)
        self._stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def standard_normal(self, n: int) -> np.ndarray:
        """``n`` float32 N(0, 1) samples, each the sum of four Box-Muller draws over 2, in
        float32 on 24-bit uniforms, as torch draws ``torch.normal`` for the float32 parameters
        Opacus's ``secure_mode`` noises (float64 took twice as long, the polar method's
        rejection longer still)."""
        pairs = _DRAWS // 2 * n  # a pair of uniforms gives two Gaussians (cosine and sine)
        raw = np.frombuffer(self._stream.update(bytes(8 * pairs)), dtype=np.uint32)
        u = ((raw >> np.uint32(8)).astype(np.float32) + np.float32(0.5)) * _U24  # (0, 1)
        radius = np.sqrt(np.float32(-2) * np.log(u[:pairs]))
        angle = _TWO_PI * u[pairs:]
        cos, sin = radius * np.cos(angle), radius * np.sin(angle)
        return (cos[:n] + cos[n:] + sin[:n] + sin[n:]) / np.float32(2)


class SecureNoiseOptimizer(DPOptimizerFastGradientClipping):
    """Opacus's optimizer for clipped gradients, its noise drawn by ``SecureGaussian``."""

    def __init__(self, *args, gaussian: SecureGaussian, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gaussian = gaussian

    def add_noise(self) -> None:  # Opacus's, with the noise from the CSPRNG
        multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        std = multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
        # one draw for every parameter of the step (a call per small tensor costs more than
        # its samples), handed out in order
        z = self.gaussian.standard_normal(sum(p.summed_grad.numel() for p in self.params))
        start = 0
        for p in self.params:
            g = p.summed_grad
            part = torch.from_numpy(z[start : start + g.numel()] * np.float32(std))
            part = part.reshape(g.shape)
            start += g.numel()
            p.grad = (g + part.to(dtype=g.dtype, device=g.device)).view_as(p)
            _mark_as_processed(p.summed_grad)


def dp_optimizer(
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    noise_seed: int | None,
) -> DPOptimizerFastGradientClipping:
    """Opacus's optimizer for clipped gradients (mean reduction), with the noise from a torch
    generator seeded by ``noise_seed``, or, when it is None, from ``SecureGaussian``."""
    common = dict(
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
    )
    if noise_seed is not None:
        generator = torch.Generator().manual_seed(noise_seed)
        return DPOptimizerFastGradientClipping(optimizer, generator=generator, **common)
    return SecureNoiseOptimizer(optimizer, gaussian=SecureGaussian(), **common)


def entropy_generator() -> torch.Generator:
    """A torch CPU generator whose whole Mersenne Twister state comes from OS entropy."""
    gen = torch.Generator()
    state = gen.get_state().numpy().copy()
    if state.size != _STATE_BYTES:  # fail closed: an unknown layout must not yield a weak state
        raise RuntimeError(
            f"torch's CPU generator state is {state.size} bytes, not the {_STATE_BYTES} fedrec "
            "knows how to fill from OS entropy; refusing to train with predictable randomness"
        )
    words = np.frombuffer(os.urandom(4 * _WORDS), dtype=np.uint32).astype(np.uint64)
    words[0] |= np.uint64(0x8000_0000)  # MT uses only word 0's top bit: all-zero is degenerate
    state[_WORDS_AT : _WORDS_AT + 8 * _WORDS] = words.view(np.uint8)
    state[8:12] = np.array([1], dtype=np.int32).view(np.uint8)  # left = 1: twist before use
    state[16:24] = 0  # next
    gen.set_state(torch.from_numpy(state))
    return gen


def seed_torch_from_entropy() -> None:
    """Give torch's global generator (dropout masks) a state from OS entropy."""
    torch.set_rng_state(entropy_generator().get_state())
