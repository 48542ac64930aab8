"""A synthetic multi-merchant e-commerce log with known structure, for tests and demos.

Each merchant (the ``site`` of an event, and the natural federated client) has its own
customers and an overlapping slice of one shared catalogue. Choices follow a latent-factor
model: user taste = merchant taste + noise, item vectors cluster by category, and an item
is drawn with probability softmax(taste . item + log popularity + segment price affinity)
(Gumbel-max sampling). Popularity is Zipfian, prices log-normal per category, and users
tend to stay in the category of their previous purchase, so sequence models have
something to learn. Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedrec.data.errors import DataError
from fedrec.data.schema import Dataset, build_dataset

log = logging.getLogger(__name__)

CATEGORIES = (("apparel", "jacket"), ("footwear", "sneakers"), ("electronics", "headphones"),
              ("home", "lamp"), ("kitchen", "blender"), ("books", "novel"), ("sports", "tent"),
              ("beauty", "serum"), ("toys", "puzzle"), ("garden", "planter"),
              ("office", "notebook"), ("pets", "leash"))
ADJECTIVES = ("Classic", "Compact", "Cozy", "Deluxe", "Eco", "Essential", "Lightweight",
              "Modern", "Premium", "Rugged", "Smart", "Vintage")
BRANDS = ("Alderway", "Brightfen", "Cobaltine", "Duneworks", "Fernhill", "Glimmerco",
          "Harborline", "Ironleaf", "Junipa", "Kestrelle")
SEGMENTS = ("budget", "regular", "premium")
SEGMENT_SHARE = (0.3, 0.5, 0.2)
SEGMENT_PRICE_TASTE = (-1.0, 0.0, 0.7)  # weight on centred log price: budget avoids, premium seeks
DIM = 8                 # latent factors
TASTE_SCALE = 2.0       # personal taste against popularity; 2 keeps both visible
USER_NOISE = 0.7        # spread of users around their merchant's taste
ITEM_NOISE = 0.5        # spread of items around their category's vector
ZIPF_EXPONENT = 1.0     # popularity ~ 1 / rank
STAY_PROB = 0.6         # chance the next purchase is in the previous purchase's category
CATALOGUE_OVERLAP = 1.5  # each merchant stocks 1.5x its even share of the catalogue
START = 1_577_836_800   # 2020-01-01 UTC
DAY = 86_400


@dataclass(frozen=True)
class _World:
    """Latent structure shared by all users."""

    item_cat: np.ndarray    # (I,)
    item_vec: np.ndarray    # (I, DIM)
    item_bias: np.ndarray   # (I,) log popularity
    log_price: np.ndarray   # (I,)
    catalogues: list[np.ndarray]  # per merchant, item indices


def _check(n_merchants: int, n_users: int, n_items: int, per_user: tuple[int, int],
           n_categories: int) -> None:
    """Reject settings that cannot produce a valid dataset."""
    checks = [(n_merchants >= 1, "n_merchants must be >= 1"),
              (n_users >= n_merchants, "n_users must be >= n_merchants (each needs a customer)"),
              (n_items >= 1, "n_items must be >= 1"),
              (1 <= n_categories <= n_items, "n_categories must be in [1, n_items]"),
              (1 <= per_user[0] <= per_user[1],
               "interactions_per_user must be (lo, hi), 1 <= lo <= hi")]
    for ok, message in checks:
        if not ok:
            raise DataError(f"synthetic_ecommerce: {message}; got merchants={n_merchants}, "
                            f"users={n_users}, items={n_items}, categories={n_categories}, "
                            f"interactions_per_user={per_user}")


def _catalogues(rng: np.random.Generator, n_items: int, n_merchants: int) -> list[np.ndarray]:
    """Overlapping windows over a shuffled catalogue that together cover every item."""
    perm = rng.permutation(n_items)
    step = n_items / n_merchants
    length = min(n_items, math.ceil(CATALOGUE_OVERLAP * step))
    return [np.sort(perm[(math.floor(m * step) + np.arange(length)) % n_items])
            for m in range(n_merchants)]


def _world(rng: np.random.Generator, n_items: int, n_categories: int,
           n_merchants: int) -> _World:
    item_cat = rng.permutation(np.arange(n_items) % n_categories)
    cat_vec = rng.normal(size=(n_categories, DIM))
    item_vec = (cat_vec[item_cat] + ITEM_NOISE * rng.normal(size=(n_items, DIM))) / math.sqrt(DIM)
    item_bias = -ZIPF_EXPONENT * np.log1p(rng.permutation(n_items))
    log_price = rng.normal(3.0, 0.8, n_categories)[item_cat] + 0.4 * rng.normal(size=n_items)
    return _World(item_cat, item_vec, item_bias, log_price,
                  _catalogues(rng, n_items, n_merchants))


def _category_names(n_categories: int) -> list[tuple[str, str]]:
    """(category, noun) pairs; past the base list, names get a numeric suffix."""
    out = []
    for c in range(n_categories):
        name, noun = CATEGORIES[c % len(CATEGORIES)]
        out.append((name if c < len(CATEGORIES) else f"{name}-{c // len(CATEGORIES) + 1}", noun))
    return out


def _items_frame(rng: np.random.Generator, world: _World) -> pd.DataFrame:
    names = _category_names(int(world.item_cat.max()) + 1)
    adjectives = rng.choice(ADJECTIVES, size=len(world.item_cat))
    brands = rng.choice(BRANDS, size=len(world.item_cat))
    titles = [f"{adj} {names[c][1]} by {brand}"
              for adj, c, brand in zip(adjectives, world.item_cat, brands, strict=True)]
    return pd.DataFrame({"item_id": [f"item-{i}" for i in range(len(titles))], "title": titles,
                         "category": [names[c][0] for c in world.item_cat],
                         "price": np.round(np.exp(world.log_price), 2)})


def _merchant_of_user(rng: np.random.Generator, n_users: int, n_merchants: int) -> np.ndarray:
    """Every merchant gets a customer; the rest split by uneven (Dirichlet) shares."""
    shares = rng.dirichlet(np.full(n_merchants, 4.0))
    rest = rng.choice(n_merchants, size=n_users - n_merchants, p=shares)
    return rng.permutation(np.concatenate([np.arange(n_merchants), rest]))


def _choose_items(rng: np.random.Generator, scores: np.ndarray, cats: np.ndarray,
                  n_events: int) -> np.ndarray:
    """Positions of ``n_events`` distinct purchases, sticky to the previous category."""
    free = np.ones(len(scores), dtype=bool)
    chosen = np.empty(n_events, dtype=np.int64)
    for t in range(n_events):
        allowed = free
        if t and rng.random() < STAY_PROB and np.any(free & (cats == cats[chosen[t - 1]])):
            allowed = free & (cats == cats[chosen[t - 1]])
        noisy = np.where(allowed, scores + rng.gumbel(size=len(scores)), -np.inf)
        chosen[t] = int(np.argmax(noisy))
        free[chosen[t]] = False
    return chosen


def _timestamps(rng: np.random.Generator, n_events: int) -> np.ndarray:
    """Strictly increasing times: a purchase every 1+Poisson(3) days near a habitual hour."""
    habit = rng.integers(8, 23)
    days = rng.integers(0, 180) + np.cumsum(1 + rng.poisson(3.0, n_events))
    hours = np.clip(habit + np.round(rng.normal(0.0, 1.5, n_events)), 0, 23).astype(np.int64)
    return START + days * DAY + hours * 3600 + rng.integers(0, 3600, n_events)


def _events(rng: np.random.Generator, world: _World, taste: np.ndarray, price_taste: float,
            catalogue: np.ndarray, per_user: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One user's (items, timestamps)."""
    n_events = min(int(rng.integers(per_user[0], per_user[1], endpoint=True)), len(catalogue))
    centred_price = world.log_price[catalogue] - world.log_price.mean()
    scores = (TASTE_SCALE * world.item_vec[catalogue] @ taste + world.item_bias[catalogue]
              + price_taste * centred_price)
    picks = _choose_items(rng, scores, world.item_cat[catalogue], n_events)
    return catalogue[picks], _timestamps(rng, n_events)


