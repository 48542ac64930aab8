"""The IVF recall index (issue 4): known exact answers on synthetic vectors, the allowed mask,
determinism, argument checks, and the Recommender and CLI wiring on the small trained run."""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedrec.fusion.index import IVFIndex, default_nprobe, mips_to_nn
from fedrec.fusion.pipeline import Recommender
from fedrec.recommend_cli import add_parsers
from fedrec.tests.test_fusion_run import small_run

TS = 1_700_000_000


def unnormalised(items: int, dim: int, seed: int) -> torch.Tensor:
    """Random directions with norms in [0.5, 3] and a popularity-like last column."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(items, dim, generator=gen)
    x = x / x.norm(dim=1, keepdim=True) * (0.5 + 2.5 * torch.rand(items, 1, generator=gen))
    return torch.cat([x, torch.randn(items, 1, generator=gen)], 1)


def clustered(items: int, dim: int, clusters: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, dim, generator=gen)
    labels = torch.randint(0, clusters, (items,), generator=gen)
    x = centers[labels] + 0.3 * torch.randn(items, dim, generator=gen)
    return x * (0.5 + torch.rand(items, 1, generator=gen))


def exact_top(x: torch.Tensor, q: torch.Tensor, n: int, allowed: np.ndarray | None = None):
    scores = (x @ q).numpy().astype(np.float64)
    if allowed is not None:
        scores[~allowed] = -np.inf
    top = np.argsort(-scores, kind="stable")[: min(n, int(np.isfinite(scores).sum()))]
    return top


@pytest.fixture(scope="module")
def vectors() -> torch.Tensor:
    return unnormalised(2_000, 8, seed=0)


@pytest.fixture(scope="module")
def index(vectors) -> IVFIndex:
    return IVFIndex.build(vectors, seed=0)


def test_the_reduction_gives_unit_rows_that_rank_by_inner_product(vectors):
    aug = mips_to_nn(vectors)
    np.testing.assert_allclose(aug.norm(dim=1).numpy(), 1.0, rtol=1e-5)
    q = torch.randn(vectors.shape[1], generator=torch.Generator().manual_seed(1))
    by_ip = np.argsort(-(vectors @ q).numpy(), kind="stable")
    by_cos = np.argsort(-(aug @ torch.cat([q, torch.zeros(1)])).numpy(), kind="stable")
    np.testing.assert_array_equal(by_ip[:50], by_cos[:50])


def test_probing_every_list_is_exact_search(vectors, index):
    full = replace(index, nprobe=index.nlist)
    gen = torch.Generator().manual_seed(2)
    for q in torch.randn(20, vectors.shape[1], generator=gen):
        np.testing.assert_array_equal(full.search(q, 25), exact_top(vectors, q, 25))


def test_default_probe_recalls_nine_tenths_of_the_exact_top_n_on_clustered_data():
    x = clustered(10_000, 16, clusters=40, seed=3)
    index = IVFIndex.build(x, seed=0)
    assert index.nlist == 100 and index.nprobe == default_nprobe(100) < index.nlist
    gen = torch.Generator().manual_seed(4)
    shares = [np.isin(exact_top(x, q, 50), index.search(q, 50)).mean()
              for q in torch.randn(50, 16, generator=gen)]
    assert np.mean(shares) >= 0.9


def test_the_allowed_mask_is_honoured_and_probing_widens_to_find_n(vectors, index):
    rng = np.random.default_rng(5)
    q = torch.randn(vectors.shape[1], generator=torch.Generator().manual_seed(5))
    allowed = rng.random(len(vectors)) < 0.3
    got = index.search(q, 40, allowed)
    assert len(got) == 40 and allowed[got].all()
    full = replace(index, nprobe=index.nlist)
    np.testing.assert_array_equal(full.search(q, 40, allowed), exact_top(vectors, q, 40, allowed))
    # only the items of the list farthest from the query: the default probe must widen to it
    far = int(torch.argmin(index.centroids @ q))
    allowed = np.zeros(len(vectors), bool)
    allowed[index.order[index.offsets[far]: index.offsets[far + 1]]] = True
    n = int(allowed.sum())
    assert n > 0
    assert set(index.search(q, n, allowed)) == set(np.flatnonzero(allowed))


def test_a_mask_leaving_fewer_than_n_items_returns_all_of_them_and_none_returns_nothing(
    vectors, index
):
    allowed = np.zeros(len(vectors), bool)
    allowed[[3, 99, 1500, 1999]] = True
    q = torch.randn(vectors.shape[1], generator=torch.Generator().manual_seed(6))
    got = index.search(q, 20, allowed)
    np.testing.assert_array_equal(got, exact_top(vectors, q, 20, allowed))
    assert index.search(q, 20, np.zeros(len(vectors), bool)).size == 0


def test_the_same_seed_builds_the_same_index(vectors, index):
    again = IVFIndex.build(vectors, seed=0)
    np.testing.assert_array_equal(again.order, index.order)
    np.testing.assert_array_equal(again.offsets, index.offsets)
    assert torch.equal(again.centroids, index.centroids)
    q = torch.randn(vectors.shape[1], generator=torch.Generator().manual_seed(7))
    np.testing.assert_array_equal(again.search(q, 30), index.search(q, 30))


@pytest.mark.parametrize(
    "build, match",
    [
        ({"nprobe": 0}, "nprobe"),
        ({"nlist": 10, "nprobe": 11}, "nprobe"),
        ({"nlist": 0}, "nlist"),
        ({"nlist": 10**6}, "nlist"),
        ({"iters": 0}, "iters"),
    ],
)
def test_bad_build_arguments_raise(vectors, build, match):
    with pytest.raises(ValueError, match=match):
        IVFIndex.build(vectors, **build)


@pytest.mark.parametrize(
    "vectors, match",
    [
        (torch.zeros(0, 4), "non-empty"),
        (torch.ones(5), "non-empty"),
        (torch.tensor([[1.0, float("nan")]]), "finite"),
        (torch.zeros(3, 2), "zero"),
    ],
)
def test_bad_vectors_raise(vectors, match):
    with pytest.raises(ValueError, match=match):
        IVFIndex.build(vectors)


def test_bad_search_arguments_raise(vectors, index):
    q = torch.ones(vectors.shape[1])
    with pytest.raises(ValueError, match="n must be"):
        index.search(q, 0)
    with pytest.raises(ValueError, match="dimensions"):
        index.search(torch.ones(3), 5)
    with pytest.raises(ValueError, match="boolean mask"):
        index.search(q, 5, np.ones(len(vectors), int))
    with pytest.raises(ValueError, match="boolean mask"):
        index.search(q, 5, np.ones(7, bool))


@pytest.fixture(scope="module")
def exact() -> Recommender:
    return Recommender.from_run_dir(small_run(), recall_index="exact")


def test_the_recommender_with_a_fully_probed_index_matches_exact_recall(exact):
    ivf = Recommender(exact.models, exact.catalogue, exact.fuser, exact.features,
                      recall_size=30, recall_index="ivf")
    assert isinstance(ivf.index, IVFIndex) and exact.index is None
    ivf.index = replace(ivf.index, nprobe=ivf.index.nlist)
    narrow = Recommender(exact.models, exact.catalogue, exact.fuser, exact.features,
                         recall_size=30, recall_index="exact")
    category = str(exact.catalogue.categories[0])
    for history, kw in [([1, 2, 3], {}), ([5, 8, 13, 21], {"category": category}),
                        ([0], {"exclude_seen": False})]:
        want = narrow.recommend(history, 8, timestamp=TS, **kw)
        got = ivf.recommend(history, 8, timestamp=TS, **kw)
        assert [r["item"] for r in got] == [r["item"] for r in want]
        np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want],
                                   rtol=1e-5, atol=1e-6)


def test_auto_searches_a_small_catalogue_exactly_and_bad_choices_raise(exact):
    auto = Recommender(exact.models, exact.catalogue, exact.fuser, exact.features)
    assert auto.index is None
    with pytest.raises(ValueError, match="recall_index"):
        Recommender(exact.models, exact.catalogue, exact.fuser, exact.features,
                    recall_index="faiss")  # type: ignore[arg-type]


@pytest.mark.parametrize("command", ["recommend", "serve"])
def test_both_commands_take_a_recall_index_flag(command):
    parser = argparse.ArgumentParser(prog="fedrec")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    who = ["--user", "u"] if command == "recommend" else []
    args = parser.parse_args([command, "run", *who, "--recall-index", "ivf"])
    assert args.recall_index == "ivf"
    assert parser.parse_args([command, "run", *who]).recall_index == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args([command, "run", *who, "--recall-index", "faiss"])
