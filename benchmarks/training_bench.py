"""Two-tower benchmark on ml-latest-small: every protocol with the two-tower and every baseline in the
same run, the loss ablation, text-only vs multimodal input vectors, and training throughput."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from recsys.config import Config
from recsys.data import load_movielens
from recsys.eval import make_split
from recsys.eval.baselines import EASE, ContentKNN, ItemKNN, Popularity
from recsys.eval.evaluate import evaluate, score_topk
from recsys.embed.catalog import embed_catalog, item_input_candidates, ItemVectors
from recsys.eval.compare import ProtocolRun, results_json, results_table
from recsys.eval.inputs import protocol_vectors
from recsys.flows.features import build_features
from recsys.progress import console

ABLATION = {
    "in-batch only": {"logq_correction": False, "mixed_negatives": 0, "hard_negatives": 0},
    "+ logQ (default)": {"logq_correction": True, "mixed_negatives": 0, "hard_negatives": 0},
    "+ mixed negatives": {"logq_correction": True, "mixed_negatives": 1024, "hard_negatives": 0},
    "+ hard negatives": {"logq_correction": True, "mixed_negatives": 1024, "hard_negatives": 2},
}


DEFAULT_VARIANT = "+ logQ (default)"


INPUT_MODES = {"fused": "fused", "text-only": "text", "concatenated": "concat"}  # label -> recsys.embed.item_input
ITEM_INPUTS = tuple(INPUT_MODES)


def item_inputs(base: Config, ds, iv: ItemVectors) -> dict[str, ItemVectors]:
    """The pipeline's three item inputs (recsys.embed.catalog.item_input_candidates) under this benchmark's labels."""
    cands = item_input_candidates(base.with_item_input("auto"), ds, iv)
    return {label: cands[mode] for label, mode in INPUT_MODES.items()}


def run(workdir: Path, posters: str | None = None, protocols=("loo", "cold", "temporal"),
        loss_ablation=("loo",), input_ablation=("loo", "cold"), on_progress=None) -> dict:
    """Args: loss_ablation / input_ablation: the protocols each ablation runs on (each variant is a full fit);
    on_progress: called with the results so far after each protocol (a long run keeps what it finished)."""
    from recsys.rerank import Reranker
    from training.train import fit_two_tower

    base = Config.load(None, workdir=str(workdir), data={"posters": posters})
    ds = load_movielens(posters=posters)
    iv, ds = embed_catalog(base, ds, cold=True, save=False)
    iv_text = item_inputs(base, ds, iv)["text-only"]
    runs, ablation, throughput, cache = [], [], {}, {}

    def summary() -> dict:
        return {"results": results_json(runs), "ablation": ablation, "throughput": throughput,
                "embedder": {"model_version": iv.model_version, "dim": iv.dim}, "posters": bool(posters),
                "protocols_done": [r.protocol for r in runs]}
    nb = base.eval.bootstrap
    for protocol in protocols:
        split = make_split(protocol, ds, base.eval)
        vectors = iv.with_cold(split.cold_items) if protocol == "cold" else iv.vectors
        repo = build_features(base, ds, vectors, iv, split.train, name=protocol, materialize=False)
        idx = ds.catalog.index
        results = []
        main = fit_two_tower(base, ds.catalog, split, repo, vectors, name="two-tower", rows_cache=cache)
        throughput[protocol] = {"examples": main.examples, "epochs": main.epochs, "train_s": round(main.seconds, 1),
                                "epoch_s": round(main.seconds / max(main.epochs, 1), 1),
                                "examples_per_s": round(main.examples_per_s)}
        results.append(main.evaluate(split, ds.catalog, base, n_boot=nb))
        checked = {}
        if protocol == "loo":
            val_cands, rr = main.candidates(split.val, ds.catalog, base, 200), Reranker()
            checked["rerank_val"] = rr.check(val_cands, split.val.targets).to_dict()  # what serving decides by
            rr.fit(val_cands, split.val.targets)
            rows, _ = rr.rerank(main.candidates(split.test, ds.catalog, base, 200), 50)
            results.append(score_topk("two-tower + rerank", rows, split.test, len(ds.catalog), protocol, n_boot=nb))
        idonly = Config.load(None, workdir=str(workdir), train={"id_embeddings": True, "id_dropout": 0.0})
        results.append(fit_two_tower(idonly, ds.catalog, split, repo, np.zeros((len(ds.catalog), 8), np.float32),
                                     name="id-only two-tower", use_ids=True, rows_cache=cache)
                       .evaluate(split, ds.catalog, idonly, n_boot=nb))
        results.append(evaluate(Popularity(idx).fit(split.test.history), split.test, idx, protocol, n_boot=nb))
        results.append(evaluate(ItemKNN(idx).fit(split.test.history), split.test, idx, protocol, n_boot=nb))
        lam = base.eval.ease_lambdas
        best = EASE(idx, lam[len(lam) // 2]) if protocol == "cold" else EASE.tuned(idx, split.val, lam, protocol)[0]
        results.append(evaluate(EASE(idx, best.lam).fit(split.test.history), split.test, idx, protocol, n_boot=nb))
        results.append(evaluate(ContentKNN(idx, vectors, name="content-knn (embedder vectors)"), split.test, idx, protocol,
                                n_boot=nb))
        runs.append(ProtocolRun(protocol, results, extra={"ease_lambda": best.lam, **throughput[protocol], **checked}))
        console.print(results_table(runs[-1:]))
        if protocol in loss_ablation:
            for name, over in ABLATION.items():
                if name == DEFAULT_VARIANT:  # the main run above is this variant: reuse it, do not refit
                    ablation.append({"protocol": protocol, "variant": name, **_summary(results[0])})
                    continue
                cfg = Config.load(None, workdir=str(workdir), train=over)
                r = fit_two_tower(cfg, ds.catalog, split, repo, vectors, name=f"ablation {name}", rows_cache=cache)
                ablation.append({"protocol": protocol, "variant": name,
                                 **_summary(r.evaluate(split, ds.catalog, cfg, n_boot=nb))})
        if protocol in input_ablation:
            tvec = iv_text.with_cold(split.cold_items) if protocol == "cold" else iv_text.vectors
            trepo = build_features(base, ds, tvec, iv_text, split.train, name=f"{protocol}_textonly", materialize=False)
            r = fit_two_tower(base, ds.catalog, split, trepo, tvec, name="text-only input", rows_cache=cache)
            ablation.append({"protocol": protocol, "variant": "input: text-only vectors",
                             **_summary(r.evaluate(split, ds.catalog, base, n_boot=nb))})
            ablation.append({"protocol": protocol, "variant": "input: multimodal vectors (default)",
                             **_summary(results[0])})
        console.print([a for a in ablation if a["protocol"] == protocol])
        if on_progress is not None:
            on_progress(summary())
    return summary()


def _summary(r) -> dict:
    return {m: {"mean": e.mean, "low": e.low, "high": e.high} for m, e in r.estimates.items()} | {"Coverage@10": r.coverage10}


def cold_popularity_prior(workdir: Path, posters: str | None = None, betas=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)) -> dict:
    """COLD: does a content-predicted popularity prior help the two-tower? (The leaky popularity ceiling is
    0.571, so popularity among cold items is much of the signal.) A ridge regression from the item vector to
    log(1 + training interactions), fit on warm items, is standardized over the candidates and added to the
    two-tower score with weight beta, tuned on validation; the test is reported for every beta."""
    from sklearn.linear_model import Ridge

    from features.inputs import ItemInputs
    from training.train import fit_two_tower

    base = Config.load(None, workdir=str(workdir), data={"posters": posters})
    ds = load_movielens(posters=posters)
    split = make_split("cold", ds, base.eval)
    iv, ds = embed_catalog(base, ds, cold=True, save=False)
    vectors = iv.with_cold(split.cold_items)
    repo = build_features(base, ds, vectors, iv, split.train, name="cold", materialize=False)
    main = fit_two_tower(base, ds.catalog, split, repo, vectors, name="two-tower")
    idx = ds.catalog.index

    def log_counts(frame) -> np.ndarray:
        out = np.zeros(len(ds.catalog))
        for item, n in frame.group_by("item_id").len().iter_rows():
            out[idx[item]] = n
        return np.log1p(out)

    warm = np.ones(len(ds.catalog), bool)
    warm[split.cold_items] = False
    prior = Ridge(alpha=10.0).fit(vectors[warm], log_counts(split.train)[warm]).predict(vectors)
    truth = log_counts(ds.interactions.frame)  # all-time popularity: only to report how good the prior is
    corr = float(np.corrcoef(prior[split.cold_items], truth[split.cold_items])[0, 1])

    def scored(es, beta: float, part: str) -> dict:
        data = main.inputs(es, ds.catalog, base)
        users = main.module.encode_users(data.users, main.item_content)
        items = main.module.encode_items(ItemInputs(data.items.content, data.items.stats, data.items.rows, data.items.known))
        cand = es.candidates  # cold items only; none is in any history, so nothing to exclude
        z = (prior[cand] - prior[cand].mean()) / prior[cand].std()
        top = cand[np.argsort(-(users @ items[cand].T + beta * z[None]), axis=1)[:, :50]]
        return _summary(score_topk(f"two-tower + {beta} x prior", top, es, cand.size, "cold", part, n_boot=base.eval.bootstrap))

    val = {b: scored(split.val, b, "val") for b in betas}
    best = max(betas, key=lambda b: val[b]["Recall@50"]["mean"])
    test = {b: scored(split.test, b, "test") for b in betas}
    return {"prior_corr_with_cold_popularity": corr, "best_beta_on_val": best,
            "val": {str(b): v for b, v in val.items()}, "test": {str(b): v for b, v in test.items()}}




def item_resampled(results: list, targets: list[np.ndarray], metrics=("HR@10", "Recall@50")) -> dict:
    """Each result minus the first (kept top-k rankings of the same users) with intervals from resampling the
    target items (recsys.eval.metrics.item_bootstrap_diff): {variant: {metric: {mean, low, high}}}."""
    from recsys.eval.metrics import item_bootstrap_diff

    first = results[0]
    return {r.model: {m: (lambda e: {"mean": e.mean, "low": e.low, "high": e.high})(
        item_bootstrap_diff(r.topk, first.topk, targets, m)) for m in metrics} for r in results[1:]}


def train_variants(workdir: Path, variants: dict[str, dict], posters: str | None = None,
                   protocols=("loo", "cold"), inputs: dict[str, str] | None = None,
                   embedder_weights: str | None = None) -> dict:
    """The two-tower with different ``[train]`` settings on the same splits and features: each variant's best
    validation NDCG@10 (what a choice is made on), its test metrics, and the paired per-user difference of each
    variant minus the first. The variant with the best validation NDCG@10 summed over the protocols is the one a
    default should take.

    Args:
        inputs: variant name -> its item vectors, one of ITEM_INPUTS (default "fused", the embedder's vectors of
            the whole item; "text-only": of its text parts alone; "concatenated": both side by side). Every
            input has the user tags limited to the protocol's training window; on COLD the variant's
            ``cold_item_content`` says whether items are read without them (recsys.eval.inputs.protocol_vectors).
        embedder_weights: a local-embedder weights folder to use instead of the installed one."""
    inputs = inputs or {}
    if bad := {v for v in inputs.values() if v not in ITEM_INPUTS}:
        raise ValueError(f"unknown item input(s) {sorted(bad)}; known: {ITEM_INPUTS}")
    from recsys.eval.evaluate import paired_differences
    from training.train import fit_two_tower

    emb = {"local_weights": embedder_weights} if embedder_weights else {}
    base = Config.load(None, workdir=str(workdir), data={"posters": posters}, embedder=emb)
    ds = load_movielens(posters=posters)
    iv, ds = embed_catalog(base, ds, cold=True, save=False)
    out: dict = {"variants": {name: over for name, over in variants.items()}, "inputs": inputs, "protocols": {},
                 "embedder_version": iv.model_version, **({"embedder_weights": embedder_weights} if embedder_weights else {})}
    all_inputs = item_inputs(base, ds, iv) if set(inputs.values()) - {"fused"} else {"fused": iv}
    for protocol in protocols:
        split = make_split(protocol, ds, base.eval)
        features: dict = {}  # (item input, cold_item_content) -> (vectors, Feast repo, dataset), built once
        caches: dict = {}  # training rows, one set per features key
        rows, tests, vals = {}, [], []
        for name, over in variants.items():
            cfg = Config.load(None, workdir=str(workdir), train=over, embedder=emb)
            space = inputs.get(name, "fused")
            key = space, cfg.train.cold.item_content if protocol == "cold" else None
            if key not in features:
                pds, sv, vec = protocol_vectors(cfg, ds, all_inputs[space], split)
                tag = "" if key[1] in (None, "new") else f"_{key[1]}"
                features[key] = vec, build_features(base, pds, vec, sv, split.train, materialize=False,
                                                    name=f"{protocol}_{space.replace('-', '')}{tag}"), pds
                caches[key] = {}
            vectors, repo, pds = features[key]
            t0 = time.time()
            trained = fit_two_tower(cfg, pds.catalog, split, repo, vectors, name=name, rows_cache=caches[key])
            test = trained.evaluate(split, pds.catalog, cfg, n_boot=base.eval.bootstrap, keep_topk=True)
            tests.append(test)
            vals.append(trained.evaluate(split, pds.catalog, cfg, part="val", n_boot=1, keep_topk=True))
            best_val = max(r.estimates["NDCG@10"].mean for r in trained.val_results)
            rows[name] = {"val NDCG@10": best_val, "val Recall@50": vals[-1].estimates["Recall@50"].mean,
                          "epochs": trained.epochs, "seconds": round(time.time() - t0, 1),
                          **{m: {"mean": e.mean, "low": e.low, "high": e.high} for m, e in test.estimates.items()}}
            console.print(f"{protocol} {name}: val NDCG@10 {best_val:.4f}; test " +
                          ", ".join(f"{m} {e}" for m, e in test.estimates.items()))
        first = tests[0].model
        diffs = {t.model: paired_differences([t, tests[0]], reference=t.model)[first] for t in tests[1:]}
        out["protocols"][protocol] = {"variants": rows, "minus_first": {
            name: {m: {"mean": e.mean, "low": e.low, "high": e.high} for m, e in d.items()} for name, d in diffs.items()},
            "minus_first_items": {part: item_resampled(results, es.targets) for part, results, es in
                                  (("val", vals, split.val), ("test", tests, split.test))}}
    totals = {name: sum(p["variants"][name]["val NDCG@10"] for p in out["protocols"].values()) for name in variants}
    out["chosen_on_validation"] = max(totals, key=totals.get)
    out["val_sum"] = totals
    return out
