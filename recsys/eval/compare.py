"""The comparison a run reports: the baselines on a protocol's test round (each tuned on validation where it
has a knob), and the results as tables and JSON."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from rich.table import Table

from recsys.config import Config
from recsys.data import Dataset
from recsys.embed.catalog import ItemVectors, part_vectors
from recsys.eval import METRICS, EvalResult
from recsys.eval.evaluate import evaluate
from recsys.memory import release
from recsys.progress import console


@dataclass
class ProtocolRun:
    protocol: str
    results: list[EvalResult]
    trained: object | None = None
    split: object | None = None
    extra: dict = field(default_factory=dict)


BASELINES = ("popularity", "ease", "sasrec", "content-knn")


def baseline_results(cfg: Config, ds: Dataset, iv: ItemVectors, split, vectors: np.ndarray,
                     baselines: tuple[str, ...] = BASELINES, extra: dict | None = None) -> list[EvalResult]:
    """The baselines on ``split``'s test round, each tuned on its validation round where it has a knob.

    One refit policy for every model, the two-tower included: none. Each learns from ``split.val.history`` (the
    training window) and reads ``split.test.history`` (which adds the validation rows) only as the users' input.

    "popularity"; "ease" (lambda tuned); "sasrec" (tuned, recsys.eval.sasrec); "itemknn"; "content-knn" (three
    rows: item-kNN on the items' text, image and fused vectors). On COLD, popularity, EASE and SASRec cannot
    tell cold items apart (nobody interacted with them): they give one row, "random", for what it is.
    ``extra`` receives the tuned settings."""
    from recsys.eval.baselines import EASE, ContentKNN, ItemKNN, Popularity, Random
    from recsys.eval.sasrec import SASRec

    extra = {} if extra is None else extra
    protocol, idx = split.name, ds.catalog.index
    results: list[EvalResult] = []

    def add(model) -> None:  # scored at once and dropped: one baseline's matrices in memory at a time
        results.append(evaluate(model, split.test, idx, protocol, n_boot=cfg.eval.bootstrap))
        release()

    no_interactions = [b for b in baselines if b in ("popularity", "ease", "sasrec")]
    if protocol == "cold" and no_interactions:
        add(Random(idx, name=f"random ({'/'.join(no_interactions)}: no interactions on cold items)"))
    for name in baselines:
        if protocol == "cold" and name in no_interactions:
            continue
        if name == "popularity":
            add(Popularity(idx).fit(split.val.history))
        elif name == "ease":
            best, _ = EASE.tuned(idx, split.val, cfg.eval.ease_lambdas, protocol)
            extra["ease_lambda"] = best.lam
            add(best)  # fitted on the training window, as every model here (no refit)
        elif name == "sasrec":
            t0 = time.perf_counter()
            try:
                sas, scores = SASRec.tuned(idx, split.val, protocol)
            except ValueError as exc:
                console.print(f"[yellow]sasrec skipped on {protocol}: {exc}[/yellow]")
                continue
            extra["sasrec"] = {"dropout": sas.cfg.dropout, "epochs": sas.epochs, "val_ndcg10": scores,
                               "curve": sas.history, "fit_s": round(time.perf_counter() - t0, 1)}
            add(sas)
        elif name == "itemknn":
            add(ItemKNN(idx).fit(split.val.history))
        elif name == "content-knn":
            cold = split.cold_items if protocol == "cold" else None
            for kind in ("text", "image"):
                pv = part_vectors(cfg, ds, iv, kind, cold)
                if not pv.has.any():
                    console.print(f"[dim]content-knn ({kind}) skipped: no item has a {kind} part[/dim]")
                    continue
                vec = pv.with_cold(split.cold_items) if cold is not None else pv.vectors
                add(ContentKNN(idx, vec, name=f"content-knn ({kind})", has=pv.has))
            add(ContentKNN(idx, vectors, name="content-knn (fused)"))
        else:
            raise ValueError(f"unknown baseline {name!r}")
    return results


def results_table(runs: list[ProtocolRun], title: str = "Recommendation quality (test, 95% bootstrap CI)") -> Table:
    table = Table(title=title, show_lines=False)
    for col in ("protocol", "model", "users", *METRICS, "Coverage@10"):
        table.add_column(col, justify="right" if col not in ("protocol", "model") else "left")
    for run in runs:
        for r in run.results:
            table.add_row(run.protocol, r.model, str(r.per_user.height), *[str(r.estimates[m]) for m in METRICS],
                          f"{r.coverage10:.3f}")
    return table


def differences_table(runs: list[ProtocolRun]) -> Table:
    """The two-tower minus each other model, per user (paired bootstrap 95% interval)."""
    table = Table(title="Two-tower minus each model (test, same users, paired bootstrap 95% CI)")
    for col in ("protocol", "model", "HR@10 diff", "NDCG@10 diff"):
        table.add_column(col, justify="right" if "diff" in col else "left")
    for run in runs:
        for model, d in run.extra.get("two_tower_minus", {}).items():
            table.add_row(run.protocol, model, *[f"{d[m]['mean']:+.4f} [{d[m]['low']:+.4f}, {d[m]['high']:+.4f}]"
                                                 for m in ("HR@10", "NDCG@10")])
    return table


def results_json(runs: list[ProtocolRun]) -> list[dict]:
    out = []
    for run in runs:
        for r in run.results:
            out.append({"protocol": run.protocol, "model": r.model, "users": r.per_user.height,
                        **{m: {"mean": e.mean, "low": e.low, "high": e.high} for m, e in r.estimates.items()},
                        "Coverage@10": r.coverage10, **({"extra": run.extra} if r.model == "two-tower" else {})})
    return out
