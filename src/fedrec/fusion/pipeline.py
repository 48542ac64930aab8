"""Serving-time recommendation: recall with the two-tower, score with every task, fuse, filter.

The classic two-stage cascade (Covington et al. 2016, "Deep Neural Networks for YouTube
Recommendations"): an inner-product search over precomputed item vectors picks the top
``recall_size`` candidates (exact, or through an IVF index for a large catalogue), every task model scores just those, and the run's fuser combines
the per-task scores. A user is their history (raw item ids or item indices): no user-ID, so any
history works, including one the models never saw. An empty history gets the most popular items.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypedDict

import numpy as np
import pandas as pd
import torch

from fedrec.config import load_config
from fedrec.data import Dataset
from fedrec.data.sequences import context_of
from fedrec.fusion.base import Fuser
from fedrec.fusion.evaluate import POPULARITY_FEATURE, item_popularity, popularity_features
from fedrec.fusion.fusers import AverageFuser, fuser_from_dict
from fedrec.fusion.index import IVFIndex
from fedrec.fusion.normalize import normalize
from fedrec.fusion.options import AUTO_IVF_ITEMS, RECALL_INDEXES, RecallIndex, RecommendError
from fedrec.fusion.prior import PRIOR
from fedrec.fusion.stacking import StackingFuser
from fedrec.models.base import TaskModel, UserBatch
from fedrec.models.batching import make_user_batch
from fedrec.models.content import ContentRetrieval
from fedrec.models.recall import TwoTower
from fedrec.models.registry import load_model
from fedrec.rundir import RunDir, write_json_atomic
from fedrec.workload import build_workload

FUSION_FILE = "fusion.json"
CATALOGUE_FILE = "catalogue.json"  # the item ids the run's models index, as a digest
DEFAULT_RECALL_SIZE = 200  # candidates the rankers see: enough for k <= 50 after filtering
MAX_SHOWN = 10  # unknown ids named in an error message

logger = logging.getLogger(__name__)


class Recommendation(TypedDict):
    item: str  # the catalogue's raw item_id
    title: str
    category: str
    score: float  # the fused score (item count for a cold-start popularity list)
    explanation: dict[str, float]  # per task, its normalised score ("popularity" if cold start)


@dataclass(frozen=True)
class Catalogue:
    """Public item metadata aligned with the models' item indices, plus training popularity."""

    item_ids: np.ndarray  # str (I,)
    titles: np.ndarray  # str (I,)
    categories: np.ndarray  # str (I,)
    popularity: np.ndarray  # float64 (I,) training interactions per item
    # False for a DP run: the exact counts are not released (popularity is all zeros then)
    popularity_released: bool = True
    index: dict[str, int] = field(init=False, repr=False)  # raw item_id -> item index

    @classmethod
    def from_items(
        cls, items: pd.DataFrame, popularity: np.ndarray, *, released: bool = True
    ) -> Self:
        def col(name: str) -> np.ndarray:
            return items[name].astype(str).to_numpy(dtype=object)

        pop = np.asarray(popularity, float)
        return cls(col("item_id"), col("title"), col("category"), pop, released)

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        if n == 0 or not len(self.titles) == len(self.categories) == len(self.popularity) == n:
            raise ValueError("a catalogue needs one id, title, category and count per item")
        object.__setattr__(self, "index", {s: i for i, s in enumerate(self.item_ids)})

    def __len__(self) -> int:
        return len(self.item_ids)



