"""Federated LoRA fine-tuning of the text encoder under DP (issue 6, part 3).

Real all-MiniLM-L6-v2 (offline), a small synthetic catalogue, Flower's simulation engine for
the end-to-end run; the privacy controller and the adapted features are exercised directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from fedrec.cli import main
from fedrec.client.privacy import PrivacyRefusal
from fedrec.config import TextConfig, load_config
from fedrec.data import load_dataset
from fedrec.privacy import audit_ledger, read_ledger
from fedrec.text import TextEncoder, TextError, item_text_features, item_texts
from fedrec.text.adapt import (
    ADAPTER_TASK,
    AdaptConfig,
    AdaptedTextEncoder,
    as_tensors,
    build_local_adapter,
    read_adapter,
    save_adapter,
)
from fedrec.text.adapter import adapter_parameters
from fedrec.text.encoder import cache_key
from fedrec.text.federated import adapter_privacy, local_round
from fedrec.training import TrainStats

DATA = "synthetic:merchants=2,users=40,items=300"  # 2 clients: one per core
SMALL = "synthetic:merchants=2,users=20,items=100"  # features only: fewer texts to encode
ACFG = AdaptConfig(rank=2, max_tokens=16, batch_users=8, negatives=3, history=4)
LORA_SUFFIXES = ("lora_a.weight", "lora_b.weight")


def _cfg(tmp_path: Path, rounds: int = 2):
    return load_config(
        None,
        {
            "dataset": DATA,
            "partition": "site",
            "rounds": rounds,
            "seed": 1,
            "privacy.mode": "record",
            "privacy.epsilon": 4.0,
            "privacy.delta": 1e-3,
            "text.max_tokens": 16,
            "out": str(tmp_path / "run"),
        },
    )


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


@pytest.mark.slow
def test_federated_adapter_run_trains_ledgers_and_ships_only_lora(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "adapt"
    rc = main(
        ["text", "adapt", "--dataset", DATA, "--partition", "site", "--rounds", "2",
         "--epsilon", "4", "--delta", "1e-3", "--rank", "2", "--max-tokens", "16",
         "--batch-users", "8", "--seed", "1", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    state, meta = read_adapter(out / "adapter.safetensors")
    assert state and all(k.endswith(LORA_SUFFIXES) for k in state)
    assert meta["rank"] == "2" and meta["run_id"] == "adapt"
    b = [v for k, v in state.items() if k.endswith("lora_b.weight")]
    assert all(np.abs(v).max() > 0 for v in b)  # trained away from the zero init
    summary = json.loads((out / "summary.json").read_text())
    travelled = summary["travelled"]
    assert travelled["sent"] == travelled["received"] == sorted(state)  # only A/B travel
    assert summary["rounds_completed"] == 2
    # under DP no client reports its (unnoised) loss
    assert all(r["loss"] is None and r["replies"] == 2 for r in summary["per_round"])
    assert set(summary["utility"]) >= {"frozen_hr@10", "adapted_hr@10"}
    entries = read_ledger(out / "privacy_ledger.jsonl")
    assert len(entries) == 2 * 2  # one per client per round
    for client in ("client-0", "client-1"):
        mine = [e for e in entries if e["client"] == client]
        assert [e["round"] for e in mine] == [1, 2]
        assert {e["task"] for e in mine} == {ADAPTER_TASK}
        assert {e["mechanism"] for e in mine} == {"dp-sgd"}
        assert len({e["noise_multiplier"] for e in mine}) == 1  # calibrated once for the run
        eps = [e["epsilon_composed"] for e in mine]
        assert 0 < eps[0] < eps[1] <= 4.0
        assert summary["privacy"]["clients"][client]["epsilon"] == eps[1]
    assert audit_ledger(out / "privacy_ledger.jsonl", run_id="adapt", every_entry=False).ok


def test_a_client_past_its_budget_refuses(tmp_path):
    cfg = _cfg(tmp_path, rounds=2)
    ledger = str(tmp_path / "privacy_ledger.jsonl")
    plan = (0.4, 3)
    ctx = _context()
    for r in (1, 2):
        ctl = adapter_privacy(cfg, ctx, 0, plan, n_users=20, ledger_path=ledger, run_id="run")
        assert ctl is not None
        ctl.before_round(r)
        ctl.after_round(r, _result(plan))
    entries = read_ledger(ledger)
    assert [e["round"] for e in entries] == [1, 2]
    assert entries[-1]["epsilon_composed"] <= 4.0
    ctl = adapter_privacy(cfg, ctx, 0, plan, n_users=20, ledger_path=ledger, run_id="run")
    with pytest.raises(PrivacyRefusal, match="round 3 would raise epsilon"):
        ctl.before_round(3)
    # A restarted node (empty context.state) rebuilds the spent budget from the ledger, and the
    # whole client round refuses before any training.
    work_cfg = _cfg(tmp_path, rounds=2)
    local = build_local_adapter("", ACFG, _texts(), 0)
    arrays = ArrayRecord(as_tensors(local.state()))
    with pytest.raises(PrivacyRefusal):
        local_round(
            work_cfg, ACFG, arrays, client=0, server_round=3, context=_context(),
            ledger_path=ledger, run_id="run",
        )  # fmt: skip
    assert len(read_ledger(ledger)) == 2


def _result(plan: tuple[float, int]):
    from fedrec.client.local import RoundResult

    return RoundResult({ADAPTER_TASK: TrainStats(1.0, plan[1], plan[0], 20, 0.1)})


def _texts(data: str = DATA) -> tuple[str, ...]:
    return tuple(item_texts(load_dataset(data, seed=1)))


def _write_adapter(path: Path, *, scale: float, seed: int = 0) -> Path:
    local = build_local_adapter("", ACFG, _texts(SMALL), 0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter_parameters(local.model).items():
            if name.endswith("lora_b.weight"):
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    return save_adapter(
        path, local.state(), ACFG, base_identity=local.base_identity, provenance={"run_id": "t"}
    )


def test_text_adapter_setting_changes_features_and_cache_key(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "cache"))
    dataset = load_dataset(SMALL, seed=1)
    zero = _write_adapter(tmp_path / "zero.safetensors", scale=0.0)
    trained = _write_adapter(tmp_path / "trained.safetensors", scale=0.05)
    cfg = load_config(None, {"text.mode": "content", "text.max_tokens": 16,
                             "text.adapter": str(trained)})  # fmt: skip
    assert cfg.text.adapter == str(trained)
    plain = TextConfig(mode="content", max_tokens=16)
    frozen = item_text_features(plain, dataset)
    adapted = item_text_features(cfg.text, dataset)
    same = item_text_features(TextConfig(mode="content", max_tokens=16, adapter=str(zero)), dataset)
    assert frozen is not None and adapted is not None and same is not None
    assert adapted.shape == frozen.shape
    assert np.abs(adapted - frozen).max() > 1e-3  # the adapter changes the item vectors
    np.testing.assert_allclose(same, frozen, atol=1e-5)  # B = 0: the frozen encoder exactly
    texts = [t for t in _texts(SMALL) if t.strip()]
    keys = {
        cache_key(TextEncoder(max_tokens=16), texts),
        cache_key(AdaptedTextEncoder(None, zero, max_tokens=16), texts),
        cache_key(AdaptedTextEncoder(None, trained, max_tokens=16), texts),
    }
    assert len(keys) == 3  # the key covers the adapter file's bytes
    _write_adapter(trained, scale=0.05, seed=1)  # rewritten in place: new bytes, new vectors
    again = item_text_features(cfg.text, dataset)
    assert again is not None and np.abs(again - adapted).max() > 1e-4


def test_bad_adapter_files_are_refused(tmp_path):
    with pytest.raises(TextError, match="not found"):
        AdaptedTextEncoder(None, tmp_path / "missing.safetensors", max_tokens=16)
    local = build_local_adapter("", ACFG, _texts(SMALL), 0)
    other = save_adapter(
        tmp_path / "other.safetensors", local.state(), ACFG, base_identity="0" * 64, provenance={}
    )
    with pytest.raises(TextError, match="another base encoder"):
        AdaptedTextEncoder(None, other, max_tokens=16)
    with pytest.raises(ValueError, match="invalid rank"):
        AdaptConfig(rank=0)


def test_a_partner_site_does_not_run_the_adapter_stage(monkeypatch):
    """There is no deployed adapter stage: a server naming this app cannot make a site train on
    its data outside its own ledger and budget."""
    from flwr.app import Message
    from flwr.supercore.task_identity import TaskIdentity

    from fedrec.text.federated import train

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # a Message outside a running app
    for attr in ("_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 0)
    msg = Message(RecordDict(), dst_node_id=1, message_type="train")
    site = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "data-path": "/srv/shop"},
                   state=RecordDict(), run_config={})  # fmt: skip
    reply = train(msg, site)
    assert reply.has_error() and "partner sites" in reply.error.reason
