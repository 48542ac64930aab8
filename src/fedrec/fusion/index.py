"""Inverted-file (IVF) maximum-inner-product search over item vectors, for large catalogues.

The recall stage wants the N items whose vectors have the largest inner product with the user's.
Exact search scores all I items per request. An inverted file (Sivic & Zisserman 2003; Jégou et
al. 2011, "Product quantization for nearest neighbor search", whose IVF this is without the
quantiser) splits the items into about sqrt(I) lists by k-means once, at load; a query scores,
exactly, only the items of the ``nprobe`` lists whose centroids are nearest to it.

Inner product is not a distance: a long item vector can outscore items closer in direction, and
fedrec's recall vectors need not share a norm (``ContentRetrieval`` appends a popularity logit).
So the lists come from the MIPS-to-nearest-neighbour reduction of Bachrach et al. 2014 ("Speeding
up the Xbox recommender system using a Euclidean transformation for inner-product spaces"): item
``x`` becomes ``(x, sqrt(M^2 - |x|^2))`` with ``M`` the largest norm, so every item has norm ``M``
and, for the query ``(q, 0)``, inner product, cosine and Euclidean distance rank items alike.
Spherical k-means (Dhillon & Modha 2001) on these equal-norm vectors gives unit centroids, whose
nearest to a query is the one with the largest inner product: the lists probed first. Probed
items are ranked by their original inner products, so the index only ever misses items, never
misorders them, and with every list probed it is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Self

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_ITERS = 10  # Lloyd iterations: the lists barely move after a handful
PROBE_SHARE = 1 / 8  # default nprobe: this share of the lists (recall@N >= 0.9 on clustered data)
ASSIGN_CHUNK = 16_384  # items per block of the (items x lists) score matrix while clustering


def default_nlist(num_items: int) -> int:
    """About sqrt(I) lists: balances probing the centroids against scoring the lists' items."""
    return max(1, round(math.sqrt(num_items)))


def default_nprobe(nlist: int) -> int:
    return max(1, math.ceil(nlist * PROBE_SHARE))


