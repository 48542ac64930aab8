"""The federated adapter stage's plain work: settings, local training, the adapter file, and the
encoder that applies it. No flwr here (fedrec.text.federated adapts Messages to these calls).

The adapter file (``adapter.safetensors``) holds only the LoRA ``A``/``B`` arrays plus metadata:
their layout (layers, rank, alpha, targets) and the sha256 identity of the base encoder they were
trained on, so :class:`AdaptedTextEncoder` refuses to apply them to another model. Its privacy
cost is in the ledger of the run that trained it (docs/text-adapters.md).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedrec.text.adapter import (
    LORA_TARGETS,
    AdapterTrainConfig,
    AdapterTrainer,
    ItemTokens,
    _usable,
    adapter_state,
    add_lora,
    load_adapter_state,
    run_steps,
    tokenize_items,
)
from fedrec.text.encoder import TextEncoder, file_digest, model_identity
from fedrec.text.items import TextError
from fedrec.training import DPSGDParams, LocalData, TrainStats

ADAPTER_TASK = "text-adapter"  # its task name in the privacy ledger
ADAPTER_FILE = "adapter.safetensors"
FORMAT = "fedrec-lora-v1"


@dataclass(frozen=True)
class AdaptConfig:
    """The adapter stage's settings; data, partition, rounds and privacy come from FedrecConfig."""

    layers: int = 2  # top transformer blocks adapted (query and value projections)
    rank: int = 4  # LoRA rank r: 2 * r * 384 parameters per projection
    alpha: float = 8.0  # LoRA scale alpha / r (Hu et al. 2022 keep alpha fixed as r varies)
    batch_users: int = 16  # expected users per DP step: Poisson rate = batch / client's users
    local_epochs: int = 1  # expected passes over a client's users per round
    lr: float = 1e-3  # Adam on the adapters, reset each round
    negatives: int = 8  # sampled item texts per user (sampled softmax)
    history: int = 10  # history items forming the user's text
    max_tokens: int = 32  # titles are short; training cost grows with the token count

    def __post_init__(self) -> None:
        bad = [
            name
            for name, ok in {
                "layers": self.layers >= 1,
                "rank": self.rank >= 1,
                "alpha": self.alpha > 0,
                "batch_users": self.batch_users >= 1,
                "local_epochs": self.local_epochs >= 1,
            }.items()
            if not ok
        ]
        if bad:
            raise ValueError(f"AdaptConfig: invalid {', '.join(bad)} (see field comments)")
        self.train_config(1)  # AdapterTrainConfig checks lr, negatives, history, max_tokens

    def train_config(self, n_users: int) -> AdapterTrainConfig:
        """One round's local settings for a client with ``n_users`` usable users."""
        q = min(1.0, self.batch_users / max(n_users, 1))
        return AdapterTrainConfig(
            steps=self.local_epochs * math.ceil(1.0 / q),
            sample_rate=q,
            lr=self.lr,
            negatives=self.negatives,
            history=self.history,
            max_tokens=self.max_tokens,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdaptConfig:
        return cls(**json.loads(text))


def user_histories(data: LocalData) -> list[np.ndarray]:
    """Each training user's items in time order (the unpadded part of their sequence)."""
    return [items[mask] for items, mask in zip(data.seqs.items, data.seqs.mask, strict=True)]


@dataclass
class LocalAdapter:
    """A party's frozen encoder with LoRA adapters and the catalogue's tokens (reused by rounds)."""

    tokenizer: PreTrainedTokenizerBase
    model: nn.Module
    tokens: ItemTokens
    base_identity: str  # sha256 of the base model files

    def state(self) -> dict[str, np.ndarray]:
        return adapter_state(self.model)

    def usable_users(self, histories: Sequence[np.ndarray]) -> int:
        """Users with 2 or more items with text: the DP examples of a round."""
        return len(_usable(histories, self.tokens.has_text))


def build_local_adapter(
    model_dir: str, cfg: AdaptConfig, texts: tuple[str, ...], seed: int
) -> LocalAdapter:
    """The encoder in ``model_dir`` ('' = MiniLM) with fresh adapters (A from ``seed``, B zero)."""
    encoder = TextEncoder(model_dir or None, max_tokens=cfg.max_tokens)
    model = copy.deepcopy(encoder.model)
    add_lora(model, layers=cfg.layers, rank=cfg.rank, alpha=cfg.alpha, seed=seed)
    tokens = tokenize_items(encoder.tokenizer, list(texts), max_tokens=cfg.max_tokens)
    return LocalAdapter(encoder.tokenizer, model, tokens, model_identity(encoder.model_dir))


local_adapter = functools.lru_cache(maxsize=2)(build_local_adapter)
"""A client's :func:`build_local_adapter`, cached per process: each round loads the global
adapters over the previous round's, so the cached copy never carries state into a round."""


def train_local(
    local: LocalAdapter,
    histories: Sequence[np.ndarray],
    cfg: AdapterTrainConfig,
    *,
    seed: int,
    dp: DPSGDParams | None,
) -> TrainStats:
    """``cfg.steps`` steps on ``histories``' users, from the adapters ``local.model`` holds."""
    return run_steps(
        AdapterTrainer(local.model, local.tokens, histories, cfg, seed=seed, dp=dp), cfg
    )


def save_adapter(
    path: str | Path,
    state: Mapping[str, np.ndarray],
    cfg: AdaptConfig,
    *,
    base_identity: str,
    provenance: Mapping[str, str],
) -> Path:
    """Write the A/B arrays and their layout; ``provenance`` (run id, ledger) goes in metadata."""
    meta = {
        "format": FORMAT,
        "layers": str(cfg.layers),
        "rank": str(cfg.rank),
        "alpha": repr(cfg.alpha),
        "targets": ",".join(LORA_TARGETS),
        "base_model": base_identity,
        **{str(k): str(v) for k, v in provenance.items()},
    }
    out = Path(path)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}, out, meta)
    return out


