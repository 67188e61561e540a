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
# # Interleaving vs the A/B test
#
# The same two arms, the same simulated users: in the A/B run each user sees one arm; in the interleaved run
# each reply is a team draft of both arms' lists and a click credits the arm that contributed the item. A
# user's preference (which arm got more clicks) is a much less noisy signal than a user's engagement level,
# so interleaving needs far fewer users to find the same difference (Chapelle et al. 2012 report 10-100x).
# Here we measure how many, by subsampling users from both runs.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import polars as pl

from recsys.experiments import analysis as A
from recsys.experiments.report import plot_power

EXPERIMENTS = Path(os.environ.get("RECSYS_EXPERIMENTS", "../work/experiments")).resolve()
ab, il = A.load(EXPERIMENTS / "ab"), A.load(EXPERIMENTS / "il")
control, treatment = ab.arms[0], ab.arms[1]
users = A.per_user(ab)

# %% [markdown]
# ## Credit per user
# Each engaged item is credited to the team (arm) that put it in the list.

# %%
credit = A.interleaving_credit(il)
result = A.interleaving_test(credit)
print(result)
credit.head()

# %% [markdown]
# ## The A/B test on the same arms

# %%
ab_row = A.compare(users, control, treatment).filter(pl.col("metric") == "clicks").row(0, named=True)
print(f"A/B: {treatment} - {control} clicks per user {ab_row['diff']:+.4f} [{ab_row['diff_low']:+.4f}, {ab_row['diff_high']:+.4f}], p {ab_row['p_value']:.3g}")

# %% [markdown]
# ## Users needed
# For each total number of users, draw that many from each run (with replacement) many times and count how
# often each method finds the difference with the right sign at alpha 0.05.

# %%
n = users.height
sizes = [s for s in (10, 20, 50, 100, 200, 400, 800, 1600, 3200, 6400, 12800) if s <= 16 * max(n, 50)]
curve = A.users_needed(users, credit, control, treatment, sizes, reps=int(os.environ.get("RECSYS_IL_REPS", "200")))
ab_n, il_n = A.first_reaching(curve, "ab_power"), A.first_reaching(curve, "interleaving_power")
print(f"users for 80% power: A/B {ab_n}, interleaving {il_n}" + (f" -> {ab_n / il_n:.1f}x fewer" if ab_n and il_n else ""))
curve

# %%
out = EXPERIMENTS / "notebook-figures"
out.mkdir(exist_ok=True)
plot_power(curve, out / "interleaving_power.png")
plt.imshow(plt.imread(out / "interleaving_power.png")); plt.axis("off"); plt.show()

# %%
assert (credit[control] + credit[treatment]).sum() == il.outcomes.height  # every engagement credited once
if result["p_value"] < 0.05 and ab_row["p_value"] < 0.05:  # both saw it: they must agree on the direction
    assert np.sign(result["delta"]) == np.sign(ab_row["diff"]), (result, ab_row)
assert curve["interleaving_power"].to_list()[-1] >= curve["interleaving_power"].to_list()[0]
print("CHECKS PASSED")