def synthetic_ecommerce(*, n_merchants: int = 4, n_users: int = 400, n_items: int = 300,
                        interactions_per_user: tuple[int, int] = (5, 40), n_categories: int = 8,
                        seed: int = 0) -> Dataset:
    """Generate the dataset described in the module docstring (name 'synthetic').

    Each user buys 'interactions_per_user' distinct items (capped at their merchant's
    catalogue size); ``site`` is 'merchant-<m>', the user feature ``segment`` is
    budget/regular/premium and shifts price preference.
    """
    per_user = (int(interactions_per_user[0]), int(interactions_per_user[1]))
    _check(n_merchants, n_users, n_items, per_user, n_categories)
    rng = np.random.default_rng(seed)
    world = _world(rng, n_items, n_categories, n_merchants)
    items = _items_frame(rng, world)
    merchant = _merchant_of_user(rng, n_users, n_merchants)
    taste = rng.normal(size=(n_merchants, DIM))[merchant] + USER_NOISE * rng.normal(
        size=(n_users, DIM))
    segment = rng.choice(len(SEGMENTS), size=n_users, p=SEGMENT_SHARE)
    frames = []
    for u in range(n_users):
        picks, times = _events(rng, world, taste[u], SEGMENT_PRICE_TASTE[segment[u]],
                               world.catalogues[merchant[u]], per_user)
        frames.append(pd.DataFrame({"user": f"user-{u}", "item": [f"item-{i}" for i in picks],
                                    "timestamp": times, "site": f"merchant-{merchant[u]}"}))
    users = pd.DataFrame({"user_id": [f"user-{u}" for u in range(n_users)],
                          "segment": np.asarray(SEGMENTS)[segment]})
    log.info("synthetic: %d merchants, %d users, %d items, seed %d",
             n_merchants, n_users, n_items, seed)
    return build_dataset("synthetic", pd.concat(frames, ignore_index=True), items, users,
                         ("segment",))
