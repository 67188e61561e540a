# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A/B analysis: two registered model versions on the held-out round
#
# Replays the LOO test round through each model exactly as serving runs it (registered user tower, logged
# item vectors, FAISS), then compares them **per user**: paired bootstrap intervals of the differences,
# metrics by user-activity segment, and plots. Set `RECSYS_WORKDIR` (default `../work`, what `make demo`
# writes) and the aliases below. Executed by the test suite on a small run.

# %%
import json, os
from pathlib import Path

WORKDIR = Path(os.environ.get("RECSYS_WORKDIR", "../work")).resolve()
A, B = os.environ.get("RECSYS_AB_A", "champion"), os.environ.get("RECSYS_AB_B", "challenger")
PROTOCOL = "loo"
N_BOOT = int(os.environ.get("RECSYS_AB_BOOT", "1000"))

# %%
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import polars as pl

from recsys.config import Config
from recsys.data import load_dataset
from recsys.eval import METRICS
from recsys.flows.replay import compare, item_segments, replay, segments
from recsys.eval.splits import make_split

cfg = Config.model_validate_json((WORKDIR / "config.json").read_text())  # what the models were trained with
ds = load_dataset(cfg)
mlflow.set_tracking_uri(cfg.tracking_uri)
client = mlflow.tracking.MlflowClient()
versions = sorted(client.search_model_versions(f"name='{cfg.train.registered_model}'"), key=lambda v: int(v.version))
aliases = client.get_registered_model(cfg.train.registered_model).aliases
print({v.version: v.run_id[:8] for v in versions}, aliases)

# %%
# The two arms: aliases when both exist, else the two newest versions.
if A in aliases and B in aliases:
    arm_a, arm_b = replay(cfg, ds, alias=A, protocol=PROTOCOL, n_boot=N_BOOT), replay(cfg, ds, alias=B, protocol=PROTOCOL, n_boot=N_BOOT)
else:
    print(f"alias {B!r} is not set: comparing the two newest versions")
    arm_a = replay(cfg, ds, version=versions[-2].version, protocol=PROTOCOL, n_boot=N_BOOT)
    arm_b = replay(cfg, ds, version=versions[-1].version, protocol=PROTOCOL, n_boot=N_BOOT)
for arm in (arm_a, arm_b):
    print(arm.result.model, {m: str(e) for m, e in arm.result.estimates.items()}, f"coverage@10 {arm.result.coverage10:.3f}")

# %%
diff = compare(arm_a, arm_b, n_boot=N_BOOT)
diff

# %%
history = make_split(PROTOCOL, ds, cfg.eval).test.history
seg = pl.concat([segments(arm_a, history).with_columns(pl.lit(arm_a.label).alias("arm")),
                 segments(arm_b, history).with_columns(pl.lit(arm_b.label).alias("arm"))])
seg

# %% [markdown]
# Item segments: the same per-user metrics grouped by the held-out item's popularity in the training data (cold, tail, torso = top 20%, head = top 1%) and by its modalities. A challenger that wins on the head and loses on the tail or on image items looks fine overall; this is where it shows.

# %%
split = make_split(PROTOCOL, ds, cfg.eval)
item_seg = pl.concat([item_segments(arm, split, ds.catalog).with_columns(pl.lit(arm.label).alias("arm"))
                      for arm in (arm_a, arm_b)])
item_seg.pivot(on="arm", index=["segment", "value"], values="HR@10")

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
x = range(len(METRICS))
for k, arm in enumerate((arm_a, arm_b)):
    est = arm.result.estimates
    axes[0].errorbar([i + 0.15 * (k - 0.5) for i in x], [est[m].mean for m in METRICS],
                     yerr=[[est[m].mean - est[m].low for m in METRICS], [est[m].high - est[m].mean for m in METRICS]],
                     fmt="o", capsize=4, label=arm.result.model)
axes[0].set_xticks(list(x), METRICS); axes[0].set_title(f"{PROTOCOL.upper()} test, 95% bootstrap CI"); axes[0].legend()
for arm in (arm_a, arm_b):
    s = seg.filter(pl.col("arm") == arm.label)
    axes[1].plot(s["segment"].cast(pl.Utf8).to_list(), s["HR@10"].to_list(), marker="o", label=arm.label)
axes[1].set_title("HR@10 by user activity (training interactions)"); axes[1].legend()
out = WORKDIR / "report"; out.mkdir(exist_ok=True)
fig.savefig(out / "ab_analysis.png", dpi=100, bbox_inches="tight")
(out / "ab_analysis.json").write_text(json.dumps({"a": arm_a.result.model, "b": arm_b.result.model,
                                                  "difference": diff.to_dicts(),
                                                  "item_segments": item_seg.to_dicts()}, indent=2, default=str))
print("saved", out / "ab_analysis.png")
