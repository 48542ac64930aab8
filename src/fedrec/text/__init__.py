"""Item text features: a frozen pretrained sentence encoder, run offline and cached.

:class:`TextEncoder` turns texts into unit vectors (all-MiniLM-L6-v2 by default);
:func:`encode_cached` reuses earlier results; :func:`item_texts` builds one text per item of
a dataset. No flwr here: federated code calls these like any other feature extractor.
"""

from fedrec.text.encoder import (
    TextEncoder,
    TextError,
    check_model_dir,
    default_model_dir,
    default_text_cache_dir,
    encode_cached,
    mean_pool,
)
from fedrec.text.features import item_text_features
from fedrec.text.items import item_text, item_texts

__all__ = [
    "TextEncoder",
    "TextError",
    "check_model_dir",
    "default_model_dir",
    "default_text_cache_dir",
    "encode_cached",
    "item_text",
    "item_text_features",
    "item_texts",
    "mean_pool",
]