def read_adapter(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays and metadata of an adapter file; TextError if it is not one."""
    p = _adapter_file(path)
    try:
        with safe_open(p, framework="np") as fh:
            meta = dict(fh.metadata() or {})
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as err:
        raise TextError(f"{p}: not a readable safetensors file ({err})") from err
    if meta.get("format") != FORMAT:
        raise TextError(f"{p}: not a fedrec LoRA adapter (format {meta.get('format')!r})")
    return state, meta


class AdaptedTextEncoder(TextEncoder):
    """The frozen encoder plus a LoRA adapter file; its identity (the cache key) covers both."""

    def __init__(
        self, model_dir: str | Path | None, adapter: str | Path, *, max_tokens: int
    ) -> None:
        super().__init__(model_dir, max_tokens=max_tokens)
        self.adapter_path = Path(adapter).expanduser().resolve()
        state, meta = read_adapter(self.adapter_path)
        if meta.get("base_model") != model_identity(self.model_dir):
            raise TextError(
                f"{self.adapter_path}: trained on another base encoder than {self.model_dir}; "
                "set [text] model to the folder the adapter was trained on"
            )
        targets = tuple(meta.get("targets", ",".join(LORA_TARGETS)).split(","))
        try:
            add_lora(
                self.model,
                layers=int(meta["layers"]),
                rank=int(meta["rank"]),
                alpha=float(meta["alpha"]),
                targets=targets,
            )
            load_adapter_state(self.model, state)
        except (KeyError, ValueError) as err:
            raise TextError(f"{self.adapter_path}: unusable adapter ({err})") from err
        self.model.eval()

    @functools.cached_property
    def identity(self) -> str:
        """sha256 over the base model files and the adapter file's bytes."""
        parts = (model_identity(self.model_dir), "lora", file_digest(self.adapter_path))
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def adapter_digest(path: str | Path) -> str:
    """sha256 of an adapter file's bytes (the cache key's part for it)."""
    return file_digest(_adapter_file(path))


def _adapter_file(path: str | Path) -> Path:
    """``path`` as an existing file; TextError naming the fix if there is none."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TextError(f"{p}: adapter file not found; make one with `fedrec text adapt`")
    return p


def as_tensors(state: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Adapter arrays as tensors, sorted by name (one canonical order for an ArrayRecord)."""
    return {k: torch.from_numpy(np.ascontiguousarray(state[k])) for k in sorted(state)}
