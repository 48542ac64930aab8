"""Item text features for a run: one vector per item from the public catalogue's text.

Every party (server, each client, the serving process) computes the same vectors from the same
public item table and the same frozen encoder, so they never travel in a message and cost no
privacy budget: the DP-trained parameters are only the small projections that consume them.

With ``[text] adapter`` the encoder also applies a LoRA adapter file from ``fedrec text adapt``
(fedrec.text.adapt). The vectors then depend on the users the adapter was trained on: their
privacy cost is the adapter run's, recorded in that run's ledger (docs/text-adapters.md), and the
cache key covers the adapter file's bytes.
"""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path

import numpy as np

from fedrec.config import TextConfig
from fedrec.data.schema import Dataset
from fedrec.text.encoder import TextEncoder, encode_cached
from fedrec.text.items import first_indices, item_texts

log = logging.getLogger(__name__)


def item_text_features(
    text: TextConfig, dataset: Dataset, *, progress: bool = False
) -> np.ndarray | None:
    """Float32[num_items, D] text vectors, or None when ``text.mode`` is 'off'.

    Items without any text (no title, no category: ML-100K has one) get a zero vector and a
    warning naming them; the model still scores them from their ID and category embeddings.
    """
    if text.mode == "off":
        return None
    texts = tuple(item_texts(dataset))
    return _cached(
        dataset.name, text.model, text.max_tokens, texts, progress, *_adapter_key(text.adapter)
    )


def _adapter_key(adapter: str) -> tuple[str, str]:
    """The adapter file's resolved path and content digest ("", "" without one)."""
    if not adapter:
        return "", ""
    from fedrec.text.adapt import adapter_digest

    return str(Path(adapter).expanduser().resolve()), adapter_digest(adapter)


def _encoder(model: str, max_tokens: int, adapter: str) -> TextEncoder:
    if not adapter:
        return TextEncoder(model or None, max_tokens=max_tokens)
    from fedrec.text.adapt import AdaptedTextEncoder

    return AdaptedTextEncoder(model or None, adapter, max_tokens=max_tokens)


@functools.lru_cache(maxsize=4)
def _cached(
    _name: str,
    model: str,
    max_tokens: int,
    texts: tuple[str, ...],
    progress: bool,
    adapter: str = "",
    _adapter_digest: str = "",  # part of the memo key: a rewritten adapter file is re-read
) -> np.ndarray:
    encoder = _encoder(model, max_tokens, adapter)
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        warnings.warn(
            f"{len(empty)} of {len(texts)} items have no text (item indices "
            f"{first_indices(empty)}): they get a zero text vector and are scored from their "
            "ID and category only",
            stacklevel=3,
        )
    keep = [i for i, t in enumerate(texts) if t.strip()]
    out = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    if keep:
        out[keep] = encode_cached(encoder, [texts[i] for i in keep], progress=progress)
    out.setflags(write=False)
    log.info(
        "text features: %d items x %d dims (%s%s)",
        len(texts),
        encoder.dim,
        model or "MiniLM",
        f" + adapter {adapter}" if adapter else "",
    )
    return out
