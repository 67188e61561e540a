"""Evaluation: the LOO / COLD / TEMPORAL protocols, full-ranking metrics with bootstrap CIs, baselines."""

from recsys.eval.evaluate import METRICS, EvalResult, evaluate, history_matrix, top_k
from recsys.eval.metrics import Estimate, bootstrap, coverage, hit_rate, ndcg, paired_bootstrap_diff, recall
from recsys.eval.splits import EvalSet, Split, make_split

__all__ = ["METRICS", "EvalResult", "EvalSet", "Estimate", "Split", "bootstrap", "coverage", "evaluate",
           "hit_rate", "history_matrix", "make_split", "ndcg", "paired_bootstrap_diff", "recall", "top_k"]
