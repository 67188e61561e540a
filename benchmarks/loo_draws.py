"""LOO over several tie draws (the quality issue: the headline as a mean and spread).

On ml-latest-small many users rated several movies in the same second, and LOO draws which of them is held out
with ``eval.seed``. For each seed the demo's LOO protocol runs as the demo runs it (recsys.flows.protocol
.run_protocol: the two-tower's variants screened on validation and the best trained on, then EASE tuned on
validation, SASRec by its reference recipe, popularity and content kNN on the same split), each model scored
on test once. The headline is each model's test figure as the mean and spread over the draws, and the
two-tower minus the best baseline per draw.

The local embedder's weights learned from the interactions every protocol trains on under the tie draw they
were trained with (seed 0). In another draw some users' held-out item is another of their same-second
interactions, one the embedder learned from: those users are left out of that draw's test round (reported as
``test_users_left_out``), so that no test figure reads a target the embedder saw.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.cold_draws import spread

METRICS = ("HR@10", "NDCG@10", "Recall@50")


def run(workdir: Path, posters: str | None, seeds: tuple[int, ...] = (0, 1, 2, 3, 4), n_boot: int = 1000,
        train: dict | None = None, max_users: int | None = None) -> dict:
    """Args: train: ``[train]`` overrides and ``max_users`` a slice (a quick look); the record uses the defaults."""
    from recsys.config import Config
    from recsys.data import load_dataset
    from recsys.embed.catalog import embed_catalog, item_input_candidates
    from recsys.eval import make_split
    from recsys.eval.inputs import embedder_trained_test_users
    from recsys.flows.protocol import run_protocol
    from recsys.memory import release
    from recsys.progress import console
    from recsys.quiet import silence

    silence()
    draws = []
    for seed in seeds:
        t0 = time.perf_counter()
        cfg = Config.load(None, workdir=str(workdir), data={"posters": posters, "max_users": max_users},
                          eval={"seed": seed, "protocols": ["loo"], "bootstrap": n_boot}, **({"train": train} if train else {}))
        ds = load_dataset(cfg)
        iv, ds = embed_catalog(cfg, ds, cold=False)
        console.print(f"[bold]draw {seed}[/bold]")
        split = make_split("loo", ds, cfg.eval)
        dropped = embedder_trained_test_users(cfg, ds, iv, split)
        if dropped:  # another tie draw than the embedder's weights were trained with: their targets were its data
            console.print(f"draw {seed}: {len(dropped)} test users left out (the embedder trained on their target)")
            split = split.without_test_users(dropped)
        pr = run_protocol(cfg, ds, iv, "loo", candidates=item_input_candidates(cfg, ds, iv), split=split)
        rows = {r.model: {m: e.to_dict() for m, e in r.estimates.items()}
                for r in pr.results}
        draws.append({"seed": seed, "ties": pr.split.ties, "test_users": len(pr.split.test),
                      "test_users_left_out": len(dropped),
                      "chosen": pr.extra["item_input"]["variant"], "test": rows,
                      "two_tower_minus": pr.extra.get("two_tower_minus", {}), "seconds": round(time.perf_counter() - t0, 1)})
        console.print(f"draw {seed}: " + ", ".join(f"{m} HR@10 {r['HR@10']['mean']:.4f}" for m, r in rows.items()))
        del pr, iv, ds
        release()
    return summarize(draws, seeds)


def summarize(draws: list[dict], seeds) -> dict:
    """The draws, and over them each model's test figures (mean, spread) and the two-tower minus each baseline."""
    models = [m for m in draws[0]["test"] if all(m in d["test"] for d in draws)]
    return {"draws": draws, "seeds": list(seeds),
            "test": {model: {m: spread([d["test"][model][m]["mean"] for d in draws]) for m in METRICS} for model in models},
            "two_tower_minus": {b: {m: spread([d["two_tower_minus"][b][m]["mean"] for d in draws]) for m in ("HR@10", "NDCG@10")}
                                for b in draws[0]["two_tower_minus"] if all(b in d["two_tower_minus"] for d in draws)}}
