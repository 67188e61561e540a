"""The replay simulator: an online experiment on a dataset's held-out period, through the real service.

The held-out period is each user's own last 20% of interactions (the ``holdout`` split, default: every user
arrives once, at their own time) or everything after a global time cut (``temporal``: honest about calendar
time, but on ml-latest-small only 28 users are active after the 0.8 quantile, too few for an experiment).
``prepare`` trains the arms on the interactions before the held-out period only (champion: the configuration
as given; challenger: the same with overrides) and registers them under their own aliases. ``simulate`` then
builds a fresh Feast store holding only those interactions (so a run's clicks never leak into the next
run), starts the service (a real uvicorn process) with the experiment configured, and replays the test
users: each arrives at the time of their first held-out interaction, asks for recommendations, and engages
with each shown item that is among their real held-out items (optionally thinned by a position-bias click
model whose draws depend on user, item and position only). Same users, same future, same clicks
for the same list: only the arm differs. The service writes the exposure and outcome logs; the simulator
writes ``users.parquet`` (pre-period activity for CUPED, history length, the ground truth) next to them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from recsys.config import ArmConfig, Config
from recsys.progress import console

ALIASES = ("sim-champion", "sim-challenger")


@dataclass
class World:
    """The held-out period: who arrives when, and what each of them really went on to interact with."""

    cut: datetime
    users: pl.DataFrame  # user_id, arrival, future (list of item ids), pre_interactions, pre_items_30d
    pre: pl.DataFrame  # interactions before the cut (what the online store holds)
    split: object = None  # the recsys.eval.splits.Split it was made from


SPLITS = ("holdout", "temporal")


def world(cfg: Config, ds, split_name: str = "holdout") -> World:
    """The split's test round: who arrives when (``arrival``: their first held-out interaction), their real
    held-out items (``future``), and their activity before (the CUPED covariate)."""
    from recsys.eval.splits import make_split

    if split_name not in SPLITS:
        raise ValueError(f"split {split_name!r}: the simulator replays one of {SPLITS}")
    split = make_split(split_name, ds, cfg.eval)
    pre = split.test.history
    ids = ds.catalog.ids
    at = [a if a.tzinfo else a.replace(tzinfo=timezone.utc) for a in split.test.at]
    users = pl.DataFrame({"user_id": split.test.users, "arrival": pl.Series(at, dtype=pl.Datetime("us", "UTC")),
                          "future": [[ids[i] for i in t] for t in split.test.targets]})
    month = pre.join(users.select("user_id", "arrival"), on="user_id").filter(
        pl.col("timestamp") >= pl.col("arrival") - timedelta(days=30))
    users = (users.join(pre.group_by("user_id").agg(pl.len().alias("pre_interactions")), on="user_id", how="left")
             .join(month.group_by("user_id").agg(pl.len().alias("pre_items_30d")), on="user_id", how="left")
             .with_columns(pl.col("pre_interactions", "pre_items_30d").fill_null(0).cast(pl.Int64))
             .sort("arrival", "user_id"))
    return World(min(at) if at else datetime.now(timezone.utc), users, pre, split)


def item_segments(ds, w: World) -> pl.DataFrame:
    """What segments read about each item: pre-period popularity (count, percentile, bucket), cold (no
    pre-period interaction) and its modalities."""
    from recsys.content import KINDS

    counts = dict(w.pre.group_by("item_id").len().iter_rows())
    pop = np.array([counts.get(i, 0) for i in ds.catalog.ids], np.float64)
    pct = (pop.argsort(kind="stable").argsort() / max(1, len(pop) - 1)) if len(pop) else pop
    mods = ds.catalog.modalities
    modality = ["+".join(k for k, m in zip(KINDS, row) if m) for row in mods]
    bucket = np.where(pop == 0, "cold (0)", np.where(pct >= 0.99, "head (top 1%)", np.where(pct >= 0.8, "torso (top 20%)", "tail")))
    return pl.DataFrame({"item_id": ds.catalog.ids, "pre_count": pop.astype(np.int64), "pop_percentile": pct,
                         "popularity": bucket, "cold": pop == 0, "modality": modality,
                         **{f"has_{k}": mods[:, j] for j, k in enumerate(KINDS)}})


def _parse_overrides(pairs: list[str]) -> dict:
    """["train.lr=1e-3", "train.id_embeddings=true"] -> {"train": {"lr": 0.001, "id_embeddings": True}}."""
    out: dict = {}
    for p in pairs:
        key, sep, raw = p.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"override {p!r}: expected section.field=value, e.g. train.lr=0.001")
        section, name = key.split(".", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(section, {})[name] = value
    return out


def check_overlap(cfg: Config, ds, iv, split) -> None:
    """The demo's embedder-overlap check on the replayed split (DataError, with the simulator's way out)."""
    from recsys.errors import DataError
    from recsys.eval.inputs import check_embedder_overlap

    try:
        check_embedder_overlap(cfg, ds, iv, split)
    except DataError as exc:
        raise DataError(f"{exc}; or replay the TEMPORAL split (`recsys experiment prepare --split temporal`), "
                        "which the weights did not train on") from exc


def prepare(cfg: Config, challenger: list[str], split_name: str = "holdout") -> dict:
    """Train both arms on the interactions before the held-out period and register them as sim-champion /
    sim-challenger.

    Args:
        challenger: overrides for the challenger, e.g. ["train.id_embeddings=true"].
        split_name: holdout (each user's last 20%) or temporal (a global time cut); simulate uses the same.
    Returns:
        {alias: {"version", "overrides", "val": validation metrics}}.
    """
    from recsys.data import load_dataset
    from recsys.eval.splits import make_split
    from recsys.embed.catalog import embed_catalog
    from recsys.eval.inputs import tags_in_training_window
    from recsys.flows.features import build_features
    from training.train import fit_two_tower

    ds = load_dataset(cfg)
    iv, ds = embed_catalog(cfg, ds, cold=False)
    if split_name not in SPLITS:
        raise ValueError(f"split {split_name!r}: expected one of {SPLITS}")
    split = make_split(split_name, ds, cfg.eval)
    console.print("simulation arms learn from " + split.describe())
    # as the demo does: local embedder weights whose co-engagement pairs hold the held-out period's interactions
    # would hand both arms what they are to be judged on; refused (DataError) with the way out
    check_overlap(cfg, ds, iv, split)
    ds, iv = tags_in_training_window(cfg, ds, iv, split)  # as the evaluation protocols do; simulate serves the same
    repo = build_features(cfg, ds, iv.vectors, iv, split.train, name="sim_train", materialize=False)
    over = _parse_overrides(challenger)
    variant = Config.model_validate({**cfg.model_dump(mode="json"),
                                     **{s: {**cfg.model_dump(mode="json").get(s, {}), **v} for s, v in over.items()}})
    out = {}
    for alias, c, o in ((ALIASES[0], cfg, {}), (ALIASES[1], variant, over)):
        trained = fit_two_tower(c, ds.catalog, split, repo, iv.vectors, name=alias, register=True, alias=alias)
        val = {k: round(e.mean, 4) for r in trained.val_results[-1:] for k, e in r.estimates.items()}
        out[alias] = {"version": trained.model_version, "overrides": o, "val": val, "split": split_name}
        console.print(f"registered {cfg.train.registered_model} v{trained.model_version} as @{alias} {o or ''}")
    folder = cfg.workdir / "experiments"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "arms.json").write_text(json.dumps(out, indent=2, default=str))
    return out


# The run ----------------------------------------------------------------------------------------------------
@dataclass
class SimulationRun:
    name: str
    logs: Path
    users: int
    requests: int = 0
    engagements: int = 0
    errors: int = 0
    seconds: float = 0.0
    arms: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self).items()}


def clicks(user_id: str, items: list[str], future: set[str], eta: float, seed: int) -> list[int]:
    """Positions (0-based) the user engages with: relevant items, each kept with probability (1/position)^eta.
    The draw depends on (seed, user, item, position) only, so every arm meets the same user."""
    out = []
    for pos, item in enumerate(items):
        if item not in future:
            continue
        if eta > 0:
            h = hashlib.sha256(f"{seed}\x1f{user_id}\x1f{item}\x1f{pos}".encode()).digest()
            if int.from_bytes(h[:8], "big") / 2**64 >= (1.0 / (pos + 1)) ** eta:
                continue
        out.append(pos)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """``recsys`` served by a real uvicorn process for the length of a ``with`` block."""

    def __init__(self, cfg: Config, ready_timeout_s: float = 600.0):
        self.cfg, self.port, self.timeout = cfg, _free_port(), ready_timeout_s
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Service":
        import httpx

        env = {**os.environ, "RECSYS_SERVE_CONFIG": self.cfg.model_dump_json()}
        log = self.cfg.workdir / "experiments" / "service.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "serving.app:app_from_env",
                                      "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited with code {self.proc.returncode}; see {log}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the service was not ready after {self.timeout:.0f} s; see {log}")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()  # SIGTERM: uvicorn runs the lifespan's end, which flushes the logs
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def simulate(cfg: Config, name: str, arms: list[ArmConfig], mode: str = "ab", explore: str = "none",
             temperature: float = 0.05, k: int = 10, eta: float = 0.0, seed: int = 0, salt: str | None = None,
             max_users: int | None = None, url: str | None = None) -> SimulationRun:
    """One simulated experiment; its logs go to ``<workdir>/experiments/<name>/logs``.

    Args:
        arms: the arms (aliases or versions, shares); an A/A run names the same alias twice.
        mode: "ab" or "interleave"; explore: "none" or "softmax" (propensities logged, for off-policy).
        eta: position bias of the click model (0: a user engages with every relevant item shown).
        url: drive a service that is already running (configured by you) instead of starting one.
    """
    from recsys.data import load_dataset

    t0 = time.perf_counter()
    ds = load_dataset(cfg)
    arms_file = cfg.workdir / "experiments" / "arms.json"
    split_name = next(iter(json.loads(arms_file.read_text()).values())).get("split", "holdout") \
        if arms_file.exists() else "holdout"  # the split the arms were trained for
    w = world(cfg, ds, split_name)
    users = w.users.head(max_users) if max_users else w.users
    folder = cfg.workdir / "experiments" / name
    logs = folder / "logs"
    if logs.exists():
        shutil.rmtree(logs)
    for old in folder.glob("events.db*"):
        old.unlink()
    run = SimulationRun(name, logs, users.height)
    sim_cfg = cfg.model_copy(deep=True)
    if url is None:
        ds, sim_cfg = replay_service_config(cfg, ds, w, name, arms, mode, explore, temperature, salt, folder)
    folder.mkdir(parents=True, exist_ok=True)
    users.with_columns(pl.lit(name).alias("simulation")).write_parquet(folder / "users.parquet")
    item_segments(ds, w).write_parquet(folder / "items.parquet")
    (folder / "simulation.json").write_text(json.dumps(
        {"name": name, "mode": mode, "explore": explore, "temperature": temperature, "k": k, "eta": eta, "seed": seed,
         "split": split_name, "first_arrival": w.cut.isoformat(), "arms": [a.model_dump() for a in arms], "users": users.height,
         "dataset": ds.name}, indent=2, default=str))

    if url is not None:
        drive(url, run, users, k, eta, seed)
    else:
        with Service(sim_cfg) as svc:
            drive(svc.url, run, users, k, eta, seed)
    run.seconds = round(time.perf_counter() - t0, 1)
    (folder / "run.json").write_text(json.dumps(run.to_dict(), indent=2))
    console.print(f"simulation {name}: {run.users} users, {run.requests} requests, {run.engagements} engagements, "
                  f"{run.errors} errors, arms {run.arms}, logs in {logs}")
    return run


def drive(base: str, run: SimulationRun, users: pl.DataFrame, k: int, eta: float, seed: int) -> None:
    """Each user, at their arrival time, asks the service at ``base`` for ``k`` items and engages with the shown
    items they really went on to use (the position-biased click model); counts go to ``run``."""
    import httpx

    with httpx.Client(base_url=base, timeout=60) as client:
        for row in tqdm(users.iter_rows(named=True), total=users.height, desc=f"simulate[{run.name}]", unit="user"):
            at = row["arrival"]
            at = at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at
            r = client.post("/recommend", json={"user_id": row["user_id"], "k": k, "at": at.isoformat()})
            run.requests += 1
            if r.status_code != 200:
                run.errors += 1
                continue
            body = r.json()
            run.arms[body["arm"]] = run.arms.get(body["arm"], 0) + 1
            shown = [i["item_id"] for i in body["items"]]
            for pos in clicks(row["user_id"], shown, set(row["future"]), eta, seed):
                ok = client.post("/interactions", json={
                    "user_id": row["user_id"], "item_id": shown[pos], "request_id": body["request_id"],
                    "timestamp": (at + timedelta(seconds=pos + 1)).isoformat()})
                run.engagements += ok.status_code == 202
                run.errors += ok.status_code != 202


def replay_service_config(cfg: Config, ds, w, name: str, arms: list[ArmConfig], mode: str, explore: str,
                          temperature: float, salt: str | None, folder: Path):
    """The replay's own feature store (the pre-period only, fresh each run) and the configuration of the service
    it starts: the experiment's arms, its own event log and experiment logs.

    Returns:
        (the dataset with the item contents the arms trained on, the service's Config)."""
    from recsys.embed.catalog import embed_catalog
    from recsys.eval.inputs import tags_in_training_window
    from recsys.flows.features import build_features

    iv, ds = embed_catalog(cfg, ds, cold=False)
    check_overlap(cfg, ds, iv, w.split)  # as prepare checks: no embedder that saw the replayed period
    # the item contents the arms trained on (prepare): user tags limited to the split's training window
    ds, iv = tags_in_training_window(cfg, ds, iv, w.split)
    repo_name = "sim_" + "".join(c if c.isalnum() else "_" for c in name)
    # A fresh store for every run: an earlier run's repository would keep its materialization watermark
    # (an incremental materialize then writes nothing) and its clicks. SQLite, so that nothing outlives
    # the folder (Redis keeps the newest row per key, which would be an earlier run's pushes).
    shutil.rmtree(cfg.feast_dir / repo_name, ignore_errors=True)
    store_cfg = cfg.model_copy(update={"features": cfg.features.model_copy(update={"online_store": "sqlite"})})
    build_features(store_cfg, ds, iv.vectors, iv, w.pre, name=repo_name, materialize=True)
    logs = folder / "logs"
    return ds, Config.model_validate({
        **store_cfg.model_dump(mode="json"),
        "serve": {**cfg.serve.model_dump(mode="json"), "feature_repo": repo_name,
                  "model_alias": arms[0].alias or cfg.serve.model_alias, "rerank": False},
        # its own event log, fresh each run: a replay's clicks never reach the work directory's real log
        "events": {"backend": "sqlite", "path": str(folder / "events.db")},
        "experiment": {"name": name, "arms": [a.model_dump(mode="json") for a in arms], "mode": mode,
                       "explore": explore, "temperature": temperature, "salt": salt or f"sim-{name}",
                       "log": True, "log_dir": str(logs), "flush_s": 1.0}})
