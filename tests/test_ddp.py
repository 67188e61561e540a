"""Scale-out by configuration: Lightning DDP with 2 CPU processes over gloo gives the result a single
process gives (within tolerance), on synthetic data whose clusters drive behaviour."""

from __future__ import annotations

import numpy as np
import pytest

from features.store import FeatureRepo
from recsys.eval import make_split
from recsys.eval.baselines import Popularity
from recsys.eval.evaluate import evaluate
from tests.conftest import small_config


@pytest.fixture(scope="module")
def world(synthetic, embedder, tmp_path_factory):
    vectors = embedder.embed(synthetic.catalog.contents(), dim=64)
    split = make_split("loo", synthetic)
    work = tmp_path_factory.mktemp("ddp")
    cfg = small_config(work, embedder={"dim": 64})
    repo = FeatureRepo(cfg, "local", embedder.model_version, 64, name="loo")
    repo.write_item_embeddings(synthetic.catalog.ids, vectors)
    repo.write_interaction_features(split.train, synthetic.catalog, vectors)
    repo.apply()
    return work, split, repo, vectors


def fit(world, synthetic, **train):
    from training.train import fit_two_tower

    work, split, repo, vectors = world
    cfg = small_config(work, embedder={"dim": 64}, train={"max_epochs": 4, "patience": 10, "lr": 2e-3,
                                                          "mixed_negatives": 64, "accelerator": "cpu", **train})
    trained = fit_two_tower(cfg, synthetic.catalog, split, repo, vectors, name=f"tt-{train.get('strategy', 'single')}")
    return trained, trained.evaluate(split, synthetic.catalog, cfg, part="test", n_boot=100), cfg


@pytest.mark.slow  # a whole stage end to end: `make test` runs it, `make test-fast` does not
def test_ddp_two_processes_match_one(world, synthetic):
    single, r1, _ = fit(world, synthetic, batch_size=256, devices=1)
    ddp, r2, cfg = fit(world, synthetic, batch_size=128, devices=2, strategy="ddp_spawn")  # 2 x 128 = one 256 step
    assert ddp.epochs == single.epochs == 4
    _, split, _, _ = world
    pop = evaluate(Popularity(synthetic.catalog.index).fit(split.test.history), split.test, synthetic.catalog.index, "loo",
                   n_boot=10).estimates["Recall@50"].mean
    a, b = r1.estimates["Recall@50"].mean, r2.estimates["Recall@50"].mean
    assert abs(a - b) < 0.1, (a, b, pop)  # the same quality, whether one process or two
    # both item towers learned the latent clusters, and the two runs agree on what is similar to what
    items = single.module.encode_items(single.inputs(split.test, synthetic.catalog, cfg).items)
    items2 = ddp.module.encode_items(ddp.inputs(split.test, synthetic.catalog, cfg).items)

    def similarity(v: np.ndarray) -> np.ndarray:
        # a direction shared by every item adds the same amount to all of one user's scores: it cannot change a
        # ranking, so compare the items' directions with it removed (and without the bias coordinate)
        d = v[:, : cfg.train.out_dim] - v[:, : cfg.train.out_dim].mean(0)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        return d @ d.T

    s1, s2 = similarity(items), similarity(items2)
    clusters = synthetic.catalog.items["cluster"].to_numpy()
    same = (clusters[:, None] == clusters[None, :]) & ~np.eye(len(clusters), dtype=bool)
    other = clusters[:, None] != clusters[None, :]
    for s in (s1, s2):
        assert s[same].mean() > s[other].mean() + 0.1, (s[same].mean(), s[other].mean())
    assert np.corrcoef(s1.ravel(), s2.ravel())[0, 1] > 0.7


@pytest.mark.slow  # trains several variants: `make test` runs it, `make test-fast` does not
def test_variants_sharing_cached_rows_do_not_change_them(world, synthetic):
    """The benchmark fits several variants over one cache of Feast rows; the ID-only variant (zero content
    vectors of another width) must not overwrite the cached rows the next variant reads."""
    from training.train import fit_two_tower

    work, split, repo, vectors = world
    cfg = small_config(work, embedder={"dim": 64}, train={"max_epochs": 1, "accelerator": "cpu", "devices": 1})
    cache: dict = {}
    fit_two_tower(cfg, synthetic.catalog, split, repo, np.zeros((len(synthetic.catalog), 8), np.float32),
                  name="id-only", use_ids=True, rows_cache=cache)
    (rows, _, _), = cache.values()
    assert rows.history.dim == 64
    fit_two_tower(cfg, synthetic.catalog, split, repo, vectors, name="content", rows_cache=cache)


@pytest.mark.slow  # trains the two-tower: `make test` runs it, `make test-fast` does not
def test_hard_negatives_are_mined_with_faiss_and_train(world, synthetic):
    """hard_negatives > 0: from the second epoch on, every example carries mined negatives that are never
    its positive, and the fit still learns."""
    from training.train import fit_two_tower

    work, split, repo, vectors = world
    cfg = small_config(work, embedder={"dim": 64}, train={"max_epochs": 2, "accelerator": "cpu", "devices": 1,
                                                          "hard_negatives": 3, "patience": 5})
    trained = fit_two_tower(cfg, synthetic.catalog, split, repo, vectors, name="hard")
    assert trained.epochs == 2
    dm = trained.datamodule
    assert dm.hard is not None and dm.hard.shape == (len(dm.rows), 3)
    assert not (dm.hard == dm.rows.item_rows[:, None]).any()
    assert ((dm.hard >= 0) & (dm.hard < dm.n_items)).all()


@pytest.mark.slow  # trains the two-tower: `make test` runs it, `make test-fast` does not
def test_a_fit_stopped_after_some_epochs_and_resumed_is_the_fit_trained_straight_through(world, synthetic):
    """The item-input screening (recsys.flows.protocol.VariantSearch) trains every input a few epochs and resumes only
    the best one: the resumed fit must be the model an uninterrupted fit gives (same validation every epoch,
    same weights, hard negatives mined the same), in the same MLflow run, with its epochs counted once."""
    import mlflow
    import torch

    from training.train import fit_two_tower

    work, split, repo, vectors = world
    cfg = small_config(work, embedder={"dim": 64}, train={"max_epochs": 3, "patience": 10, "lr": 2e-3, "accelerator": "cpu",
                                                          "devices": 1, "mixed_negatives": 64, "hard_negatives": 2})
    straight = fit_two_tower(cfg, synthetic.catalog, split, repo, vectors, name="straight")
    first = fit_two_tower(cfg, synthetic.catalog, split, repo, vectors, name="screened", max_epochs=1)
    assert first.epochs == 1 and len(first.val_results) == 1
    resumed = fit_two_tower(cfg, synthetic.catalog, split, None, first.content_vectors, name="screened", resume=first)
    assert resumed.epochs == straight.epochs == 3 and resumed.run_id == first.run_id
    ndcg = [[r.estimates["NDCG@10"].mean for r in t.val_results] for t in (straight, resumed)]
    assert len(ndcg[0]) == 3 and ndcg[1] == pytest.approx(ndcg[0], abs=1e-6)
    assert len(set(ndcg[0])) > 1  # it learned between epochs: equal figures are not three copies of one
    for (name, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    mlflow.set_tracking_uri(cfg.tracking_uri)
    history = mlflow.tracking.MlflowClient().get_metric_history(resumed.run_id, "val/NDCG10")
    assert sorted(m.step for m in history) == sorted({m.step for m in history}) and len(history) == 3
