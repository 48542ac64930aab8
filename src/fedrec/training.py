"""Local training of one task model on one holder's users: plain PyTorch, optionally DP-SGD.

The same function trains a client's local copy in a federation and the centralized baseline, so
the two differ only in whose users they see. Under DP the example is a user (their history at
this site): Poisson sampling of users, per-user clipping (Opacus's ghost norms, one backward pass:
fedrec.clipping), Gaussian noise.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedrec.config import TaskConfig
from fedrec.data.sequences import Sequences
from fedrec.dp_noise import dp_optimizer, entropy_generator, seed_torch_from_entropy
from fedrec.models.base import TaskModel
from fedrec.models.batching import make_sequence_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPSGDParams:
    """One DP-SGD release's parameters (calibrated once per run, see fedrec.privacy)."""

    noise_multiplier: float
    clipping_norm: float
    noise_seed: int | None = None  # None: seed from OS entropy (unpredictable noise)
    # distributed noise (privacy.noise = "distributed"): > 0 makes the call one DP-SGD step at
    # Poisson rate ``sample_rate`` whose noise is shared by at least this many clients
    contributors: int = 0
    sample_rate: float = 0.0


@dataclass(frozen=True)
class TrainStats:
    """What one local training call did. Under record-level DP only the counts may leave the
    client: ``loss`` is an unnoised function of its users' data (RoundResult.metrics)."""

    loss: float  # mean per-user loss over the steps (nan if every Poisson batch was empty)
    steps: int  # optimizer steps taken (each one a DP release under DP)
    sample_rate: float  # users per step / users (the Poisson rate under DP)
    examples: int  # users trained on
    seconds: float


@dataclass(frozen=True)
class LocalData:
    """A holder's training users: their sequences and categorical features (aligned rows)."""

    seqs: Sequences
    feats: np.ndarray  # int64 [N, F]

    @property
    def n_users(self) -> int:
        return int(self.seqs.items.shape[0])


def sample_rate_for(cfg: TaskConfig, n_users: int) -> float:
    """Expected share of users per step: batch_size / n_users, capped at 1."""
    return min(1.0, cfg.batch_size / max(n_users, 1))


def steps_per_round(cfg: TaskConfig, n_users: int) -> int:
    """Steps in one round of local training: local_epochs * (1 / sample_rate), rounded up."""
    return cfg.local_epochs * math.ceil(1.0 / sample_rate_for(cfg, n_users))


def train_task(
    model: TaskModel,
    data: LocalData,
    cfg: TaskConfig,
    *,
    seed: int,
    dp: DPSGDParams | None = None,
    proximal_mu: float = 0.0,
) -> TrainStats:
    """Train ``model`` in place for ``cfg.local_epochs`` over ``data``'s users.

    ``proximal_mu`` > 0 adds FedProx's pull towards the starting (global) weights (Li et al.
    2020) as a decoupled step after each update: it touches no data, so it is DP post-processing.
    """
    if data.n_users == 0:
        raise ValueError("no users to train on: the client's partition is empty")
    if dp is not None and dp.noise_seed is None:
        # unpredictable: the negatives and dropout too, not only the noise (fedrec.dp_noise)
        seed_torch_from_entropy()
        gen = entropy_generator()
    else:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer: torch.optim.Optimizer
    if dp is not None and dp.contributors > 0:  # one step of the shared noisy gradient sum
        q, n_steps = dp.sample_rate, 1
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0 / cfg.batch_size)
    else:
        q, n_steps = sample_rate_for(cfg, data.n_users), steps_per_round(cfg, data.n_users)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if proximal_mu > 0:
        optimizer.register_step_post_hook(_proximal_hook(model, cfg.lr * proximal_mu))
    start = time.perf_counter()
    model.train()
    if dp is None:
        losses = _train_plain(model, optimizer, data, cfg, rng, gen, n_steps)
    else:
        losses = _train_private(model, optimizer, data, cfg, rng, gen, n_steps, q, dp)
    model.eval()
    loss = float(np.mean(losses)) if losses else float("nan")  # nan: every batch was empty
    if losses and not math.isfinite(loss):
        raise FloatingPointError(f"degenerate training loss {loss} for task {model.task}")
    return TrainStats(loss, n_steps, q, data.n_users, time.perf_counter() - start)


