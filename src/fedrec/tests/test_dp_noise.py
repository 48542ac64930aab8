"""DP-SGD's randomness when it must be unpredictable (fedrec.dp_noise)."""

from __future__ import annotations

import math

import numpy as np
import torch

from fedrec.dp_noise import SecureGaussian, entropy_generator


def test_a_seeded_torch_generator_has_only_2_to_the_32_streams():
    """Why the noise does not come from a torch generator seeded with OS entropy: torch seeds
    its Mersenne Twister from the seed's low 32 bits, so a server could search every seed."""
    seed = 0x1234_5678_9ABC
    a = torch.normal(0.0, 1.0, (8,), generator=torch.Generator().manual_seed(seed))
    b = torch.normal(0.0, 1.0, (8,), generator=torch.Generator().manual_seed(seed % 2**32))
    assert torch.equal(a, b)


def test_secure_gaussian_draws_standard_normals_never_twice_the_same():
    n = 400_000
    z = SecureGaussian().standard_normal(n)
    assert abs(z.mean()) < 5 / math.sqrt(n) and abs(z.std() - 1) < 0.005
    tail = float(np.mean(np.abs(z) > 3))  # P(|Z| > 3) = 0.0027 for a standard normal
    assert abs(tail - 0.0027) < 0.0006
    other = SecureGaussian().standard_normal(8)  # a fresh key: another stream
    assert not np.array_equal(z[:8], other)
    few = SecureGaussian().standard_normal(15)  # the dtype of the parameters it noises
    assert few.shape == (15,) and few.dtype == np.float32 and float(np.abs(few).sum()) > 0


def test_entropy_generators_have_independent_full_states():
    a, b = entropy_generator(), entropy_generator()
    assert not torch.equal(torch.rand(16, generator=a), torch.rand(16, generator=b))
    copy = torch.Generator()
    copy.set_state(a.get_state())  # a valid state torch takes back as it is
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=copy))
    u = torch.rand(200_000, generator=entropy_generator())
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
