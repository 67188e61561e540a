# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Off-policy evaluation from logged propensities
#
# The `explore` run served the champion with softmax exploration: each reply is a sample from the top
# candidates and the log holds each shown item's inclusion propensity and the candidate pool. From those
# logs alone we estimate what the **greedy** policy (the champion's top-k) would have earned, with IPS, SNIPS
# and doubly robust estimators (bootstrap intervals over replies), and check them against the truth: the
# `aa` run, where the same users really were served the greedy champion.
#
# The estimators are item-level (an item's engagement does not depend on the rest of the list), which holds
# for the simulator's default click model (no position bias, `--eta 0`).

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import polars as pl

from recsys.experiments import analysis as A
from recsys.experiments import off_policy as OP

EXPERIMENTS = Path(os.environ.get("RECSYS_EXPERIMENTS", "../work/experiments")).resolve()
explored, truth = A.load(EXPERIMENTS / "explore"), A.load(EXPERIMENTS / "aa")
print(f"{explored.exposures.height} explored replies at temperature {explored.meta.get('temperature')}")

# %% [markdown]
# ## The logging policy's value, and the truth for the target

# %%
logged = OP.policy_value(explored)
true = OP.policy_value(truth)
print(f"engaged items per reply: logging (softmax) {logged[0]:.3f}, target (greedy, simulated) {true[0]:.3f} [{true[1]:.3f}, {true[2]:.3f}]")

# %% [markdown]
# ## Estimates
# Per reply: IPS = sum of r_i w_i over shown items, w_i = P_target(i shown) / P_logging(i shown);
# SNIPS normalises by the weights' sum; DR adds a reward model (logistic on pool score and rank) as the
# baseline and corrects it with the weighted residuals.

# %%
terms = OP.ope_terms(explored, target_temperature=None)
estimates = OP.ope_estimates(terms, n_boot=int(os.environ.get("RECSYS_OPE_BOOT", "1000")))
table = pl.DataFrame([vars(e) for e in estimates] + [{"estimator": "truth (simulated)", "value": true[0], "low": true[1], "high": true[2]}])
table

# %%
print(f"mean weight per shown slot (should be near 1): {terms['wsum'].sum() / terms['k'].sum():.3f}")
fig, ax = plt.subplots(figsize=(6, 3))
rows = table.to_dicts()
for y, r in enumerate(rows):
    ax.errorbar([r["value"]], [y], xerr=[[r["value"] - r["low"]], [r["high"] - r["value"]]], fmt="o", capsize=4,
                color="black" if r["estimator"].startswith("truth") else "tab:blue")
ax.set_yticks(range(len(rows)), [r["estimator"] for r in rows]); ax.set_xlabel("engaged items per reply (95% CI)")
ax.set_title("Greedy champion: off-policy estimates vs simulated truth")
out = EXPERIMENTS / "notebook-figures"; out.mkdir(exist_ok=True)
fig.tight_layout(); fig.savefig(out / "off_policy.png", dpi=110)
plt.show()

# %%
for e in estimates:  # every estimator's interval covers the truth (the greedy run's mean)
    assert np.isfinite([e.value, e.low, e.high]).all() and e.low <= true[0] <= e.high, (e, true)
print("CHECKS PASSED")