def _proximal_hook(model: nn.Module, rate: float):
    anchor = [p.detach().clone() for p in model.parameters()]

    def hook(_opt, _args, _kwargs) -> None:
        with torch.no_grad():
            for p, p0 in zip(model.parameters(), anchor, strict=False):
                p.sub_(rate * (p - p0))

    return hook


def _batch(
    data: LocalData, rows: np.ndarray, cfg: TaskConfig, num_items: int, gen: torch.Generator
):
    s = data.seqs
    return make_sequence_batch(
        s.items[rows],
        s.mask[rows],
        data.feats[rows],
        s.context[rows],
        num_items,
        cfg.negatives,
        gen,
    )


def _train_plain(model, optimizer, data, cfg, rng, gen, n_steps) -> list[float]:
    """Shuffled mini-batches of users; the same number of steps the private path takes."""
    losses: list[float] = []
    order = np.empty(0, dtype=np.int64)
    for _ in range(n_steps):
        if order.size < cfg.batch_size:
            order = np.concatenate([order, rng.permutation(data.n_users)])
        rows, order = order[: cfg.batch_size], order[cfg.batch_size :]
        batch = _batch(data, rows, cfg, model.spec.num_items, gen)
        loss = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _train_private(
    model, optimizer, data, cfg, rng, gen, n_steps, q, dp: DPSGDParams
) -> list[float]:
    """DP-SGD with Opacus's ghost norms and optimizer (exact per-user norms), clipped in one
    backward pass (``fedrec.clipping``: book-keeping instead of Opacus's second pass).

    We use Opacus's GradSampleModuleFastGradientClipping (as BookkeepingClipper) and
    DPOptimizerFastGradientClipping but sample users ourselves (Poisson, rate q, a fixed number of steps) so each step is one
    accounted release even when the sampled batch is empty; accounting lives in fedrec.privacy.

    Distributed noise (``dp.contributors`` m > 0, one step): the gradient is the *sum* of the
    clipped per-user gradients plus Gaussian noise of std ``noise_multiplier / sqrt(m)`` times
    the clipping norm, and ``optimizer`` (SGD, lr 1 / batch size) moves the model by it, so the
    update is that sum scaled by a constant every client shares. Summed over at least m clients
    by secure aggregation, the noise has the full multiplier: one DP-SGD step over all their
    users, each client's Poisson sample at the same rate (Kairouz et al. 2021 do this with
    discrete noise; fedrec's Gaussian is continuous, see docs/distributed-dp.md).
    """
    from fedrec.clipping import BookkeepingClipper

    sampler = poisson_sampler(dp, rng)
    expected = q * data.n_users
    noise_multiplier = dp.noise_multiplier
    if dp.contributors > 0:  # distributed: the sum of clipped gradients plus a noise share
        expected, noise_multiplier = 1, dp.noise_multiplier / math.sqrt(dp.contributors)
    gsm = BookkeepingClipper(model, max_grad_norm=dp.clipping_norm)
    dp_opt = dp_optimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=dp.clipping_norm,
        expected_batch_size=max(1, round(expected)),
        noise_seed=dp.noise_seed,
    )
    losses: list[float] = []
    try:
        for _ in range(n_steps):
            rows = np.flatnonzero(sampler.random(data.n_users) < q)
            dp_opt.zero_grad(set_to_none=True)
            if rows.size == 0:
                noise_only_step(model, dp_opt)
                continue
            batch = _batch(data, rows, cfg, model.spec.num_items, gen)
            per_user = gsm(batch)  # (b,)
            gsm.clipped_backward(per_user)  # p.grad: the sum of the clipped per-user gradients
            dp_opt.step()
            losses.append(float(per_user.detach().mean()))
    finally:
        gsm._close()
    return losses


def noise_only_step(model: nn.Module, dp_opt) -> None:
    """An empty Poisson batch still releases (pure noise): zero gradients, then the DP step."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    dp_opt.step()


def poisson_sampler(dp: DPSGDParams, seeded: np.random.Generator) -> np.random.Generator:
    """The generator of DP-SGD's Poisson sample: ``seeded`` (the run's, so simulations
    reproduce) when the noise is seeded too, else one from OS entropy. Amplification by
    subsampling assumes the sample is secret: a server that knows the seed could recompute which
    users every step used, and the epsilon of the ledger would not hold."""
    return seeded if dp.noise_seed is not None else np.random.default_rng(_entropy_seed())


def _entropy_seed() -> int:
    import secrets

    return secrets.randbits(63)