@dataclass(frozen=True, eq=False)
class IVFIndex:
    """Items grouped into lists by direction; ``search`` probes the lists nearest the query.

    Build with :meth:`build`; ``dataclasses.replace(index, nprobe=...)`` changes the probe
    width without re-clustering (``nprobe=index.nlist`` makes the search exact).
    """

    vectors: Tensor  # float32 (I, d): the item vectors grouped by list (row j is item order[j])
    centroids: Tensor  # float32 (L, d): the lists' unit centroids, less the reduction's extra axis
    order: np.ndarray  # int64 (I,): item indices grouped by list
    offsets: np.ndarray  # int64 (L + 1,): list l is rows offsets[l]:offsets[l + 1]
    nprobe: int  # lists scored per query, widened when they hold fewer than N allowed items

    def __post_init__(self) -> None:
        if isinstance(self.nprobe, bool) or not 1 <= self.nprobe <= self.nlist:
            raise ValueError(f"nprobe must be an integer in [1, {self.nlist}] (the number of "
                             f"lists), got {self.nprobe!r}")

    @property
    def nlist(self) -> int:
        return len(self.centroids)

    def __len__(self) -> int:
        return len(self.order)

    @classmethod
    def build(
        cls, vectors: Tensor | np.ndarray, *, nlist: int | None = None, nprobe: int | None = None,
        iters: int = DEFAULT_ITERS, seed: int = 0,
    ) -> Self:
        """Cluster ``vectors`` (I, d) into ``nlist`` lists (default about sqrt(I)) with ``iters``
        seeded Lloyd iterations; ``nprobe`` defaults to 1/8 of the lists."""
        x = _check_vectors(vectors)
        nlist = default_nlist(len(x)) if nlist is None else nlist
        if isinstance(nlist, bool) or not 1 <= nlist <= len(x):
            raise ValueError(f"nlist must be an integer in [1, {len(x)}] (the number of items), "
                             f"got {nlist!r}")
        if isinstance(iters, bool) or iters < 1:
            raise ValueError(f"iters must be a positive integer, got {iters!r}")
        centroids, assign = spherical_kmeans(mips_to_nn(x), nlist, iters=iters, seed=seed)
        order = np.argsort(assign.numpy(), kind="stable").astype(np.int64)
        counts = np.bincount(assign.numpy(), minlength=nlist)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(x[torch.from_numpy(order)].contiguous(), centroids[:, :-1].contiguous(),
                   order, offsets,
                   default_nprobe(nlist) if nprobe is None else nprobe)

    def search(self, query: Tensor, n: int, allowed: np.ndarray | None = None) -> np.ndarray:
        """int64 (min(n, allowed items),): the allowed items with the largest inner product
        with ``query`` (d,) among the probed lists, best first. Probing widens past ``nprobe``
        lists until they hold ``n`` allowed items, so it never returns fewer than exact search."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        q = query.detach().reshape(-1).to(torch.float32)
        if q.numel() != self.vectors.shape[1]:
            raise ValueError(f"the query has {q.numel()} dimensions, the items "
                             f"{self.vectors.shape[1]}")
        ok = None if allowed is None else self._check_mask(allowed)
        ids, scores = self._probe(q, int(n), ok)
        if ok is not None:
            keep = ok[ids]
            ids, scores = ids[keep], scores[torch.from_numpy(keep)]
        if ids.size == 0:
            return ids
        return ids[torch.topk(scores, min(int(n), ids.size)).indices.numpy()]

    def _probe(self, q: Tensor, n: int, ok: np.ndarray | None) -> tuple[np.ndarray, Tensor]:
        """The items (C,) and inner products (C,) of the lists nearest ``q``: ``nprobe`` lists,
        or more until they hold ``n`` allowed items (or every list is probed)."""
        lists = torch.argsort(self.centroids @ q, descending=True, stable=True).numpy()
        ids: list[np.ndarray] = []
        scores: list[Tensor] = []
        found = 0
        for p, lst in enumerate(lists):
            if p >= self.nprobe and found >= n:
                break
            start, stop = self.offsets[lst], self.offsets[lst + 1]
            ids.append(self.order[start:stop])
            scores.append(torch.mv(self.vectors[start:stop], q))  # slices, not a gather: faster
            found += ids[-1].size if ok is None else int(ok[ids[-1]].sum())
        return np.concatenate(ids), torch.cat(scores)

    def _check_mask(self, allowed: np.ndarray) -> np.ndarray:
        ok = np.asarray(allowed)
        if ok.dtype != bool or ok.shape != (len(self),):
            raise ValueError(f"allowed must be a boolean mask of shape ({len(self)},), got "
                             f"{ok.dtype} {ok.shape}")
        return ok


def mips_to_nn(x: Tensor) -> Tensor:
    """float32 (I, d + 1): ``(x, sqrt(M^2 - |x|^2)) / M``, unit rows whose cosine with ``(q, 0)``
    ranks items as ``x @ q`` does (Bachrach et al. 2014)."""
    norms = x.norm(dim=1)
    top = float(norms.max())
    if top == 0.0:
        raise ValueError("every item vector is zero: there is nothing to search by")
    extra = (top**2 - norms**2).clamp_min(0.0).sqrt()
    return torch.cat([x, extra[:, None]], 1) / top


def spherical_kmeans(
    points: Tensor, k: int, *, iters: int, seed: int
) -> tuple[Tensor, Tensor]:
    """Unit centroids (k, d) and each point's cluster (I,) int64: Lloyd's algorithm by cosine
    (Dhillon & Modha 2001), started from ``k`` distinct points drawn with ``seed``. A cluster
    that empties keeps its centroid."""
    gen = torch.Generator().manual_seed(seed)
    centroids = F.normalize(points[torch.randperm(len(points), generator=gen)[:k]], dim=1)
    for _ in range(iters):
        assign = _nearest(points, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        filled = torch.bincount(assign, minlength=k) > 0
        centroids = torch.where(filled[:, None], F.normalize(sums, dim=1), centroids)
    return centroids, _nearest(points, centroids)


def _nearest(points: Tensor, centroids: Tensor) -> Tensor:
    """int64 (I,): each point's centroid of largest inner product, in blocks to bound memory."""
    return torch.cat([(block @ centroids.T).argmax(1)
                      for block in points.split(ASSIGN_CHUNK)])


def _check_vectors(vectors: Tensor | np.ndarray) -> Tensor:
    x = torch.as_tensor(vectors).detach().to(torch.float32).contiguous()
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"item vectors must be a non-empty (items, dim) matrix, got shape "
                         f"{tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("item vectors must be finite (no NaN or inf)")
    return x
