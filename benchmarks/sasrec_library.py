"""Our SASRec against an established library's, on the same LOO split of ml-latest-small (the demo's).

RecTools' ``SASRecModel`` (0.19.0) runs in an environment of its own (``.venv-rectools``, made on first use: it pins
numpy < 2 and pytorch-lightning <= 2.5.2) through benchmarks/rectools_sasrec.py, which reads the split as CSV and
writes each user's top 50. Both are scored here by the same code (recsys.eval.evaluate.score_topk, seen items
never ranked), on validation (the epoch each kept) and on test, with the paired per-user difference.

Each is trained its own way, to the same recipe (2 blocks, d=64, one head, 100 positions, dropout 0.2, lr 2e-3,
batch 64): ours on random windows of each user's sequence with 1,024 shared sampled negatives, the epoch chosen
on validation NDCG@10 every 5 epochs (patience 6); RecTools on each user's last 101 items with a full softmax,
the epoch chosen on NDCG@10 of its own validation step every 5 epochs (patience 6), the recipe's criterion: RecTools'
validation loss bottoms out long before the ranking does. The goal (quality issue): ours within noise of the
library's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = "rectools[torch]==0.19.0"


def library_env(root: Path = ROOT) -> Path:
    """The python of RecTools' own environment, made with uv on first use (the local torch wheel where there is one)."""
    env = root / ".venv-rectools"
    py = env / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import rectools"], capture_output=True).returncode == 0:
        return py
    uv = Path(sys.executable).with_name("uv")
    subprocess.run([str(uv), "venv", "-q", str(env), "--python", sys.executable], check=True)
    wheels = ["--find-links", "/opt/wheels"] if any(Path("/opt/wheels").glob("torch-2.13.0*")) else ["--torch-backend=cpu"]
    subprocess.run([str(uv), "pip", "install", "-q", "--python", str(py), *wheels, "torch==2.13.0", LIBRARY], check=True)
    return py


def topk_matrix(path: Path, users: list[str], index: dict[str, int], k: int = 50):
    """A library's recommendations (user_id, item_id, rank) -> (len(users), k) catalog rows, -1 where fewer."""
    import numpy as np
    import polars as pl

    reco = pl.read_csv(path, schema_overrides={"user_id": pl.Utf8, "item_id": pl.Utf8})
    row = {u: r for r, u in enumerate(users)}
    out = np.full((len(users), k), -1, np.int64)
    for u, i, rank in reco.select("user_id", "item_id", "rank").iter_rows():
        if u in row and rank <= k:
            out[row[u], rank - 1] = index[i]
    return out


def run(workdir: Path, n_boot: int = 1000) -> dict:
    import polars as pl

    from recsys.config import Config
    from recsys.data import load_dataset
    from recsys.eval import make_split
    from recsys.eval.evaluate import evaluate, score_topk
    from recsys.eval.metrics import paired_bootstrap_diff
    from recsys.eval.sasrec import SASRec
    from recsys.quiet import silence

    silence()
    cfg = Config.load(None, workdir=str(workdir))
    ds = load_dataset(cfg)
    split = make_split("loo", ds, cfg.eval)
    idx = ds.catalog.index
    data = workdir / "sasrec-library"
    data.mkdir(parents=True, exist_ok=True)
    keys = ["user_id", "item_id", "timestamp"]
    window = split.val.history.select(keys).with_columns(pl.lit(0).alias("is_val"))
    hist = split.test.history.select(keys).join(window, on=keys, how="left").with_columns(pl.col("is_val").fill_null(1))
    assert hist["is_val"].sum() == len(split.val), "each validation user holds out one item"
    hist.rename({"timestamp": "datetime"}).with_columns(pl.col("datetime").dt.replace_time_zone(None)) \
        .write_csv(data / "history.csv")
    pl.DataFrame({"user_id": split.test.users}).write_csv(data / "test_users.csv")

    py = library_env()
    t0 = time.perf_counter()
    proc = subprocess.run([str(py), str(Path(__file__).with_name("rectools_sasrec.py")), "--data", str(data),
                           "--out", str(data / "out")], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"RecTools' SASRec failed: {proc.stderr[-3000:]}")
    lib_s = time.perf_counter() - t0
    fit = json.loads((data / "out" / "fit.json").read_text())
    n = len(ds.catalog)
    tops = {part: topk_matrix(data / "out" / f"{part}_top.csv", es.users, idx) for part, es in (("val", split.val),
                                                                                               ("test", split.test))}
    lib = {part: score_topk("sasrec (RecTools)", tops[part], es, n, "loo", part, n_boot=n_boot)
           for part, es in (("val", split.val), ("test", split.test))}
    lib_top = tops["test"]

    t0 = time.perf_counter()
    ours, _ = SASRec.tuned(idx, split.val, "loo")
    ours_s = time.perf_counter() - t0
    mine = {"val": evaluate(ours, split.val, idx, "loo", part="val", n_boot=n_boot),
            "test": evaluate(ours, split.test, idx, "loo", n_boot=n_boot)}

    def row(r) -> dict:
        return {m: {"mean": e.mean, "low": e.low, "high": e.high} for m, e in r.estimates.items()}

    diff = {}
    for m in ("HR@10", "NDCG@10", "Recall@50"):
        j = mine["test"].per_user.join(lib["test"].per_user, on="user_id", suffix="_lib")
        e = paired_bootstrap_diff(j[m].to_numpy(), j[f"{m}_lib"].to_numpy(), n_boot)
        diff[m] = {"mean": e.mean, "low": e.low, "high": e.high}
    return {"users": len(split.test), "library": LIBRARY,
            "ours": {"val": row(mine["val"]), "test": row(mine["test"]), "epoch": ours.epochs, "curve": ours.history,
                     "fit_s": round(ours_s, 1)},
            "rectools": {"val": row(lib["val"]), "test": row(lib["test"]), "epoch": fit["epoch"],
                         "epochs_run": fit["epochs_run"], "val_ndcg_curve": fit["val_ndcg_curve"], "fit_s": fit["fit_s"],
                         "process_s": round(lib_s, 1)},
            "ours_minus_rectools_test": diff,
            "rectools_users_without_10": int((lib_top[:, 9] < 0).sum())}