@dataclass(frozen=True)
class UserFeatures:
    """The categorical user features the models embed: names, value vocabularies, defaults."""

    names: tuple[str, ...]
    values: tuple[tuple[str, ...], ...]  # per feature, the values whose positions are codes
    defaults: np.ndarray  # int64 (F,) code used when a request omits a feature (the mode)

    @classmethod
    def from_dataset(cls, ds: Dataset) -> Self:
        codes = ds.user_feature_codes()  # (U, F)
        vocab = ds.user_feature_values()
        modes = [int(np.bincount(codes[:, f]).argmax()) for f in range(codes.shape[1])]
        return cls(ds.user_features, tuple(tuple(vocab[f]) for f in ds.user_features),
                   np.asarray(modes, np.int64))

    def encode(self, given: Mapping[str, str] | None) -> np.ndarray:
        """int64 (1, F): codes of ``given`` feature values, defaults where omitted."""
        codes = self.defaults.copy()
        for name, value in (given or {}).items():
            if name not in self.names:
                raise RecommendError(f"unknown user feature {name!r}; known: {list(self.names)}")
            vocab = self.values[self.names.index(name)]
            if value not in vocab:
                raise RecommendError(f"unknown value {value!r} for user feature {name!r}; "
                                     f"known: {list(vocab)[:MAX_SHOWN]}")
            codes[self.names.index(name)] = vocab.index(value)
        return codes[None, :]


