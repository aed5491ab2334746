"""Synthetic request logs with item attributes and correlated multi-task labels.

The generative story (all numpy, vectorised, deterministic for a seed):

* **Items** get a category (20, skewed), a latent vector near their category's centre, a Zipf
  popularity, and attributes: ``category``, ``language`` (8), ``region`` (1-3 of 10), ``creator``
  (Zipf over ``num_creators``), ``tags`` (1-4 of 60, mostly the category's own three), ``year`` and a
  ``title``.
* **Users** hold 1..``max_interests`` interest vectors near category centres; the affinity of a user
  and an item is the best dot product over the user's interests. Each user gets a candidate pool: the
  items of highest affinity.
* **Requests** of a user are spaced by exponential gaps after a random start. Each serves a skewed
  number of impressions (log-normal, median ``median_impressions``): items from the pool (biased to its
  top) or popular items, ranked by a noisy affinity (the served order).
* **Labels**: ``click ~ sigmoid(scale·affinity + click_bias − position_decay·log1p(position))``,
  ``like`` only after a click, ``share`` only after a like, each with its own bias.
* **Timeline**: a pre-period of engagements (before the first request) plus every clicked impression at
  or after its request's ts, so a request's history (ts < request ts) holds the earlier requests'
  engagements. Action bitmask: click = 1, like = 2, share = 4.

Example::

    from sterling.data.synth import SynthConfig, generate
    generate(SynthConfig(num_users=100, num_items=500), "runs/synth")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sterling.data.schema import (
    ACTION,
    ITEM_ID,
    POSITION,
    REQUEST_ID,
    TS,
    USER_ID,
    DatasetPaths,
    Roles,
    items_table,
    list_array,
    requests_table,
    users_table,
    write_table,
)

CATEGORIES = (
    "news", "sports", "music", "gaming", "comedy", "food", "travel", "fashion", "tech", "science",
    "movies", "books", "fitness", "pets", "art", "diy", "finance", "education", "cars", "beauty",
)  # fmt: skip
TAG_SUFFIXES = ("tips", "live", "daily")  # each category owns three tags: 60 in all
LANGUAGES = ("en", "es", "pt", "fr", "de", "hi", "ja", "ar")
LANGUAGE_SHARES = (0.42, 0.16, 0.1, 0.08, 0.07, 0.07, 0.06, 0.04)
REGIONS = ("na", "latam", "eu", "uk", "mena", "africa", "india", "sea", "east_asia", "oceania")
COUNTRIES = ("US", "BR", "IN", "MX", "GB", "DE", "FR", "JP", "ID", "NG", "EG", "AU")
COUNTRY_SHARES = (0.24, 0.12, 0.14, 0.07, 0.06, 0.06, 0.05, 0.06, 0.07, 0.05, 0.04, 0.04)
AGE_BUCKET_SHARES = (0.08, 0.22, 0.26, 0.18, 0.12, 0.09, 0.05)
SURFACES = ("home", "search", "related", "notifications")
SURFACE_SHARES = (0.55, 0.15, 0.2, 0.1)
TITLE_WORDS = ("quiet", "golden", "lost", "bright", "hidden", "wild", "last", "secret", "river", "city",
               "night", "garden", "story", "signal", "mountain", "voyage")  # fmt: skip
ROLES = Roles(
    format="requests",
    context=("surface", "hour"),
    user=("age_bucket", "country"),
    labels=("click", "like", "share"),
    impression_features=("item_age_days",),
    attributes=("category", "language", "region", "creator", "tags", "year"),
    display=("title",),
)
#: The Value Model over the synthetic tasks (the demo's and the synthetic served snapshot's):
#: clicks first, likes and shares as bonuses.
DEMO_VALUE = "click + 0.5*like^0.5 + 0.25*share"
DAY = 86_400


@dataclass(frozen=True)
class SynthConfig:
    """Size and behaviour of a synthetic request log.

    Args:
        seed: the random seed; equal configs write identical files.
        num_users, num_items, num_creators: population sizes.
        requests_per_user: inclusive range of requests per user (uniform).
        impressions_per_request: inclusive clip range of impressions per request.
        median_impressions, impressions_sigma: the log-normal impressions-per-request distribution.
        history_length: inclusive range of pre-period engagements per user (uniform).
        latent_dim: dimension of user interests and item vectors.
        max_interests: a user has 1..max_interests interests.
        zipf_exponent: item popularity ∝ 1 / rank**zipf_exponent.
        popular_share: fraction of served items drawn by popularity rather than affinity.
        candidate_pool: items of highest affinity a user's affinity-served items come from.
        affinity_scale, click_bias, like_bias, share_bias, position_decay: label logits (see module doc).
        start_ts: unix seconds of the earliest request; requests span ``days`` days.
    """

    seed: int = 0
    num_users: int = 2_000
    num_items: int = 5_000
    num_creators: int = 500
    requests_per_user: tuple[int, int] = (1, 20)
    impressions_per_request: tuple[int, int] = (1, 100)
    median_impressions: float = 15.0
    impressions_sigma: float = 0.7
    history_length: tuple[int, int] = (20, 300)
    latent_dim: int = 16
    max_interests: int = 3
    zipf_exponent: float = 1.1
    popular_share: float = 0.3
    candidate_pool: int = 300
    affinity_scale: float = 4.0
    click_bias: float = -4.0
    like_bias: float = -3.5
    share_bias: float = -4.5
    position_decay: float = 0.3
    start_ts: int = 1_704_067_200
    days: int = 30

    def __post_init__(self) -> None:
        for name in ("requests_per_user", "impressions_per_request", "history_length"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"SynthConfig.{name} must be a range (low, high) with 0 <= low <= high")
        if self.impressions_per_request[0] < 1:
            raise ValueError("SynthConfig.impressions_per_request must start at 1 or more")
        if min(self.num_users, self.num_items, self.num_creators, self.latent_dim, self.max_interests) < 1:
            raise ValueError("SynthConfig sizes must be positive")
        if not 0.0 <= self.popular_share <= 1.0:
            raise ValueError("SynthConfig.popular_share must be in [0, 1]")


def _normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _zipf(n: int, exponent: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** exponent
    return p / p.sum()


def _pick_lists(rng, scores: np.ndarray, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the columns of the 1..k highest scores (k uniform in [low, high]), sorted: offsets, flat."""
    count = rng.integers(low, high + 1, len(scores))
    top = np.argsort(-scores, axis=1)[:, :high]
    top = np.sort(np.where(np.arange(high) < count[:, None], top, scores.shape[1]), axis=1)
    return np.concatenate([[0], np.cumsum(count)]), top[top < scores.shape[1]]


