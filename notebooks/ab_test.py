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
# # A/B test: reading what the service logged
#
# The logs of an online experiment (`recsys simulate`, or the service's own exposure and outcome logs) read
# in the order an analyst should: **the split first** (a sample-ratio mismatch stops the reading), then the
# metrics per arm, the differences with confidence intervals (delta method for ratio metrics) and CUPED,
# segments where a regression hides, the A/A false-positive rate, and the power this experiment had.
#
# Set `RECSYS_EXPERIMENTS` (default `../work/experiments`, what the README's commands write). The A/B run is
# `ab/`, the A/A run `aa/`. The test suite runs it on a real service's logs (returning users, `recsys experiment
# traffic`); the last cell checks the
# numbers.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import polars as pl

from recsys.experiments import analysis as A
from recsys.experiments.report import deltas_table, plot_cumulative, plot_deltas

EXPERIMENTS = Path(os.environ.get("RECSYS_EXPERIMENTS", "../work/experiments")).resolve()
ab, aa = A.load(EXPERIMENTS / "ab"), A.load(EXPERIMENTS / "aa")
control, treatment = ab.arms[0], ab.arms[1]
users = A.per_user(ab)
print(f"{ab.exposures.height:,} replies, {ab.outcomes.height:,} engagements, {users.height:,} users; "
      f"control {control!r}, treatment {treatment!r}")

# %% [markdown]
# ## 1. The split, before any metric
# Users per arm against the configured shares (chi-square). `check_split` raises on a mismatch, which stops
# this notebook: metrics from a broken split are not evidence of anything.

# %%
print(A.check_split(users, ab.shares))

# %% [markdown]
# What a broken split looks like: here three quarters of the treatment's users are lost (as a crash in one arm's
# client, or a bot filter applied to one arm only, would do). The check fires.

# %%
lost = users.filter(pl.col("arm") == treatment).sample(fraction=0.75, seed=0)["user_id"]
broken = users.filter(~pl.col("user_id").is_in(lost.implode()))
try:
    A.check_split(broken, ab.shares)
    srm_fired = False
except A.SampleRatioMismatch as exc:
    srm_fired = True
    print(exc)

# %% [markdown]
# ## 2. Per arm
# Engagements = shown items the user went on to use; hit = a reply with at least one; NDCG from the logged
# positions; coverage and popularity bias (mean popularity percentile of what was shown: 0.5 is neutral).

# %%
per_arm = users.group_by("arm").agg(
    pl.len().alias("users"), pl.col("exposures").sum(), pl.col("clicks").sum().alias("engagements"),
    pl.col("clicks").mean().alias("per_user"), pl.col("hit").mean(), pl.col("ndcg").mean(),
    (pl.col("clicks").sum() / pl.col("exposures").sum()).alias("engagement_rate")).sort("arm")
per_arm.join(A.catalog_metrics(ab).drop("exposures"), on="arm", how="left")

# %% [markdown]
# ## 3. Differences
# Treatment minus control, 95% intervals and p-values (tea-tasting): means over users (Welch), the
# engagement rate as a ratio of means (delta method), and CUPED rows adjusted by pre-period activity.

# %%
covariate = "pre_log_interactions" if "pre_log_interactions" in users.columns else None
overall, segs = deltas_table(ab, users, control, treatment, covariate)
overall.drop("label")

# %%
if covariate:
    for m in ("clicks", "hit"):
        print(f"CUPED variance reduction on {m}: {A.cuped_reduction(users, m, covariate):.1%}")

# %% [markdown]
# ## 4. Segments
# Engagement rate of shown items by item segment (cold vs warm, popularity bucket, modality) and by the
# user's history length. Red intervals exclude zero.

# %%
segs.drop("label") if segs.height else "no segments"

# %%
forest = pl.concat([overall.select("label", "diff", "diff_low", "diff_high", "p_value"),
                    *([segs.select("label", "diff", "diff_low", "diff_high", "p_value")] if segs.height else [])])
out = EXPERIMENTS / "notebook-figures"
out.mkdir(exist_ok=True)
plot_deltas(forest, out / "ab_deltas.png", f"{treatment} - {control}")
plot_cumulative(A.cumulative(ab), out / "ab_cumulative.png")
fig, axes = plt.subplots(1, 2, figsize=(13, 4))
for ax, name in zip(axes, ("ab_deltas.png", "ab_cumulative.png")):
    ax.imshow(plt.imread(out / name)); ax.axis("off")
plt.show()

# %% [markdown]
# ## 5. Calibration: the A/A run
# Both arms of the A/A run serve the champion. Its users re-split with many salts (exactly what an A/A test
# with that salt would do) should be "significant" about 5% of the time at alpha 0.05.

# %%
aa_users = A.per_user(aa)
fp = A.aa_false_positive_rate(aa_users, splits=int(os.environ.get("RECSYS_AA_SPLITS", "500")))
aa_diff = A.compare(aa_users, aa.arms[0], aa.arms[1]).filter(pl.col("metric") == "clicks").row(0, named=True)
print(f"A/A false-positive rate: {fp['rate']:.3f} (95% CI {fp['ci'][0]:.3f}-{fp['ci'][1]:.3f}) over {fp['splits']} splits")
print(f"the A/A run itself: clicks diff {aa_diff['diff']:+.4f} [{aa_diff['diff_low']:+.4f}, {aa_diff['diff_high']:+.4f}], p {aa_diff['p_value']:.3f}")

# %% [markdown]
# ## 6. A planted effect is found with its sign
# The A/A run with 70% of the second arm's engagements removed: the analysis must call it a loss.

# %%
rng = np.random.default_rng(0)
second = set(aa.exposures.filter(pl.col("arm") == aa.arms[1])["request_id"].to_list())
keep = [r not in second or rng.random() >= 0.7 for r in aa.outcomes["request_id"].to_list()]
planted = A.ExperimentData(aa.folder, aa.exposures, aa.outcomes.filter(pl.Series(keep)), aa.users, aa.items, aa.meta)
p_row = A.compare(A.per_user(planted), aa.arms[0], aa.arms[1]).filter(pl.col("metric") == "clicks").row(0, named=True)
print(f"planted -70%: diff {p_row['diff']:+.4f} ({p_row['rel']:+.1%}), p {p_row['p_value']:.3g}")

# %% [markdown]
# ## 7. Power
# The smallest difference this experiment could detect, and the users a 5% change would need.

# %%
A.minimum_detectable_effect(users)

# %%
# The notebook's own checks (the test suite runs it and looks for the last line).
assert srm_fired, "the broken split should fail the SRM check"
assert 0.03 <= fp["rate"] <= 0.07, fp  # alpha 0.05 +- 0.02: a broken variance (requests as users) would miss
assert p_row["diff"] < 0 and p_row["p_value"] < 0.05, p_row
print("CHECKS PASSED")
