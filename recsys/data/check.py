"""The data report before any training: what the dataset holds, and which evaluation protocols it can form.

``recsys data check`` prints it; ``demo`` and ``train`` print it first and skip the protocols that cannot be
formed (with the reason), so a model is never trained, registered and then crashed on a split that was never
there (sparse data: almost every user with one interaction cannot give a LOO test round).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from rich.table import Table

from recsys.config import EvalConfig
from recsys.content import KINDS
from recsys.data.types import Dataset

MIN_TEST_USERS = 20  # below this a protocol's table is noise: skipped with the reason


@dataclass
class ProtocolCheck:
    protocol: str
    ok: bool
    test_users: int
    val_users: int
    reason: str = ""
    note: str = ""  # what the protocol held out and why (COLD)


@dataclass
class DataCheck:
    """Counts, distributions and per-protocol feasibility of one dataset."""

    name: str
    users: int
    items: int
    interactions: int
    per_user: dict  # min, median, p90, max interactions per user
    per_item: dict
    users_with_3_plus: int
    items_without_interactions: int
    span: tuple[str, str] | None
    modality_share: dict  # kind -> share of items with that part
    protocols: list[ProtocolCheck] = field(default_factory=list)

    def feasible(self, protocols: list[str]) -> list[str]:
        ok = {p.protocol for p in self.protocols if p.ok}
        return [p for p in protocols if p in ok]

    def table(self) -> Table:
        t = Table(title=f"Data check: {self.name}", show_header=False)
        t.add_column("what")
        t.add_column("value")
        t.add_row("users / items / interactions", f"{self.users:,} / {self.items:,} / {self.interactions:,}")
        q = lambda d: f"min {d['min']}, median {d['median']:g}, p90 {d['p90']:g}, max {d['max']}"  # noqa: E731
        t.add_row("interactions per user", q(self.per_user) + f"; {self.users_with_3_plus:,} users with 3 or more")
        t.add_row("interactions per item", q(self.per_item) + f"; {self.items_without_interactions:,} items with none")
        t.add_row("time span", f"{self.span[0]} .. {self.span[1]}" if self.span else "no interactions")
        t.add_row("items per modality", ", ".join(f"{k} {v:.0%}" for k, v in self.modality_share.items()))
        for p in self.protocols:
            state = f"[green]ok[/green]: {p.test_users:,} test users, {p.val_users:,} validation users" + \
                (f"; {p.note}" if p.note else "") if p.ok else f"[yellow]skipped[/yellow]: {p.reason}"
            t.add_row(f"protocol {p.protocol.upper()}", state)
        return t


def _quantiles(counts: np.ndarray) -> dict:
    if counts.size == 0:
        return {"min": 0, "median": 0, "p90": 0, "max": 0}
    return {"min": int(counts.min()), "median": float(np.median(counts)), "p90": float(np.quantile(counts, 0.9)),
            "max": int(counts.max())}


def check_protocol(ds: Dataset, protocol: str, cfg: EvalConfig, min_users: int = MIN_TEST_USERS) -> ProtocolCheck:
    """Form the protocol's split and say whether it has enough test and validation users (and why not)."""
    from recsys.eval.splits import make_split

    if ds.interactions.frame.is_empty():
        return ProtocolCheck(protocol, False, 0, 0, "no interactions")
    if protocol == "loo":
        n3 = int((ds.interactions.frame.group_by("user_id").len()["len"] >= 3).sum())
        if n3 < min_users:
            return ProtocolCheck(protocol, False, n3, n3, f"LOO needs users with 3+ interactions; {n3} have them (< {min_users})")
    try:
        split = make_split(protocol, ds, cfg)
    except Exception as exc:  # a split that cannot be formed at all on this data: the reason is the report
        return ProtocolCheck(protocol, False, 0, 0, f"cannot be formed: {type(exc).__name__}: {exc}")
    test, val = len(split.test), len(split.val)
    if test < min_users or val < min(min_users, 5):
        why = {"loo": "users with 3+ interactions", "cold": "users who interacted with held-out items",
               "temporal": "users active both before and after the time cut",
               "holdout": "users with 4+ interactions"}.get(protocol, "test users")
        return ProtocolCheck(protocol, False, test, val,
                             f"{test} test / {val} validation users ({why}); needs {min_users} / 5")
    note = ""
    if protocol == "cold":
        from recsys.eval.splits import cold_pool

        pool = cold_pool(ds, cfg.cold_pool)
        if cfg.cold_pool == "auto":
            if ds.catalog.modalities[:, 1].any():
                kind = "eval.cold_pool auto: items with an image"
            elif pool.size < len(ds.catalog):
                kind = "eval.cold_pool auto: the movies that have a poster, attached or not"
            else:
                kind = "eval.cold_pool auto: no item has an image, so all items"
        else:
            article = "an" if cfg.cold_pool[0] in "aeiou" else "a"
            kind = f"eval.cold_pool = {cfg.cold_pool}" + ("" if cfg.cold_pool == "all" else f": items with {article} {cfg.cold_pool} part")
        note = f"{split.cold_items.size:,} items held out of {pool.size:,} eligible ({kind})"
    return ProtocolCheck(protocol, True, test, val, note=note)


def check_dataset(ds: Dataset, cfg: EvalConfig, protocols: list[str] | None = None) -> DataCheck:
    f = ds.interactions.frame
    per_user = f.group_by("user_id").len()["len"].to_numpy()
    item_counts = dict(f.group_by("item_id").len().iter_rows())
    per_item = np.array([item_counts.get(i, 0) for i in ds.catalog.ids])
    mods = ds.catalog.modalities
    span = (str(f["timestamp"].min()), str(f["timestamp"].max())) if f.height else None
    out = DataCheck(ds.name, int(f["user_id"].n_unique()), len(ds.catalog), f.height, _quantiles(per_user),
                    _quantiles(per_item), int((per_user >= 3).sum()), int((per_item == 0).sum()), span,
                    {k: float(mods[:, j].mean()) if len(mods) else 0.0 for j, k in enumerate(KINDS)})
    for p in protocols or list(cfg.protocols):
        out.protocols.append(check_protocol(ds, p, cfg))
    return out


__all__ = ["DataCheck", "MIN_TEST_USERS", "ProtocolCheck", "check_dataset", "check_protocol"]