class Recommender:
    """Recall top-N by inner product, score with every task model, fuse, filter, keep top k."""

    def __init__(
        self, models: Mapping[str, TaskModel], catalogue: Catalogue, fuser: Fuser,
        features: UserFeatures, *, recall_size: int = DEFAULT_RECALL_SIZE,
        recall_index: RecallIndex = "auto",
    ) -> None:
        recall = models.get("recall")
        if not isinstance(recall, TwoTower | ContentRetrieval):  # user_vectors . item_vectors
            raise RecommendError("the run has no two-tower 'recall' model to retrieve with")
        if any(m.spec.num_items != len(catalogue) for m in models.values()):
            raise RecommendError(f"the models do not match the {len(catalogue)}-item catalogue")
        if recall_size < 1:
            raise ValueError(f"recall_size must be positive, got {recall_size}")
        if recall_index not in RECALL_INDEXES:
            raise ValueError(f"recall_index must be one of {RECALL_INDEXES}, got {recall_index!r}")
        self.models, self.catalogue, self.fuser = dict(models), catalogue, fuser
        self.features, self.recall_size = features, recall_size
        self.max_len = recall.spec.max_len
        with torch.no_grad():
            self.item_vectors = recall.eval().item_vectors().contiguous()  # (I, d')
        self.index = self._build_index(recall_index)
        self._categories = {str(c) for c in catalogue.categories}

    @classmethod
    def from_run_dir(
        cls, path: str | Path, *, recall_size: int = DEFAULT_RECALL_SIZE,
        recall_index: RecallIndex = "auto",
    ) -> Self:
        """Load a run directory's config, task models, item table and fuser (``fusion.json``,
        else equal weights on z-scores). ``recall_index``: exact search, an IVF index, or
        ("auto") the index from ``AUTO_IVF_ITEMS`` items up."""
        run = RunDir(Path(path))
        if not run.config.is_file():
            raise RecommendError(f"{run.path}: no config.toml; pass a fedrec run directory")
        cfg = load_config(run.config)
        missing = [t for t in cfg.tasks if not (run.models / t).is_dir()]
        if missing:
            raise RecommendError(f"{run.path}: no saved model for {missing}; did the run finish?")
        work = build_workload(cfg)
        _check_catalogue(run.path, work.dataset.items["item_id"], cfg.dataset)
        names = [*cfg.tasks, *([PRIOR] if (run.models / PRIOR).is_dir() else [])]
        models = {t: load_model(run.models / t) for t in names}
        private = cfg.privacy.mode != "none"
        catalogue = Catalogue.from_items(
            work.dataset.items, item_popularity(work, private=private), released=not private
        )
        return cls(models, catalogue, load_fuser(run.path, list(models)),
                   UserFeatures.from_dataset(work.dataset), recall_size=recall_size,
                   recall_index=recall_index)

    def recommend(
        self, history: Sequence[str | int], k: int = 10, *, exclude_seen: bool = True,
        category: str | None = None, user_features: Mapping[str, str] | None = None,
        timestamp: int | None = None,
    ) -> list[Recommendation]:
        """The top ``k`` items for a user with this ``history`` (oldest first): raw item_id
        strings or item indices. Fewer than ``k`` only when the filters leave fewer items.
        ``timestamp`` (Unix seconds, default now) sets the request context."""
        k = self._check_k(k)
        allowed = self._allowed(category)
        items = self.resolve(history)
        if items.size == 0:
            return self._popular(k, allowed)
        if exclude_seen:
            allowed[items] = False
        batch = self._user_batch(items, user_features, timestamp)
        cands = self._recall(batch, allowed, k)
        if cands.size == 0:
            return []
        scores = self._score(batch, cands)
        fused = self.fuser.fuse(scores, self._features(cands))[0]
        norm = getattr(self.fuser, "normalization", "none")
        shown = {t: normalize(s, norm)[0] for t, s in scores.items()}
        top = np.argsort(-fused, kind="stable")[:k]
        return [self._row(cands[j], fused[j], {t: float(s[j]) for t, s in shown.items()})
                for j in top]

    def resolve(self, history: Sequence[str | int]) -> np.ndarray:
        """int64 (L,): item indices of raw ids (str) or indices (int); unknown ones raise."""
        out: list[int] = []
        unknown: list[str | int] = []
        for h in history:
            idx = self._index(h)
            if idx is None:
                unknown.append(h)
            else:
                out.append(idx)
        if unknown:
            raise RecommendError(
                f"unknown items in the history: {unknown[:MAX_SHOWN]}"
                f"{' ...' if len(unknown) > MAX_SHOWN else ''}; give catalogue item_id strings "
                f"(e.g. {self.catalogue.item_ids[0]!r}) or indices in [0, {len(self.catalogue)})")
        return np.asarray(out, np.int64)

    def _index(self, h: Any) -> int | None:
        if isinstance(h, str):
            return self.catalogue.index.get(h)
        if isinstance(h, (int, np.integer)) and not isinstance(h, bool):
            return int(h) if 0 <= h < len(self.catalogue) else None
        raise RecommendError(f"history entries must be item id strings or integer indices, "
                             f"got {type(h).__name__}")

    def _check_k(self, k: int) -> int:
        n = len(self.catalogue)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
            raise RecommendError(f"k must be an integer in [1, {n}] (the catalogue), got {k!r}")
        return int(k)

    def _allowed(self, category: str | None) -> np.ndarray:
        if category is None:
            return np.ones(len(self.catalogue), bool)
        if category not in self._categories:
            raise RecommendError(f"unknown category {category!r}; known: "
                                 f"{sorted(self._categories)[:MAX_SHOWN * 3]}")
        return self.catalogue.categories == category

    def _user_batch(
        self, items: np.ndarray, feats: Mapping[str, str] | None, timestamp: int | None
    ) -> UserBatch:
        recent = items[-self.max_len:]
        padded = np.zeros((1, self.max_len), np.int64)
        padded[0, : recent.size] = recent
        mask = np.arange(self.max_len)[None, :] < recent.size
        ts = int(time.time()) if timestamp is None else int(timestamp)
        return make_user_batch(padded, mask, self.features.encode(feats), context_of(np.array([ts])))

    def _build_index(self, recall_index: RecallIndex) -> IVFIndex | None:
        """The IVF index over the item vectors, or None for exact search (paid once, here)."""
        if recall_index == "exact" or (
            recall_index == "auto" and len(self.catalogue) < AUTO_IVF_ITEMS
        ):
            return None
        start = time.perf_counter()
        index = IVFIndex.build(self.item_vectors)
        logger.info("IVF recall index: %d items in %d lists (nprobe %d), built in %.1f s",
                    len(index), index.nlist, index.nprobe, time.perf_counter() - start)
        return index

    def _recall(self, batch: UserBatch, allowed: np.ndarray, k: int) -> np.ndarray:
        """int64 (N,): the top ``max(recall_size, k)`` allowed items by inner product (as
        found by the IVF index, when there is one)."""
        eligible = int(allowed.sum())
        n = min(max(self.recall_size, k), eligible)
        if n == 0:
            return np.zeros(0, np.int64)
        with torch.no_grad():
            user = self.models["recall"].user_vectors(batch)[0]  # type: ignore[operator]
            if self.index is not None:
                return self.index.search(user, n, allowed)
            sims = self.item_vectors @ user  # (I,)
            sims[~torch.from_numpy(allowed)] = -torch.inf
            return torch.topk(sims, n, sorted=False).indices.numpy().astype(np.int64)

    def _score(self, batch: UserBatch, cands: np.ndarray) -> dict[str, np.ndarray]:
        cand = torch.as_tensor(cands[None, :], dtype=torch.long)  # (1, N)
        with torch.no_grad():
            return {t: m.score(batch, cand).numpy().astype(np.float64)
                    for t, m in self.models.items()}

    def _features(self, cands: np.ndarray) -> dict[str, np.ndarray] | None:
        if isinstance(self.fuser, StackingFuser) and not self.fuser.feature_names:
            return None
        return popularity_features(self.catalogue.popularity, cands[None, :])

    def _popular(self, k: int, allowed: np.ndarray) -> list[Recommendation]:
        if not self.catalogue.popularity_released:
            raise RecommendError(
                "this run was trained under differential privacy and releases no item "
                "popularity for a user without history; give at least one item of the history"
            )
        pop = np.where(allowed, self.catalogue.popularity, -np.inf)
        top = np.argsort(-pop, kind="stable")[: min(k, int(allowed.sum()))]
        return [self._row(i, pop[i], {"popularity": float(pop[i])}) for i in top]

    def _row(self, item: int, score: float, explanation: dict[str, float]) -> Recommendation:
        c = self.catalogue
        return Recommendation(item=str(c.item_ids[item]), title=str(c.titles[item]),
                              category=str(c.categories[item]), score=float(score),
                              explanation=explanation)


