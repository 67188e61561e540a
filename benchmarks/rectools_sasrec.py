"""RecTools' SASRec on a split written by benchmarks/sasrec_library.py: run in RecTools' own environment (it pins
numpy < 2 and pytorch-lightning <= 2.5.2, which the project's cannot share), so it imports nothing of the project.

Input folder: ``history.csv`` (user_id, item_id, datetime, is_val: the training window plus each validation user's
held-out item, marked) and ``test_users.csv``. The model is RecTools' ``SASRecModel`` set to the reference recipe
(2 blocks, 64 factors, one head, 100 positions, dropout 0.2, lr 2e-3, batch 64, the full softmax over the catalog:
RecTools' sampled softmax draws 1,024 negatives per position, 1.7 GB of gathered vectors a batch), trained as the
library is meant to be: RecTools' validation (the held-out items masked out of training, scored every 5
epochs), the epoch chosen on validation NDCG@10 as ours is (early stopping after 6 checks without a gain, the best
checkpoint restored). Output folder: ``val_top.csv`` (recommended from the training window) and ``test_top.csv``
(from the window plus the validation items), 50 items per user with already-seen items filtered, and ``fit.json``
(the validation NDCG@10 curve, the epoch kept, the fit's seconds).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def main() -> None:
    import numpy as np
    import pandas as pd
    import torch
    from pytorch_lightning import Callback, Trainer, seed_everything
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
    from rectools import Columns
    from rectools.dataset import Dataset
    from rectools.models import SASRecModel

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-epochs", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    seed_everything(a.seed, workers=True)

    hist = pd.read_csv(a.data / "history.csv", parse_dates=["datetime"], dtype={"user_id": str, "item_id": str})
    hist[Columns.Weight] = 1.0
    val_rows = set(map(tuple, hist.loc[hist["is_val"] == 1, ["user_id", "item_id", "datetime"]].astype(str).values))

    def val_mask(interactions: pd.DataFrame) -> np.ndarray:
        keys = interactions[[Columns.User, Columns.Item, Columns.Datetime]].astype(str).values
        return np.array([tuple(k) in val_rows for k in keys])

    curve: list[tuple[int, float]] = []

    class ValNDCG(Callback):
        """NDCG@10 of each validation target among the catalog's logits of RecTools' own validation step (the items
        of the input window and the padding never ranked), logged as ``val_ndcg``: the epoch is chosen on it, as
        ours is; RecTools' validation loss bottoms out far earlier than the ranking does."""

        def on_validation_epoch_start(self, trainer, module):
            self.total, self.n = 0.0, 0

        def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
            y = batch["y"][:, -1]
            logits = outputs["logits"].detach().reshape(len(y), -1).clone()
            logits.scatter_(1, batch["x"], float("-inf"))
            logits[:, 0] = float("-inf")
            rank = (logits > logits.gather(1, y[:, None])).sum(1).float()
            self.total += float(torch.where(rank < 10, 1.0 / torch.log2(rank + 2), torch.zeros_like(rank)).sum())
            self.n += len(y)

        def on_validation_epoch_end(self, trainer, module):
            module.log("val_ndcg", self.total / max(self.n, 1))
            if not trainer.sanity_checking:
                curve.append((trainer.current_epoch + 1, round(self.total / max(self.n, 1), 4)))

    ckpt = ModelCheckpoint(dirpath=a.out / "ckpt", monitor="val_ndcg", mode="max", save_top_k=1)

    def trainer() -> Trainer:
        return Trainer(max_epochs=a.max_epochs, check_val_every_n_epoch=5, deterministic=True, devices=1,
                       accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, logger=False,
                       num_sanity_val_steps=0,
                       callbacks=[ValNDCG(), EarlyStopping(monitor="val_ndcg", mode="max", patience=6), ckpt])

    cols = [Columns.User, Columns.Item, Columns.Datetime, Columns.Weight]
    full = Dataset.construct(hist.rename(columns={"user_id": Columns.User, "item_id": Columns.Item})[cols])
    model = SASRecModel(n_blocks=2, n_heads=1, n_factors=64, dropout_rate=0.2, session_max_len=100, loss="softmax",
                        lr=2e-3, batch_size=64, epochs=a.max_epochs, deterministic=True, get_val_mask_func=val_mask,
                        get_trainer_func=trainer)
    t0 = time.perf_counter()
    model.fit(full)
    fit_s = time.perf_counter() - t0
    best = model.fit_trainer.checkpoint_callback.best_model_path  # RecTools fits a copy of the trainer and its callbacks
    model.load_weights_from_checkpoint(best)
    best_epoch = int(torch.load(best, weights_only=False)["epoch"]) + 1

    window = Dataset.construct(hist.loc[hist["is_val"] == 0].rename(columns={"user_id": Columns.User,
                                                                          "item_id": Columns.Item})[cols])
    val_users = hist.loc[hist["is_val"] == 1, "user_id"].unique()
    test_users = pd.read_csv(a.data / "test_users.csv", dtype={"user_id": str})["user_id"].values
    for name, users, ds in (("val", val_users, window), ("test", test_users, full)):
        reco = model.recommend(users=users, dataset=ds, k=50, filter_viewed=True, on_unsupported_targets="warn")
        reco[[Columns.User, Columns.Item, Columns.Rank]].to_csv(a.out / f"{name}_top.csv", index=False)
    (a.out / "fit.json").write_text(json.dumps({"val_ndcg_curve": curve, "epoch": best_epoch,
                                                "epochs_run": curve[-1][0] if curve else 0, "fit_s": round(fit_s, 1)}))


if __name__ == "__main__":
    main()
