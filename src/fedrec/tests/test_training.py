"""Local training: plain and DP-SGD paths, FedProx pull, and the wire format of a round."""

import numpy as np
import pytest
import torch

from fedrec.client.local import build_task_models
from fedrec.config import FedrecConfig, TaskConfig
from fedrec.strategies.records import pack, unpack_into
from fedrec.training import DPSGDParams, LocalData, steps_per_round, train_task


def _models(spec, seed=0):
    return build_task_models(FedrecConfig(), spec, seed)


def test_plain_training_lowers_the_loss(small):
    data, spec = small
    model = _models(spec)["personal"]
    cfg = TaskConfig(lr=0.01, batch_size=16, local_epochs=1, dim=16, negatives=8)
    first = train_task(model, data, cfg, seed=0).loss
    for s in range(1, 8):
        last = train_task(model, data, cfg, seed=s).loss
    assert last < 0.8 * first


def test_dp_training_takes_planned_steps_and_stays_finite(small):
    data, spec = small
    model = _models(spec)["recall"]
    cfg = TaskConfig(lr=0.01, batch_size=8, local_epochs=2, dim=16, negatives=8)
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_task(model, data, cfg, seed=1, dp=DPSGDParams(1.0, 1.0, noise_seed=5))
    assert stats.steps == steps_per_round(cfg, data.n_users) == 2 * 8
    assert stats.sample_rate == pytest.approx(8 / 60)
    assert np.isfinite(stats.loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=False))


def test_dp_noise_is_reproducible_from_its_seed(small):
    data, spec = small
    one = LocalData(
        type(data.seqs)(
            *(getattr(data.seqs, f)[:1] for f in ("users", "items", "mask", "context"))
        ),
        data.feats[:1],
    )
    cfg = TaskConfig(lr=0.01, batch_size=1, local_epochs=1, dim=16, negatives=4)
    results = []
    for _ in range(2):
        model = _models(spec)["ranking"]
        start = [p.detach().clone() for p in model.parameters()]
        train_task(model, one, cfg, seed=2, dp=DPSGDParams(2.0, 1.0, noise_seed=11))
        results.append([p.detach().clone() for p in model.parameters()])
        assert any(not torch.equal(a, b) for a, b in zip(start, results[-1], strict=False))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=False))  # same seeds, same noise


def test_poisson_sample_is_secret_unless_the_noise_is_seeded(small):
    """Noise switched off, so only the Poisson sample can tell two runs apart: with seeded noise
    (simulation) a run repeats exactly; with OS-entropy noise (noise_seed None: secure_rng and
    every deployed client) the sample is drawn from OS entropy too, so a server that knows the
    run's seed cannot recompute which users a step used."""
    data, spec = small
    cfg = TaskConfig(lr=0.01, batch_size=8, local_epochs=1, dim=16, negatives=4)

    def trained(noise_seed):
        model = _models(spec)["recall"]
        train_task(model, data, cfg, seed=3, dp=DPSGDParams(0.0, 1.0, noise_seed=noise_seed))
        return [p.detach().clone() for p in model.parameters()]

    seeded = [trained(7), trained(7)]
    assert all(torch.equal(a, b) for a, b in zip(*seeded, strict=True))
    secret = [trained(None), trained(None)]
    assert any(not torch.equal(a, b) for a, b in zip(*secret, strict=True))


def test_noise_only_step_changes_weights(small):
    from opacus.optimizers import DPOptimizerFastGradientClipping

    from fedrec.training import noise_only_step

    _, spec = small
    model = _models(spec)["personal"]
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=4,
        loss_reduction="mean",
        generator=torch.Generator().manual_seed(0),
    )
    before = [p.detach().clone() for p in model.parameters()]
    noise_only_step(model, opt)
    moved = [float((p - b).abs().max()) for p, b in zip(model.parameters(), before, strict=False)]
    assert min(moved) > 0  # every parameter received noise of std 1 * 1 / 4


def test_fedprox_pull_keeps_weights_closer_to_the_start(small):
    data, spec = small
    cfg = TaskConfig(lr=0.02, batch_size=8, local_epochs=2, dim=16, negatives=8)
    dist = {}
    for mu in (0.0, 5.0):
        model = _models(spec)["recall"]
        start = [p.detach().clone() for p in model.parameters()]
        train_task(model, data, cfg, seed=0, proximal_mu=mu)
        dist[mu] = sum(float((p - s).pow(2).sum()) for p, s in zip(model.parameters(), start, strict=False))
    assert dist[5.0] < 0.9 * dist[0.0]


def test_pack_unpack_round_trip_and_mismatch(small):
    _, spec = small
    a, b = _models(spec, seed=0), _models(spec, seed=1)
    record = pack(a)
    assert all(k.split("/")[0] in a for k in record)
    unpack_into(record, b)
    for task in a:
        for (n, p), (_, q) in zip(a[task].named_parameters(), b[task].named_parameters(), strict=False):
            assert torch.equal(p, q), n
    from fedrec.config import load_config

    narrow = load_config(None, {"tasks": {t: {"dim": 8} for t in a}})
    wider = build_task_models(narrow, spec, 0)
    with pytest.raises(ValueError, match="shape"):
        unpack_into(record, wider)