def _segment_cumsum(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Cumulative sums restarting at every segment (segments of ``counts`` consecutive values)."""
    total = np.cumsum(values)
    before = np.repeat(total[np.cumsum(counts) - counts] - values[np.cumsum(counts) - counts], counts)
    return total - before


@dataclass(frozen=True)
class _World:
    """Latent state: items [N] and users [U]."""

    item_vectors: np.ndarray  # float32 [N, D]
    popularity: np.ndarray  # float [N], sums to 1
    publish_ts: np.ndarray  # int64 [N]
    interests: np.ndarray  # float32 [U, M, D]
    pool: np.ndarray  # int [U, P] item indices, highest affinity first

    def affinity(self, users: np.ndarray, items: np.ndarray, chunk: int = 65_536) -> np.ndarray:
        """float32 [n]: best interest dot product of each (user, item) pair."""
        out = np.empty(len(users), np.float32)
        for s in range(0, len(users), chunk):
            u, i = users[s : s + chunk], items[s : s + chunk]
            out[s : s + chunk] = np.einsum("nmd,nd->nm", self.interests[u], self.item_vectors[i]).max(axis=1)
        return out


def _items(config: SynthConfig, rng) -> tuple[dict, np.ndarray, np.ndarray]:
    """Item columns, category centres [C, D] and item vectors [N, D]."""
    n, c = config.num_items, len(CATEGORIES)
    centres = _normalize(rng.normal(size=(c, config.latent_dim)))
    category = rng.choice(c, n, p=rng.permutation(_zipf(c, 0.6)))
    noise = rng.normal(size=(n, config.latent_dim)) * 0.7 / np.sqrt(config.latent_dim)
    vectors = _normalize(centres[category] + noise)
    region_offsets, regions = _pick_lists(rng, rng.random((n, len(REGIONS))), 1, 3)
    owns_tag = np.arange(3 * c)[None, :] // 3 == category[:, None]
    tag_offsets, tags = _pick_lists(rng, rng.random((n, 3 * c)) + 1.5 * owns_tag, 1, 4)
    tag_names = np.array([f"{cat}-{suffix}" for cat in CATEGORIES for suffix in TAG_SUFFIXES])
    words = rng.integers(0, len(TITLE_WORDS), (n, 2))
    columns = {
        ITEM_ID: np.sort(rng.choice(np.arange(1, 20 * n + 1), n, replace=False)),
        "category": np.array(CATEGORIES)[category],
        "language": np.array(LANGUAGES)[rng.choice(len(LANGUAGES), n, p=LANGUAGE_SHARES)],
        "region": list_array(region_offsets, np.array(REGIONS)[regions]),
        "creator": 1_000 + rng.choice(config.num_creators, n, p=_zipf(config.num_creators, 1.0)),
        "tags": list_array(tag_offsets, tag_names[tags]),
        "year": np.clip(2025 - rng.exponential(12.0, n).astype(np.int32), 1960, 2025).astype(np.int32),
        "title": [
            f"{CATEGORIES[k].title()}: The {TITLE_WORDS[a].title()} {TITLE_WORDS[b].title()} #{i}"
            for i, (k, (a, b)) in enumerate(zip(category, words))
        ],
    }
    return columns, centres, vectors


def _world(config: SynthConfig, rng, centres: np.ndarray, vectors: np.ndarray) -> _World:
    u, m, n = config.num_users, config.max_interests, config.num_items
    count = rng.integers(1, m + 1, u)
    picks = rng.choice(len(centres), (u, m), p=_zipf(len(centres), 0.6))
    noise = rng.normal(size=(u, m, config.latent_dim)) * 0.5 / np.sqrt(config.latent_dim)
    interests = _normalize(centres[picks] + noise)
    interests = np.where((np.arange(m) < count[:, None])[:, :, None], interests, interests[:, :1])
    popularity = _zipf(n, config.zipf_exponent)[rng.permutation(n)]
    publish_ts = config.start_ts - (rng.exponential(365.0, n) * DAY).astype(np.int64)
    p = min(config.candidate_pool, n)
    pool = np.empty((u, p), np.int64)
    for s in range(0, u, 256):
        scores = np.einsum("umd,nd->umn", interests[s : s + 256], vectors).max(axis=1)
        top = np.argpartition(-scores, p - 1, axis=1)[:, :p]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        pool[s : s + 256] = np.take_along_axis(top, order, axis=1)
    return _World(vectors, popularity, publish_ts, interests, pool)


def _served_items(config: SynthConfig, rng, world: _World, user: np.ndarray) -> np.ndarray:
    """Item index of each of len(user) impressions: pool items biased to the top, or popular items."""
    p = world.pool.shape[1]
    rank = np.minimum(rng.exponential(p / 6.0, len(user)).astype(np.int64), p - 1)
    popular = rng.choice(len(world.popularity), len(user), p=world.popularity)
    return np.where(rng.random(len(user)) < config.popular_share, popular, world.pool[user, rank])


def _requests(config: SynthConfig, rng, world: _World) -> tuple[dict, dict, np.ndarray, np.ndarray, dict, np.ndarray]:
    """Request columns [R], impression columns [T], request offsets [R + 1] into the impressions,
    affinity [T], engagement events [E] and each user's first request ts [U]."""
    u = config.num_users
    per_user = rng.integers(config.requests_per_user[0], config.requests_per_user[1] + 1, u)
    user = np.repeat(np.arange(u), per_user)
    first_ts = config.start_ts + rng.integers(0, config.days * DAY // 2, u)
    gaps = 60 + rng.exponential(config.days * DAY / 2 / max(config.requests_per_user[1], 1), len(user))
    gaps[np.cumsum(per_user)[per_user > 0] - per_user[per_user > 0]] = 0
    ts = first_ts[user] + _segment_cumsum(gaps, per_user[per_user > 0]).astype(np.int64)

    low, high = config.impressions_per_request
    drawn = rng.lognormal(np.log(config.median_impressions), config.impressions_sigma, len(user))
    request = np.repeat(np.arange(len(user)), np.clip(np.rint(drawn), low, high).astype(np.int64))
    item = _served_items(config, rng, world, user[request])
    keep = np.unique(request * config.num_items + item, return_index=True)[1]  # one impression per item
    request, item = request[keep], item[keep]
    affinity = world.affinity(user[request], item)
    order = np.lexsort((-(affinity + rng.normal(0.0, 0.35, len(item))), request))  # the served ranking
    request, item, affinity = request[order], item[order], affinity[order]
    counts = np.bincount(request, minlength=len(user))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    position = np.arange(len(item)) - offsets[request]

    logit = config.affinity_scale * affinity
    click = rng.random(len(item)) < _sigmoid(logit + config.click_bias - config.position_decay * np.log1p(position))
    like = click & (rng.random(len(item)) < _sigmoid(logit + config.like_bias))
    share = like & (rng.random(len(item)) < _sigmoid(logit + config.share_bias))

    request_ids = np.empty(len(user), np.int64)
    request_ids[np.lexsort((user, ts))] = np.arange(1, len(user) + 1)  # ids in global time order
    requests = {
        REQUEST_ID: request_ids,
        USER_ID: user,
        TS: ts,
        "surface": np.array(SURFACES)[rng.choice(len(SURFACES), len(user), p=SURFACE_SHARES)],
        "hour": ((ts // 3600) % 24).astype(np.int8),
    }
    impressions = {
        ITEM_ID: item,
        POSITION: position.astype(np.int16),
        "click": click.astype(np.int8),
        "like": like.astype(np.int8),
        "share": share.astype(np.int8),
        "item_age_days": ((ts[request] - world.publish_ts[item]) / DAY).astype(np.float32),
    }
    delay = position[click] * 5 + rng.integers(0, 120, int(click.sum()))
    engagements = {
        USER_ID: user[request][click],
        ITEM_ID: item[click],
        TS: ts[request][click] + delay,
        ACTION: (1 | like[click] << 1 | share[click] << 2).astype(np.int8),
    }
    return requests, impressions, offsets, affinity, engagements, first_ts


def _pre_period(config: SynthConfig, rng, world: _World, first_ts: np.ndarray) -> dict:
    """Engagement events [E] of each user before the user's first request."""
    low, high = config.history_length
    user = np.repeat(np.arange(config.num_users), rng.integers(low, high + 1, config.num_users))
    item = _served_items(config, rng, world, user)
    logit = config.affinity_scale * world.affinity(user, item)
    like = rng.random(len(user)) < _sigmoid(logit + config.like_bias)
    share = like & (rng.random(len(user)) < _sigmoid(logit + config.share_bias))
    return {
        USER_ID: user,
        ITEM_ID: item,
        TS: first_ts[user] - 1 - rng.integers(0, 90 * DAY, len(user)),
        ACTION: (1 | like << 1 | share << 2).astype(np.int8),
    }


@dataclass(frozen=True)
class SynthLog:
    """A simulated log, the columns of the three files plus the latent truth.

    Args:
        requests: request_id, user_id, ts, surface, hour, each [R], sorted by (user_id, ts).
        impression_offsets: int64 [R + 1]; request r's impressions are rows offsets[r]:offsets[r + 1].
        impressions: item_id, position, click, like, share, item_age_days, each [T], in served order.
        affinity: float32 [T], the true user-item affinity behind each impression's labels.
        users: user_id, age_bucket, country, each [U].
        timeline_offsets: int64 [U + 1] into ``timeline``.
        timeline: item_id, action, ts, each [E], sorted by (user, ts, item_id).
        items: item_id and the attribute and display columns, each [N].
    """

    requests: dict
    impression_offsets: np.ndarray
    impressions: dict
    affinity: np.ndarray
    users: dict
    timeline_offsets: np.ndarray
    timeline: dict
    items: dict


def simulate(config: SynthConfig) -> SynthLog:
    """Simulate a request log in memory (see the module docstring)."""
    rng = np.random.default_rng(config.seed)
    items, centres, vectors = _items(config, rng)
    world = _world(config, rng, centres, vectors)
    requests, impressions, offsets, affinity, engagements, first_ts = _requests(config, rng, world)
    pre = _pre_period(config, rng, world, first_ts)
    events = {k: np.concatenate([pre[k], engagements[k]]) for k in pre}
    order = np.lexsort((events[ITEM_ID], events[TS], events[USER_ID]))
    events = {k: v[order] for k, v in events.items()}

    item_ids = items[ITEM_ID]
    user_ids = np.arange(1, config.num_users + 1, dtype=np.int64)
    impressions[ITEM_ID] = item_ids[impressions[ITEM_ID]]
    requests[USER_ID] = user_ids[requests[USER_ID]]
    timeline = {ITEM_ID: item_ids[events[ITEM_ID]], ACTION: events[ACTION], TS: events[TS]}
    timeline_offsets = np.concatenate([[0], np.cumsum(np.bincount(events[USER_ID], minlength=config.num_users))])
    users = {
        USER_ID: user_ids,
        "age_bucket": rng.choice(len(AGE_BUCKET_SHARES), config.num_users, p=AGE_BUCKET_SHARES).astype(np.int8),
        "country": np.array(COUNTRIES)[rng.choice(len(COUNTRIES), config.num_users, p=COUNTRY_SHARES)],
    }
    return SynthLog(requests, offsets, impressions, affinity, users, timeline_offsets, timeline, items)


def generate(config: SynthConfig, out_dir: str | Path) -> Path:
    """Write :func:`simulate`'s log as a request-format dataset (requests/users/items.parquet) to
    ``out_dir``; returns it."""
    log = simulate(config)
    out = DatasetPaths(out_dir)
    out.root.mkdir(parents=True, exist_ok=True)
    write_table(requests_table(ROLES, log.requests, log.impression_offsets, log.impressions), out.path("requests"))
    write_table(users_table(ROLES, log.users, log.timeline_offsets, log.timeline), out.path("users"))
    write_table(items_table(ROLES, log.items), out.path("items"))
    return out.root