def _catalogue_digest(item_ids: pd.Series) -> dict[str, Any]:
    import hashlib

    joined = "\n".join(item_ids.astype(str)).encode()
    return {"items": int(len(item_ids)), "sha256": hashlib.sha256(joined).hexdigest()}


def save_catalogue_digest(run_dir: str | Path, item_ids: pd.Series) -> Path:
    """Write the digest of the item ids the run's models index (``catalogue.json``): serving
    rebuilds the catalogue from the run's dataset, and must refuse data that changed since."""
    path = Path(run_dir) / CATALOGUE_FILE
    write_json_atomic(path, _catalogue_digest(item_ids))
    return path


def _check_catalogue(run_dir: Path, item_ids: pd.Series, dataset: str) -> None:
    path = run_dir / CATALOGUE_FILE
    if not path.is_file():  # a run from before the digest existed
        return
    want, have = json.loads(path.read_text()), _catalogue_digest(item_ids)
    if want != have:
        raise RecommendError(
            f"{run_dir}: its models index {want['items']} items, but {dataset} now gives "
            f"{have['items']} items or other ids (catalogue digest {have['sha256'][:12]}, the "
            f"run's {want['sha256'][:12]}): serve it with the data it was trained on"
        )


def save_fuser(run_dir: str | Path, fuser: Fuser) -> Path:
    """Write the fitted fuser to ``<run_dir>/fusion.json`` (atomically) for serving."""
    path = Path(run_dir) / FUSION_FILE
    write_json_atomic(path, fuser.to_dict())
    return path


def load_fuser(run_dir: str | Path, tasks: Sequence[str]) -> Fuser:
    """The run's saved fuser, or equal weights on z-scored tasks when none was saved."""
    path = Path(run_dir) / FUSION_FILE
    if not path.is_file():
        return AverageFuser.from_dict({"normalization": "zscore",
                                       "weights": {t: 1.0 / len(tasks) for t in tasks}})
    fuser = fuser_from_dict(json.loads(path.read_text()))
    fitted = set(fuser.weights) - {POPULARITY_FEATURE}
    if fitted != set(tasks):
        raise RecommendError(f"{path}: fitted on tasks {sorted(fitted)}, the run has "
                             f"{sorted(tasks)}; refit the fusion")
    return fuser
