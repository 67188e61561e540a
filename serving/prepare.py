"""Reloads prepared off the serving process. A reload's heavy part (the registry read, both FAISS indexes, the
item statistics from the online store, every check: about 5 CPU-seconds for the demo model, far more for a
large catalog) runs in a child process at the lowest CPU priority (nice 19) and is saved to a folder; the
serving process then only reads files (arrays, FAISS indexes, the exported user tower) and swaps. Requests
in flight keep the cores: p99 during a reload was 758 ms when the snapshot was built in the serving process.

    python -m serving.prepare --out FOLDER [--alias A | --version V]   (configuration: RECSYS_SERVE_CONFIG)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from recsys import contract
from recsys.config import Config
from recsys.manifest import SnapshotError

ARRAYS = "snapshot.npz"
META = "snapshot.json"
ERROR = "error.json"


def save(snap, folder: Path) -> Path:
    """Write a built Snapshot's parts to ``folder`` (what :func:`load` reads)."""
    b = snap.bundle
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / ARRAYS, ids=np.array(b.item_ids), titles=np.array(b.titles), vectors=b.item_vectors,
             content=b.content, known=b.known, queries=b.queries, item_stats=snap.item_stats,
             modalities=snap.modalities)
    snap.index.save(folder / "index")
    snap.content_index.save(folder / "content")
    for name in (contract.USER_TOWER_FILE, contract.RERANKER_FILE):
        if b.artifacts is not None and (b.artifacts / name).exists():
            shutil.copy(b.artifacts / name, folder / name)
    (folder / META).write_text(json.dumps({"version": b.version, "run_id": b.run_id, "config": b.config,
                                           "source": b.source, "loaded_at": snap.loaded_at}))
    return folder


def load(cfg: Config, folder: Path):
    """The Snapshot saved in ``folder``: files read, nothing rebuilt (the indexes as saved, statistics as
    computed by the child), then one warm-up forward pass."""
    import torch

    from features.store import FeatureRepo
    from recsys.index import CandidateIndex
    from recsys.rerank import Reranker
    from serving.snapshot import ModelBundle, Snapshot

    meta = json.loads((folder / META).read_text())
    a = np.load(folder / ARRAYS, allow_pickle=False)
    reranker_file = folder / contract.RERANKER_FILE
    reranker = Reranker.load(reranker_file) if reranker_file.exists() else None
    bundle = ModelBundle(meta["version"], meta["run_id"], torch.export.load(str(folder / contract.USER_TOWER_FILE)).module(),
                         a["ids"].tolist(), a["titles"].tolist(), a["vectors"], a["content"], a["known"], meta["config"],
                         reranker, a["queries"], source=meta["source"])
    e = bundle.config
    repo = FeatureRepo(cfg, e["embedder"], e["embedder_version"], int(e["dim"]), name=cfg.serve.feature_repo)
    return Snapshot.assemble(bundle, repo, CandidateIndex.load(folder / "index", use_gpu=cfg.serve.use_gpu),
                             CandidateIndex.load(folder / "content", use_gpu=cfg.serve.use_gpu), a["item_stats"],
                             a["modalities"], float(meta["loaded_at"])).with_ranker(cfg)


def prepare_in_child(cfg: Config, alias: str | None, version: str | None, timeout_s: float = 1800):
    """Build the snapshot for ``alias``/``version`` in a nice-19 child process and load what it saved.

    Raises:
        SnapshotError: the published state failed its checks (the child's reasons).
        RuntimeError: the child failed otherwise (its error type and message).
    """
    folder = cfg.workdir / "serve" / "prepared" / f"{os.getpid()}-{time.time_ns()}"
    cmd = [sys.executable, "-m", "serving.prepare", "--out", str(folder)]
    cmd += ["--version", version] if version else ["--alias", alias] if alias else []
    env = {**os.environ, "RECSYS_SERVE_CONFIG": cfg.model_dump_json(), "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s,
                              preexec_fn=lambda: os.nice(19))
        if done.returncode != 0:
            err = json.loads((folder / ERROR).read_text()) if (folder / ERROR).exists() else \
                {"type": "RuntimeError", "message": f"exit {done.returncode}: {done.stderr.strip()[-500:]}"}
            if err["type"] == "SnapshotError":
                raise SnapshotError(err["what"], err["problems"])
            raise RuntimeError(f"preparing the snapshot failed: {err['type']}: {err['message']}")
        return load(cfg, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m serving.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write the prepared snapshot to")
    p.add_argument("--alias", default=None, help="registered-model alias (default serve.model_alias)")
    p.add_argument("--version", default=None, help="registered-model version (instead of an alias)")
    args = p.parse_args(argv)
    from recsys.quiet import silence

    silence()
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    from serving.snapshot import ModelBundle, Snapshot

    cfg = Config.model_validate_json(os.environ["RECSYS_SERVE_CONFIG"])
    out = Path(args.out)
    try:
        save(Snapshot.build(cfg, ModelBundle.from_mlflow(cfg, alias=args.alias, version=args.version)), out)
        return 0
    except Exception as exc:  # the parent reads the reason and keeps serving what it has
        out.mkdir(parents=True, exist_ok=True)
        err = {"type": type(exc).__name__, "message": str(exc)}
        if isinstance(exc, SnapshotError):
            err.update(what=exc.what, problems=exc.problems)
        (out / ERROR).write_text(json.dumps(err))
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
