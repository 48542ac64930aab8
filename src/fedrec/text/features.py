"""Item text features for a run: one vector per item from the public catalogue's text.

Every party (server, each client, the serving process) computes the same vectors from the same
public item table and the same frozen encoder, so they never travel in a message and cost no
privacy budget: the DP-trained parameters are only the small projections that consume them.
"""

from __future__ import annotations

import functools
import logging
import warnings

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
    return _cached(dataset.name, text.model, text.max_tokens, tuple(item_texts(dataset)), progress)


@functools.lru_cache(maxsize=4)
def _cached(
    _name: str, model: str, max_tokens: int, texts: tuple[str, ...], progress: bool
) -> np.ndarray:
    encoder = TextEncoder(model or None, max_tokens=max_tokens)
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
    log.info("text features: %d items x %d dims (%s)", len(texts), encoder.dim, model or "MiniLM")
    return out
