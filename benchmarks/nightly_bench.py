"""The nightly job on a synthetic multimodal catalog (text, image, audio, video parts): items/s of the whole
job vs the embedder alone on the same items (fresh caches both), a rerun with nothing changed, a run where 1%
of the items changed, and the Ray Data engine vs the local engine (items/s, peak memory of this process)."""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


class RaySampler:
    """Peak summed RSS of Ray's worker processes (``ray::`` in the command line) while a run is in progress."""

    def __init__(self, every_s: float = 0.5):
        import threading

        self.peak_mb, self.every_s, self.stop = 0.0, every_s, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import subprocess

        while not self.stop.wait(self.every_s):
            out = subprocess.run(["ps", "-eo", "rss=,args="], capture_output=True, text=True).stdout
            total = sum(int(line.split(None, 1)[0]) for line in out.splitlines()
                        if "ray::" in line or "/ray/" in line or "raylet" in line or "gcs_server" in line)
            self.peak_mb = max(self.peak_mb, total / 1024)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def run(args) -> dict:
    from recsys.config import Config
    from recsys.data import load_folder
    from recsys.data.synthetic import SyntheticSpec, generate
    from recsys.embed.local import LocalEmbedder
    from recsys.flows.nightly import run_nightly

    n = int(getattr(args, "nightly_items", 2000))
    root = Path(args.workdir) / "nightly"
    shutil.rmtree(root, ignore_errors=True)
    data = generate(root / "data", SyntheticSpec(n_items=n, n_users=200, seed=11))
    ds = load_folder(data, name="synthetic")

    def cfg(name: str, **nightly) -> Config:
        return Config.load(None, workdir=str(root / name), data={"source": "synthetic", "path": str(data)},
                           nightly=nightly)

    emb = LocalEmbedder(cache_dir=root / "embedder-alone-cache")
    _, alone_s = _timed(lambda: emb.embed_many(ds.catalog.contents(), task="document", dim=256))
    local = cfg("local")
    first, first_s = _timed(lambda: run_nightly(local))
    again, again_s = _timed(lambda: run_nightly(local))
    # 1% of the items get a new description
    lines = (data / "items.jsonl").read_text().splitlines()
    rng = np.random.default_rng(0)
    pick = set(rng.choice(len(lines), max(1, n // 100), replace=False).tolist())
    for i in pick:
        item = json.loads(lines[i])
        item["parts"] = [{"text": f"changed description {i}"}, *item["parts"][1:]]
        lines[i] = json.dumps(item)
    (data / "items.jsonl").write_text("\n".join(lines) + "\n")
    changed, changed_s = _timed(lambda: run_nightly(local))
    rss_local = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with RaySampler() as sampler:
        ray, ray_s = _timed(lambda: run_nightly(cfg("ray", engine="ray", ray_actors=2)))
    rss_after_ray = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "items": n,
        "embedder_alone": {"seconds": round(alone_s, 1), "items_per_s": round(n / alone_s, 1)},
        "nightly_first": {"seconds": round(first_s, 1), "items_per_s": round(n / first_s, 1), "counts": first.counts,
                          "timings_s": first.timings_s, "overhead_vs_embedder": round(first_s / alone_s - 1, 3)},
        "rerun_unchanged": {"seconds": round(again_s, 1), "share_of_first": round(again_s / first_s, 3),
                            "counts": again.counts, "timings_s": again.timings_s},
        "one_percent_changed": {"seconds": round(changed_s, 1), "share_of_first": round(changed_s / first_s, 3),
                                "counts": changed.counts, "timings_s": changed.timings_s},
        "ray": {"seconds": round(ray_s, 1), "items_per_s": round(n / ray_s, 1), "vs_local_first": round(first_s / ray_s, 2),
                "counts": ray.counts, "timings_s": ray.timings_s, "actors": 2},
        "peak_rss_mb": {"after_local_runs": round(rss_local, 1), "after_ray_run_driver": round(rss_after_ray, 1),
                        "ray_processes_peak": round(sampler.peak_mb, 1)},
    }
