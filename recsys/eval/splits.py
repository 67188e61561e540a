"""The three evaluation protocols of design.md, as train / validation / test splits.

- ``loo``: each user's last interaction is the test target, the one before it the validation target.
- ``cold``: a seeded 20% of the items of the cold pool (MovieLens: the movies with posters) lose all
  their interactions from training; each user with training history and at least one cold interaction
  is ranked over the cold items only. Another 10% of the pool is held out the same way for validation.
- ``temporal``: a global time cut at a quantile of timestamps; users' later new items are the targets.

Every :class:`EvalSet` says who is asked, what they had seen (``history``), when they are asked
(``at``), which items may be ranked (``candidates``) and what they went on to interact with (``targets``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from recsys.config import EvalConfig
from recsys.data.types import Dataset


@dataclass
class EvalSet:
    """One round of questions: for each user, rank ``candidates`` given ``history`` as of ``at``."""

    users: list[str]
    targets: list[np.ndarray]  # item indices per user
    at: list[datetime]  # query time per user (features are taken strictly before it)
    history: pl.DataFrame  # interactions known when asking (also excluded from the ranking)
    candidates: np.ndarray | None = None  # item indices that may be ranked; None = whole catalog

    def __len__(self) -> int:
        return len(self.users)

    def take(self, which) -> "EvalSet":
        """The questions at indices ``which`` (their history only)."""
        users = [self.users[i] for i in which]
        return EvalSet(users, [self.targets[i] for i in which], [self.at[i] for i in which],
                       self.history.filter(pl.col("user_id").is_in(users)), self.candidates)


@dataclass
class Split:
    """A protocol's data: models learn from ``val.history`` and tune on ``val``; for the reported numbers
    they are scored on ``test``, reading ``test.history`` (which adds the validation rows) as the users' input
    only: no model is refit on it (recsys.eval.compare, one policy for all)."""

    name: str
    val: EvalSet
    test: EvalSet
    cold_items: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # hidden from training
    ties: int = 0  # LOO: users whose held-out item was drawn (seeded) among interactions in the same second

    @property
    def train(self) -> pl.DataFrame:
        """What a model learns from while it is tuned (the validation round's history)."""
        return self.val.history

    def without_test_users(self, users: set[str]) -> "Split":
        """This split with ``users`` left out of the test round (training and validation unchanged)."""
        return replace(self, test=self.test.take([i for i, u in enumerate(self.test.users) if u not in users]))

    def describe(self) -> str:
        return (f"{self.name}: {self.train.height:,} training interactions, {len(self.val)} validation users, "
                f"{len(self.test)} test users" + (f", {self.cold_items.size} cold items" if self.cold_items.size else "")
                + (f"; {self.ties} users' held-out item drawn (seeded) among same-second interactions" if self.ties else ""))


def _targets_by_user(frame: pl.DataFrame, index: dict[str, int]) -> tuple[list[str], list[np.ndarray], list[datetime]]:
    grouped = (
        frame.group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id"), pl.col("timestamp").min().alias("at"))
        .sort("user_id")
    )
    users = grouped["user_id"].to_list()
    targets = [np.unique(np.array([index[i] for i in items], dtype=np.int64)) for items in grouped["item_id"].to_list()]
    return users, targets, grouped["at"].to_list()


def loo_split(ds: Dataset, cfg: EvalConfig = EvalConfig()) -> Split:
    """Leave-one-out: last interaction = test, the one before = validation (users need 3+). Interactions of one
    user in the same second are ordered by a permutation seeded with ``cfg.seed`` (not by file order, which
    an export may have sorted by item): ``Split.ties`` counts the users whose test or validation item was
    drawn that way."""
    index = ds.catalog.index
    f = ds.interactions.frame
    tie = np.random.default_rng(cfg.seed).permutation(f.height)
    f = f.with_columns(pl.Series("_tie", tie)).sort(["user_id", "timestamp", "_tie"]).with_columns(
        pl.int_range(pl.len()).over("user_id").alias("pos"), pl.len().over("user_id").alias("n"),
        (pl.len().over("user_id", "timestamp") > 1).alias("_tied"),
    ).filter(pl.col("n") >= 3)
    held = f.filter(pl.col("pos") >= pl.col("n") - 2)
    ties = held.filter(pl.col("_tied"))["user_id"].n_unique()
    f = f.drop("_tie", "_tied")
    train = f.filter(pl.col("pos") < pl.col("n") - 2).drop("pos", "n")
    val_rows = f.filter(pl.col("pos") == pl.col("n") - 2).drop("pos", "n")
    test_rows = f.filter(pl.col("pos") == pl.col("n") - 1).drop("pos", "n")
    vu, vt, va = _targets_by_user(val_rows, index)
    tu, tt, ta = _targets_by_user(test_rows, index)
    val = EvalSet(vu, vt, va, history=train)
    # the split's own order, the validation item after its same-second ties: a sequential model reads it last
    test = EvalSet(tu, tt, ta, history=pl.concat([train, val_rows]).sort(["user_id", "timestamp"], maintain_order=True))
    return Split("loo", val, test, ties=ties)


def cold_pool(ds: Dataset, which: str = "auto") -> np.ndarray:
    """Items eligible to be cold (``eval.cold_pool``): "all"; those with a given part ("image", "audio", ...);
    or "auto": those with an image (MovieLens: a poster, or without posters the movies that have one), else all."""
    from recsys.content import KINDS

    if which == "all":
        return np.arange(len(ds.catalog))
    if which != "auto":
        return np.flatnonzero(ds.catalog.modalities[:, KINDS.index(which)])
    has_image = ds.catalog.modalities[:, 1]
    if has_image.any():
        return np.flatnonzero(has_image)
    from recsys.data.movielens import POSTER_IDS_FILE  # the same 2,947 movies when posters are absent

    if ds.name == "movielens" and POSTER_IDS_FILE.exists():
        ids = set(POSTER_IDS_FILE.read_text().split())
        return np.array([i for i, item_id in enumerate(ds.catalog.ids) if item_id in ids], dtype=np.int64)
    return np.arange(len(ds.catalog))


def cold_split(ds: Dataset, cfg: EvalConfig = EvalConfig()) -> Split:
    """Strict item cold-start: cold items lose every interaction from training."""
    rng = np.random.default_rng(cfg.seed)
    pool = cold_pool(ds, cfg.cold_pool)
    shuffled = rng.permutation(pool)
    n_test = int(round(cfg.cold_fraction * pool.size))
    n_val = int(round(cfg.cold_fraction / 2 * pool.size))
    test_items, val_items = np.sort(shuffled[:n_test]), np.sort(shuffled[n_test : n_test + n_val])
    ids = np.array(ds.catalog.ids)
    f = ds.interactions.frame
    test_ids, val_ids = ids[test_items].tolist(), ids[val_items].tolist()
    hidden = f.filter(pl.col("item_id").is_in(test_ids + val_ids))
    train = f.join(hidden.select("user_id", "item_id", "timestamp"), on=["user_id", "item_id", "timestamp"], how="anti")
    train_users = train["user_id"].unique().implode()
    index = ds.catalog.index

    def eval_set(item_ids: list[str], candidates: np.ndarray) -> EvalSet:
        rows = hidden.filter(pl.col("item_id").is_in(item_ids) & pl.col("user_id").is_in(train_users))
        users, targets, _ = _targets_by_user(rows, index)
        end = train["timestamp"].max()
        last = dict(train.group_by("user_id").agg(pl.col("timestamp").max()).iter_rows())
        # The user is asked once all their training history is in (one second after its last event).
        at = [min(last[u], end) + timedelta(seconds=1) for u in users]
        return EvalSet(users, targets, at, history=train, candidates=candidates)

    return Split("cold", eval_set(val_ids, val_items), eval_set(test_ids, test_items),
                 cold_items=np.sort(np.concatenate([test_items, val_items])))


def temporal_split(ds: Dataset, cfg: EvalConfig = EvalConfig()) -> Split:
    """Global time cut at ``cfg.temporal_quantile``; validation is the same cut inside the training part."""
    f = ds.interactions.frame

    def cut(frame: pl.DataFrame) -> tuple[pl.DataFrame, EvalSet]:
        t = frame["timestamp"].quantile(cfg.temporal_quantile, interpolation="nearest")
        before, after = frame.filter(pl.col("timestamp") < t), frame.filter(pl.col("timestamp") >= t)
        seen = before.select("user_id", "item_id").unique()
        after = after.filter(pl.col("user_id").is_in(before["user_id"].unique().implode())).join(
            seen, on=["user_id", "item_id"], how="anti"
        )
        users, targets, _ = _targets_by_user(after, ds.catalog.index)
        return before, EvalSet(users, targets, [t] * len(users), history=before)

    train, test = cut(f)
    _, val = cut(train)
    return Split("temporal", val, test)


def holdout_split(ds: Dataset, cfg: EvalConfig = EvalConfig()) -> Split:
    """Each user's own held-out period: the last ``cfg.holdout_share`` of their interactions (at least one; users
    need 4+) are the targets, asked at the time of the first of them; validation is the same cut inside the
    rest. The experiment simulator's default: every user arrives once, at their own time. Targets exclude
    items already in the history (a re-interaction is not a discovery)."""
    index = ds.catalog.index

    def cut(frame: pl.DataFrame, min_n: int) -> tuple[pl.DataFrame, EvalSet]:
        f = frame.with_columns(pl.int_range(pl.len()).over("user_id").alias("pos"), pl.len().over("user_id").alias("n"))
        f = f.filter(pl.col("n") >= min_n).with_columns(
            (pl.col("n") - (pl.col("n") * cfg.holdout_share).ceil().cast(pl.Int64).clip(1, None)).alias("first"))
        before = f.filter(pl.col("pos") < pl.col("first")).drop("pos", "n", "first")
        after = f.filter(pl.col("pos") >= pl.col("first")).drop("pos", "n", "first").join(
            before.select("user_id", "item_id").unique(), on=["user_id", "item_id"], how="anti")
        users, targets, at = _targets_by_user(after, index)
        return before, EvalSet(users, targets, at, history=before)

    train, test = cut(ds.interactions.frame, 4)
    _, val = cut(train, 3)
    return Split("holdout", val, test)


def shared_training_interactions(ds: Dataset, cfg: EvalConfig = EvalConfig()) -> pl.DataFrame:
    """Interactions that every protocol trains on: not a LOO val/test row, not a cold item's, not after
    the temporal validation cut. The local embedder's co-engagement pairs come only from these (no leakage),
    and the evaluation's overlap check recomputes them from the split settings its weights record."""
    keys = ["user_id", "item_id", "timestamp"]
    common = loo_split(ds, cfg).train.select(keys)
    for split in (cold_split(ds, cfg), temporal_split(ds, cfg)):
        common = common.join(split.train.select(keys), on=keys, how="semi")
    return common


def make_split(name: str, ds: Dataset, cfg: EvalConfig = EvalConfig()) -> Split:
    if name == "loo":
        return loo_split(ds, cfg)
    if name == "cold":
        return cold_split(ds, cfg)
    if name == "temporal":
        return temporal_split(ds, cfg)
    if name == "holdout":
        return holdout_split(ds, cfg)
    raise ValueError(f"unknown protocol {name!r} (expected loo, cold, temporal or holdout)")


@dataclass
class Rounds:
    """Several questions per user (statistical power): each of a block of a user's interactions is asked once,
    with the interactions before it as the history.

    Each question is a pseudo-user ``"<user>#<position>"`` in ``questions`` (its history is that user's
    interactions before the position, under the pseudo-user's id); ``owner`` names the real user of each question,
    so that intervals resample users, not questions. Models learn from ``fit`` only: every user's interactions
    before the block (the questions' earlier rounds are input, never training data)."""

    fit: pl.DataFrame
    questions: EvalSet
    owner: list[str]

    def subset(self, which: np.ndarray) -> "Rounds":
        """These rounds with only the questions at indices ``which`` (same fit window)."""
        return Rounds(self.fit, self.questions.take(which), [self.owner[i] for i in which])

    def describe(self) -> str:
        return (f"{len(self.questions):,} questions from {len(set(self.owner)):,} users, models fitted on "
                f"{self.fit.height:,} interactions before them")


@dataclass
class RoundsSplit(Split):
    """Rounds as a LOO-shaped split, for a model that scores eval sets (the two-tower): ``val`` and ``test`` are
    question sets, and what the model learns from (``train``) is the rounds' fit window, not the questions'
    histories."""

    fit: pl.DataFrame | None = None

    @property
    def train(self) -> pl.DataFrame:
        return self.fit


def rounds(ds: Dataset, last: int, first: int, cfg: EvalConfig = EvalConfig(), min_history: int = 2) -> Rounds:
    """The block of each user's interactions from ``first`` to ``last`` positions before the end (``rounds(ds, 0,
    5)``: the last five; ``rounds(ds, 5, 10)``: the five before those), in the same order as :func:`loo_split`
    (same-second ties by a permutation seeded with ``cfg.seed``). A user joins when at least ``min_history`` of
    their interactions lie before the block (their rounds then count from the first one that does)."""
    if not 0 <= last < first:
        raise ValueError(f"rounds: need 0 <= last < first, got last={last}, first={first}")
    index = ds.catalog.index
    f = ds.interactions.frame
    tie = np.random.default_rng(cfg.seed).permutation(f.height)
    f = f.with_columns(pl.Series("_tie", tie)).sort(["user_id", "timestamp", "_tie"]).drop("_tie").with_columns(
        pl.int_range(pl.len()).over("user_id").alias("_pos"), pl.len().over("user_id").alias("_n"))
    start = pl.col("_n") - first
    f = f.filter(start >= min_history)
    fit = f.filter(pl.col("_pos") < start).drop("_pos", "_n")
    asked = f.filter((pl.col("_pos") >= start) & (pl.col("_pos") < pl.col("_n") - last)).select("user_id", "_pos", "item_id", "timestamp")
    asked = asked.with_columns((pl.col("user_id") + "#" + pl.col("_pos").cast(pl.Utf8)).alias("_q")).sort("user_id", "_pos")
    # each question's history: its user's interactions before its position, under the question's id
    history = f.join(asked.select("user_id", pl.col("_pos").alias("_at"), "_q"), on="user_id") \
        .filter(pl.col("_pos") < pl.col("_at")).sort("_q", "_pos") \
        .drop("_pos", "_n", "_at", "user_id").rename({"_q": "user_id"}).select(f.drop("_pos", "_n").columns)
    questions = EvalSet(asked["_q"].to_list(), [np.array([index[i]], dtype=np.int64) for i in asked["item_id"].to_list()],
                        asked["timestamp"].to_list(), history=history)
    return Rounds(fit, questions, asked["user_id"].to_list())
