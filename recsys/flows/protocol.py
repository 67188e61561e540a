"""Train and evaluate on one protocol: the two-tower variants screened on validation (:class:`VariantSearch`),
the kept one scored on test (with the reranker row when asked), registered when asked, and the baselines
on the same split (recsys.eval.compare)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from recsys.config import Config
from recsys.data import Dataset
from recsys.embed.catalog import ItemVectors
from recsys.eval import EvalResult, make_split
from recsys.eval.compare import BASELINES, ProtocolRun, baseline_results
from recsys.eval.evaluate import paired_differences, score_topk
from recsys.eval.inputs import check_embedder_overlap, protocol_vectors, tags_in_training_window
from recsys.flows.features import build_features
from recsys.flows.saved import keep_checkpoint
from recsys.progress import console
from training.train import TrainedTwoTower, fit_two_tower, log_reranker


@dataclass
class ProtocolInput:
    """What every variant of one item input reads on the protocol (built once, shared by its variants)."""

    ds: Dataset  # user tags limited to the training window
    iv: ItemVectors
    vectors: np.ndarray  # (n_items, D) the matrix the two-tower trains and is scored on
    repo: object  # the protocol's Feast repository (features.store.FeatureRepo)
    rows: dict = field(default_factory=dict)  # fit_two_tower's cache of training rows


@dataclass
class Variant:
    """One screened two-tower: (item input, newest_items, id_embeddings), its fit and best validation NDCG@10."""

    label: str
    item_input: str
    newest_items: int
    id_embeddings: bool
    trained: TrainedTwoTower
    val_ndcg10: float


def variant_label(item_input: str, newest_items: int, use_ids: bool, newest_choices: list[int],
                  id_choices: list[bool]) -> str:
    """How a screened two-tower is named: its item input, then its newest_items value and whether it learns ids
    where several are screened (``concat+newest1+ids``)."""
    label = item_input if len(newest_choices) == 1 else f"{item_input}+newest{newest_items}"
    return label if len(id_choices) == 1 else label + ("+ids" if use_ids else "")


class VariantSearch:
    """Successive halving over the two-tower's variants, chosen on validation NDCG@10.

    Round 1: every item input with the first ``newest_items`` and ``id_embeddings`` values; round 2: the other
    newest_items values on the better half of the inputs only; round 3: the lead so far with the other
    id_embeddings values. With several variants each trains ``train.select_epochs`` epochs and only the best
    trains on (to ``train.max_epochs``); a single variant trains fully at once."""

    def __init__(self, cfg: Config, ds: Dataset, split, candidates: dict[str, ItemVectors]):
        self.cfg, self.ds, self.split, self.candidates = cfg, ds, split, candidates
        self.protocol = split.name
        self.newest = cfg.train.newest_choices
        self.ids = cfg.train.for_protocol(self.protocol).id_choices
        self.single = len(candidates) * len(self.newest) * len(self.ids) == 1
        t = cfg.train
        self.screen = t.select_epochs if not self.single and 0 < t.select_epochs < t.max_epochs else 0
        self.inputs: dict[str, ProtocolInput] = {}
        self.variants: dict[str, Variant] = {}  # label -> variant, in the order trained

    def input(self, mode: str) -> ProtocolInput:
        if mode not in self.inputs:
            pds, civ, cvec = protocol_vectors(self.cfg, self.ds, self.candidates[mode], self.split)
            name = self.protocol if len(self.candidates) == 1 or mode == "fused" else f"{self.protocol}_{mode}"
            repo = build_features(self.cfg, pds, cvec, civ, self.split.train, materialize=False, name=name)
            self.inputs[mode] = ProtocolInput(pds, civ, cvec, repo)
        return self.inputs[mode]

    def fit(self, mode: str, k: int, use_ids: bool) -> Variant:
        """Train one variant (``screen`` epochs when screening) and record its best validation NDCG@10."""
        inp = self.input(mode)
        label = variant_label(mode, k, use_ids, self.newest, self.ids)
        trained = fit_two_tower(self.cfg.with_train(newest_items=k, id_embeddings=use_ids), inp.ds.catalog, self.split,
                                inp.repo, inp.vectors, max_epochs=self.screen or None,
                                name="two-tower" if self.single else f"two-tower[{label}]", rows_cache=inp.rows)
        val = max((r.estimates["NDCG@10"].mean for r in trained.val_results), default=float("nan"))
        self.variants[label] = Variant(label, mode, k, use_ids, trained, val)
        return self.variants[label]

    def lead(self) -> Variant:
        """The best variant so far (ties: the first trained)."""
        order = list(self.variants)
        return max(self.variants.values(), key=lambda v: (v.val_ndcg10, -order.index(v.label)))

    def run(self) -> Variant:
        """The three rounds, then the winner trained on; its ``trained`` is the kept two-tower."""
        first = {mode: self.fit(mode, self.newest[0], self.ids[0]).val_ndcg10 for mode in self.candidates}
        better = sorted(first, key=lambda m: -np.nan_to_num(first[m], nan=-np.inf))[: (len(first) + 1) // 2]  # stable
        for mode in better:
            for k in self.newest[1:]:
                self.fit(mode, k, self.ids[0])
        lead = self.lead()
        for use_ids in self.ids[1:]:
            self.fit(lead.item_input, lead.newest_items, use_ids)
        best = self.lead()
        if not self.single:
            self.report(best)
        if self.screen:
            best.trained = fit_two_tower(self.cfg.with_train(newest_items=best.newest_items, id_embeddings=best.id_embeddings),
                                         self.input(best.item_input).ds.catalog, self.split, None,
                                         best.trained.content_vectors, name=best.trained.name, resume=best.trained)
        best.trained.name = "two-tower"
        for inp in self.inputs.values():
            inp.rows.clear()
        for v in self.variants.values():  # no fit resumes from here: the training rows go
            v.trained.drop_training_data()
        return best

    def report(self, best: Variant) -> None:
        after = f" after {self.screen} epoch{'s' if self.screen > 1 else ''} each" if self.screen else ""
        counts = (("item input", len(self.candidates)), ("newest_items", len(self.newest)), ("id_embeddings", len(self.ids)))
        what = [w for w, n in counts if n > 1]
        console.print(f"{self.protocol}: {', '.join(what[:-1])}{' and ' if len(what) > 1 else ''}{what[-1]} chosen on "
                      f"validation (NDCG@10{after}): {best.label} ("
                      + ", ".join(f"{v.label} {v.val_ndcg10:.4f}" for v in self.variants.values()) + ")"
                      + (f"; {best.label} trains on (up to {self.cfg.train.max_epochs} epochs)" if self.screen else ""))

    def record(self, best: Variant) -> dict:
        """What the run reports about the search (``ProtocolRun.extra``)."""
        trained = best.trained
        return {"epochs": trained.epochs, "examples_per_s": round(trained.examples_per_s),
                "train_s": round(trained.seconds + sum(v.trained.seconds for v in self.variants.values() if v is not best), 1),
                "item_input": {"chosen": best.item_input, "newest_items": best.newest_items,
                               "id_embeddings": best.id_embeddings, "variant": best.label,
                               "val_ndcg10": {v.label: v.val_ndcg10 for v in self.variants.values()},
                               "screen_epochs": self.screen,
                               "item_vectors": self.input(best.item_input).iv.model_version,
                               "kept_val_ndcg10": max((r.estimates["NDCG@10"].mean for r in trained.val_results),
                                                      default=None)}}


def run_protocol(cfg: Config, ds: Dataset, iv: ItemVectors, protocol: str, register: bool = False,
                 rerank: bool = False, baselines: tuple[str, ...] = BASELINES,
                 alias: str | None = None, candidates: dict[str, ItemVectors] | None = None,
                 split=None) -> ProtocolRun:
    """Train and evaluate the two-tower and the baselines on one protocol (same split, same run).

    Args:
        iv: the fused item vectors (what the content baselines read).
        candidates: item inputs to choose among (recsys.embed.catalog.item_input_candidates; default: ``iv``
            alone); with several inputs, or several ``train.newest_items`` or ``train.id_embeddings`` values, the
            variants are screened (:class:`VariantSearch`); the best on validation is evaluated on test (and
            registered); ``extra["item_input"]`` reports the choice (:meth:`VariantSearch.record`).
        split: the protocol's split when the caller made it (a benchmark's variant of it); default: make_split.

    The baselines: see recsys.eval.compare.baseline_results."""
    split = make_split(protocol, ds, cfg.eval) if split is None else split
    console.print(split.describe())
    check_embedder_overlap(cfg, ds, iv, split)
    search = VariantSearch(cfg, ds, split, candidates or {iv.item_input: iv})
    best = search.run()
    trained, chosen = best.trained, search.inputs[best.item_input]
    keep_checkpoint(cfg, trained, protocol, best.item_input)
    if register:
        trained.register(cfg, chosen.ds.catalog, split, alias or cfg.serve.model_alias, chosen.iv.model_version,
                         best.item_input)
    # the content baselines read the fused vectors, with tags in the same window
    fused = search.inputs.get("fused")
    ds, iv = (fused.ds, fused.iv) if fused else tags_in_training_window(cfg, ds, iv, split)
    fused_vectors = iv.with_cold(split.cold_items) if protocol == "cold" else iv.vectors
    # with the reranker, the test candidates are ranked once: with an exact search ("auto" is exact in evaluation,
    # recsys.index) the two-tower's own top 50 is their head
    share = rerank and cfg.serve.candidates >= 50 and cfg.serve.faiss_index in ("auto", "flat")
    test_cands = trained.candidates(split.test, ds.catalog, cfg, cfg.serve.candidates) if share else None
    results = [trained.evaluate(split, ds.catalog, cfg, n_boot=cfg.eval.bootstrap, ranked=test_cands)]
    extra = search.record(best)
    if rerank:
        results.append(reranked(cfg, trained, split, ds, test_cands, register, extra))
    results += baseline_results(cfg, ds, iv, split, fused_vectors, baselines, extra)
    extra["two_tower_minus"] = {model: {m: {"mean": e.mean, "low": e.low, "high": e.high} for m, e in d.items()}
                                for model, d in paired_differences(results, n_boot=cfg.eval.bootstrap).items()}
    return ProtocolRun(protocol, results, trained, split, extra)


def reranked(cfg: Config, trained: TrainedTwoTower, split, ds: Dataset, test_cands, register: bool,
             extra: dict) -> EvalResult:
    """The "two-tower + rerank" row: the reranker checked against the retrieval order on validation (cross-fitted;
    ``extra["rerank_val"]``), fitted on validation, scored on the test candidates, logged with a registered run."""
    from recsys.rerank import MIN_USERS, Reranker

    val_cands = trained.candidates(split.val, ds.catalog, cfg, cfg.serve.candidates)
    reranker = Reranker(seed=cfg.train.seed)
    check = reranker.check(val_cands, split.val.targets)  # does it beat retrieval on validation?
    reranker.fit(val_cands, split.val.targets)
    extra["rerank_val"] = check.to_dict()
    if not reranker.fitted:
        console.print(f"reranker skipped: fewer than {MIN_USERS} validation users have a target among their "
                      f"{cfg.serve.candidates} candidates ({check.users} validation users); serving uses the retrieval order")
    console.print(f"reranker on validation (cross-fitted, {check.users} users): NDCG@10 {check.reranked_ndcg10:.4f} "
                  f"vs retrieval {check.retrieval_ndcg10:.4f} -> {'used' if check.helps else 'not used'} in serving by default")
    cands = test_cands if test_cands is not None else trained.candidates(split.test, ds.catalog, cfg, cfg.serve.candidates)
    rows, _ = reranker.rerank(cands, 50)
    n_cand = len(ds.catalog) if split.test.candidates is None else split.test.candidates.size
    if register and trained.run_id:
        log_reranker(cfg, trained.run_id, reranker)
    return score_topk("two-tower + rerank", rows, split.test, n_cand, split.name, n_boot=cfg.eval.bootstrap)
