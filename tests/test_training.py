"""The two-tower's loss and towers, and a real Lightning fit on synthetic data with known clusters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.losses import info_nce, relational_distillation, sampled_softmax_loss
from training.towers import TowerConfig, TwoTower


def test_sampled_softmax_matches_a_hand_computed_case():
    u = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    items = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    ids = torch.tensor([0, 1])
    loss = sampled_softmax_loss(u, items, ids, temperature=1.0)
    expected = -math.log(math.e / (math.e + 1))  # each row: positive logit 1, negative logit 0
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_logq_correction_subtracts_log_expected_counts():
    u = torch.eye(2)
    ids = torch.tensor([0, 1])
    log_q = torch.tensor([math.log(4.0), 0.0])
    plain = sampled_softmax_loss(u, u, ids, 1.0)
    corrected = sampled_softmax_loss(u, u, ids, 1.0, log_q=log_q)
    # row 1's negative (item 0, popular) is pushed down, row 0's positive too: the loss changes accordingly
    row0 = -math.log(math.exp(1 - math.log(4)) / (math.exp(1 - math.log(4)) + math.exp(0)))
    row1 = -math.log(math.exp(1) / (math.exp(1) + math.exp(-math.log(4))))
    assert corrected.item() == pytest.approx((row0 + row1) / 2, rel=1e-5)
    assert corrected.item() != pytest.approx(plain.item())


def test_accidental_hits_and_same_user_rows_are_masked():
    u = torch.eye(3)
    items = torch.eye(3)
    ids = torch.tensor([0, 0, 2])  # rows 0 and 1 share a positive item
    masked = sampled_softmax_loss(u, items, ids, 1.0, remove_accidental_hits=True)
    unmasked = sampled_softmax_loss(u, items, ids, 1.0, remove_accidental_hits=False)
    assert masked.item() < unmasked.item()
    neg = torch.eye(3)
    with_neg = sampled_softmax_loss(u, items, ids, 1.0, neg_item=neg, neg_ids=torch.tensor([0, 1, 2]))
    assert torch.isfinite(with_neg)
    grouped = sampled_softmax_loss(u, items, torch.tensor([0, 1, 2]), 1.0, row_groups=torch.tensor([7, 7, 8]))
    free = sampled_softmax_loss(u, items, torch.tensor([0, 1, 2]), 1.0)
    assert grouped.item() < free.item()


def test_info_nce_groups_and_matryoshka():
    a = torch.randn(6, 32)
    loss_random = info_nce(a, torch.randn(6, 32), torch.arange(6), 0.1, (8, 32))
    loss_aligned = info_nce(a, a.clone(), torch.arange(6), 0.1, (8, 32))
    assert loss_aligned < loss_random
    same = info_nce(a, a.clone(), torch.zeros(6, dtype=torch.long), 0.1, (8, 32))  # one group: no negatives
    assert same.item() == pytest.approx(0.0, abs=1e-5)
    assert relational_distillation(a, a).item() == pytest.approx(0.0, abs=1e-6)


def test_towers_shapes_and_unit_norm():
    cfg = TowerConfig(content_dim=8, n_items=10, out_dim=4, hidden_dim=16, use_ids=True, recent=3)
    m = TwoTower(cfg)
    v = m.item(torch.randn(5, 8), torch.randn(5, 7), torch.arange(5), torch.tensor([1, 0, 1, 0, 1]).bool())
    assert v.shape == (5, cfg.vector_dim) == (5, 5)  # a unit direction, then the item's bias
    assert torch.allclose(v[:, :4].norm(dim=-1), torch.ones(5)) and torch.isfinite(v[:, 4]).all()
    rows = torch.tensor([[1, 2, 10], [10, 10, 10]])  # padding = n_items
    mask = rows < 10
    u = m.user(torch.randn(2, 8), torch.randn(2, 3, 8), rows, mask, mask, torch.randn(2, 3))
    assert u.shape == (2, 5) and torch.isfinite(u).all()
    assert torch.allclose(u[:, :4].norm(dim=-1), torch.ones(2)) and (u[:, 4] == 1).all()  # score = cos + bias
    plain = TwoTower(TowerConfig(content_dim=8, n_items=10, out_dim=4, hidden_dim=16, use_ids=False, item_bias=False))
    assert plain.item(torch.randn(5, 8), torch.randn(5, 7), torch.arange(5), torch.ones(5).bool()).shape == (5, 4)
    assert (m.id_table.weight[10] == 0).all()


@pytest.mark.parametrize("use_ids,item_bias,content_match", [(True, True, False), (False, True, False), (False, False, False),
                                                          (False, True, True), (True, False, True)])
def test_item_tower_with_fixed_parts_equals_the_full_pass_under_any_statistics(use_ids, item_bias, content_match):
    torch.manual_seed(0)
    cfg = TowerConfig(content_dim=32, n_items=50, out_dim=8, hidden_dim=24, use_ids=use_ids, item_bias=item_bias,
                      content_match=content_match)
    tower = TwoTower(cfg).item.eval()
    for p in tower.parameters():  # trained-looking weights: the LayerNorms' gains and shifts are not 1 and 0
        p.data.add_(0.3 * torch.randn_like(p))
    content = F.normalize(torch.randn(50, 32), dim=-1)
    ids, mask = torch.arange(50), torch.rand(50) < 0.5
    encode = tower.with_fixed(content, ids, mask)
    for scale in (0.0, 1.0, 10.0):  # new items (all-zero stats) and large log counts
        stats = scale * torch.rand(50, 7)
        with torch.no_grad():
            want = tower(content, stats, ids, mask)
        got = encode(stats)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        which = torch.tensor([3, 0, 41])  # a subset of rows, in any order: those rows' vectors
        torch.testing.assert_close(encode(stats[which], which), want[which], atol=2e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="eval"):
        tower.train().with_fixed(content, ids, mask)


def test_stats_encoder_re_encodes_only_the_items_whose_statistics_changed():
    from training.towers import stats_encoder

    torch.manual_seed(0)
    cfg = TowerConfig(content_dim=16, n_items=30, out_dim=8, hidden_dim=24)
    tower = TwoTower(cfg).item.eval()
    content = F.normalize(torch.randn(30, 16), dim=-1).numpy()
    rows, mask = np.arange(30), np.arange(30) % 2 == 0
    sizes = []  # rows handed to the tower per call
    fixed = tower.with_fixed

    def counting(*args):
        encode = fixed(*args)

        def run(stats, which=None):
            sizes.append(len(stats))
            return encode(stats, which)
        return run

    tower.with_fixed = counting
    run = stats_encoder(tower, content, rows, mask)
    rng = np.random.default_rng(0)
    stats = np.zeros((30, 7), np.float32)
    for changed in (np.arange(30), np.array([2, 7]), np.array([], int), np.array([29])):
        stats = stats.copy()
        stats[changed] = rng.random((len(changed), 7), dtype=np.float32)
        got = run(stats)
        with torch.no_grad():
            want = tower(torch.from_numpy(content), torch.from_numpy(stats), torch.from_numpy(rows),
                         torch.from_numpy(mask)).numpy()
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
        got[:] = np.nan  # the caller owns what it got: the next call's copies are untouched
    assert sizes == [30, 2, 1]  # the first call encodes all, then only the changed rows; none changed: no pass


def _user_inputs():
    """User-tower inputs for 3 users (content_dim 8, 4 recent slots): 3 items, 1 item, none. Newest first; padding
    = n_items (10). Returns (mask, recent content, the forward's arguments)."""
    rows = torch.tensor([[1, 2, 3, 10], [4, 10, 10, 10], [10, 10, 10, 10]])
    mask = rows < 10
    content = torch.randn(3, 4, 8)
    return mask, content, (torch.randn(3, 8), content, rows, mask, mask, torch.randn(3, 3))


def test_sequential_user_tower_is_causal_in_time_finite_without_history_and_exports(tmp_path):
    from training.towers import SequenceEncoder
    from training.train import export_user_tower

    torch.manual_seed(0)
    cfg = TowerConfig(content_dim=8, n_items=10, out_dim=4, hidden_dim=16, use_ids=False, recent=4,
                      user_encoder="sequential", dropout=0.0)
    m = TwoTower(cfg).eval()
    mask, content, args = _user_inputs()
    u = m.user(*args)
    assert u.shape == (3, 5) and torch.isfinite(u).all()
    # what sits in the padding never matters; the order of the items does
    noisy = content.clone()
    noisy[~mask] = 100.0
    assert torch.allclose(m.user(args[0], noisy, *args[2:]), u, atol=1e-5)
    swapped = content.clone()
    swapped[0, [0, 2]] = content[0, [2, 0]]
    assert not torch.allclose(m.user(args[0], swapped, *args[2:])[0], u[0], atol=1e-4)
    # causal: in time order, an older item's state ignores newer items; the newest position reads them all
    enc = SequenceEncoder(cfg).eval()
    keys, full_mask = torch.randn(1, 4, 16), torch.ones(1, 4, dtype=torch.bool)
    seen = []
    enc.blocks.register_forward_hook(lambda mod, inp, out: seen.append(out))
    enc(keys, full_mask)
    changed = keys.clone()
    changed[0, 0] = 5.0  # the newest item
    enc(changed, full_mask)
    before, after = seen
    assert torch.allclose(before[0, :4], after[0, :4], atol=1e-5) and not torch.allclose(before[0, 4], after[0, 4])
    # serving loads the user tower as a torch.export program: the sequential one exports too
    example = tuple(a.numpy() for a in args)
    path = export_user_tower(m.user, example, tmp_path / "user.pt2")
    program = torch.export.load(str(path)).module()
    assert torch.allclose(program(*args), u, atol=1e-5)


@pytest.mark.parametrize("newest_items,newest_skip", [(1, False), (3, False), (1, True)])
def test_user_tower_reads_its_newest_items_in_their_own_slots_and_exports(tmp_path, newest_items, newest_skip):
    from training.train import export_user_tower

    torch.manual_seed(0)
    kw = dict(content_dim=8, n_items=10, out_dim=4, hidden_dim=16, use_ids=False, recent=4, dropout=0.0)
    pooled = TwoTower(TowerConfig(**kw)).eval()
    m = TwoTower(TowerConfig(**kw, newest_items=newest_items, newest_skip=newest_skip)).eval()
    mask, content, args = _user_inputs()  # the second user has fewer items than 3 slots
    u = m.user(*args)
    assert u.shape == (3, 5) and torch.isfinite(u).all()
    # the pooling alone does not see order (its position table starts at zero): swapping the newest item with an
    # older one leaves its vector unchanged; with the newest item in its own slot the vector moves
    swapped = content.clone()
    swapped[0, [0, 1]] = content[0, [1, 0]]
    assert torch.allclose(pooled.user(args[0], swapped, *args[2:]), pooled.user(*args), atol=1e-5)
    assert not torch.allclose(m.user(args[0], swapped, *args[2:])[0], u[0], atol=1e-4)
    # what sits in the padding never matters, in a slot or in the pool
    noisy = content.clone()
    noisy[~mask] = 100.0
    assert torch.allclose(m.user(args[0], noisy, *args[2:]), u, atol=1e-5)
    example = tuple(a.numpy() for a in args)
    program = torch.export.load(str(export_user_tower(m.user, example, tmp_path / "user.pt2"))).module()
    assert torch.allclose(program(*args), u, atol=1e-5)
    with pytest.raises(ValueError, match="newest_items"):
        TwoTower(TowerConfig(**{**kw, "newest_items": 5}))
    from recsys.config import TrainConfig  # a list is screened by the pipeline; a single fit reads its first value

    assert TrainConfig(newest_items=1).newest_choices == [1] and TrainConfig().newest_choices == [0, 1]
    for bad in ([], [-1], [1, 1]):
        with pytest.raises(ValueError, match="newest_items"):
            TrainConfig(newest_items=bad)


def test_content_match_adds_the_learned_weight_times_the_embedders_cosine_and_serves_as_one_inner_product(tmp_path):
    """With ``content_match`` the inner product of the two towers' outputs is the towers' cosine, plus the learned
    weight times cos(user history, item content), plus the item's bias (still the last coordinate, which the
    service's similar-items query sets to 1); the weight learns at its own rate; the user tower still exports."""
    from recsys.config import TrainConfig
    from training.module import MATCH_LR, TwoTowerModule
    from training.train import export_user_tower

    torch.manual_seed(0)
    kw = dict(content_dim=8, n_items=10, out_dim=4, hidden_dim=16, use_ids=False, recent=4, dropout=0.0)
    m = TwoTower(TowerConfig(**kw, content_match=True)).eval()
    assert m.cfg.vector_dim == 4 + 8 + 1 and float(m.user.match.detach()) == 0.0  # starts as the towers alone
    m.user.match.data.fill_(0.7)
    content, stats = torch.randn(6, 8), torch.rand(6, 7)
    rows, known = torch.arange(6), torch.ones(6, dtype=torch.bool)
    with torch.no_grad():
        v = m.item(content, stats, rows, known)
        mask, recent, args = _user_inputs()
        u = m.user(*args)
        bias = m.item.bias(torch.cat([content, stats], -1))[:, 0]
    history = args[0]
    want = (u[:, :4] @ v[:, :4].T + 0.7 * F.normalize(history, dim=-1) @ F.normalize(content, dim=-1).T + bias)
    torch.testing.assert_close(u @ v.T, want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(v[:, -1], bias) and (u[:, -1] == 1).all()
    program = torch.export.load(str(export_user_tower(m.user, tuple(a.numpy() for a in args), tmp_path / "u.pt2"))).module()
    torch.testing.assert_close(program(*args), u, atol=1e-5, rtol=1e-5)
    # its own optimizer group: the first AdamW step moves it by MATCH_LR, the towers by lr
    module = TwoTowerModule(TowerConfig(**kw, content_match=True), TrainConfig(lr=1e-4, content_match=True),
                            torch.zeros(10), np.ones(10, bool))
    opt = module.configure_optimizers()
    skip = module.model.item.skip.weight.detach().clone()
    score = module.model.user(*args) @ module.model.item(content, stats, rows, known).T
    opt.zero_grad()
    score.sum().backward()
    opt.step()
    assert abs(float(module.model.user.match.detach())) == pytest.approx(MATCH_LR, rel=0.05)
    assert float((module.model.item.skip.weight.detach() - skip).abs().max()) == pytest.approx(1e-4, rel=0.05)


def test_the_id_table_learns_at_its_own_rate_when_id_lr_is_set():
    """AdamW's first step moves every parameter with a gradient by about its group's rate: the id table's rows by
    ``id_lr``, the rest by ``lr``; unset, one group at ``lr``. The id choices screen like newest_items'."""
    from recsys.config import TrainConfig
    from training.module import TwoTowerModule

    assert TrainConfig(id_embeddings=True).id_choices == [True] and TrainConfig().id_choices == [False, True]
    for bad in ([], [True, True]):
        with pytest.raises(ValueError, match="id_embeddings"):
            TrainConfig(id_embeddings=bad)
    with pytest.raises(ValueError, match="id_lr"):
        TrainConfig(id_lr=0.0)
    torch.manual_seed(0)
    n = 20
    tower = TowerConfig(content_dim=8, n_items=n, out_dim=4, hidden_dim=16, use_ids=True, recent=4, dropout=0.0)
    for id_lr, want_groups in ((1e-2, 2), (None, 1)):
        module = TwoTowerModule(tower, TrainConfig(lr=1e-4, id_lr=id_lr, weight_decay=0.0), torch.zeros(n),
                                np.ones(n, bool))
        opt = module.configure_optimizers()
        assert len(opt.param_groups) == want_groups
        table = module.model.id_table.weight
        before = {k: p.detach().clone() for k, p in module.named_parameters()}
        rows = torch.tensor([1, 2, 3])
        v = module.model.item(torch.randn(3, 8), torch.randn(3, 7), rows, torch.ones(3, dtype=torch.bool))
        opt.zero_grad()
        v.square().sum().backward()
        opt.step()
        moved = (table.detach() - before["model.id_table.weight"]).abs()
        assert moved[rows].max() == pytest.approx(id_lr or 1e-4, rel=0.05) and moved[4:].max() == 0
        other = (module.model.item.skip.weight.detach() - before["model.item.skip.weight"]).abs().max()
        assert other == pytest.approx(1e-4, rel=0.05)  # Adam: |step| = lr where |grad| >> eps


def _candidates(U: int, N: int, rng: np.random.Generator, target_at: np.ndarray):
    """U users x N candidates, retrieval order = row order; the target sits at ``target_at`` and is the only
    candidate with has_video = 1 (a feature the reranker can learn, the retrieval order cannot)."""
    from recsys.rerank import Candidates

    rows = np.stack([rng.permutation(1000)[:N] for _ in range(U)])
    scores = np.sort(rng.normal(size=(U, N)).astype(np.float32), axis=1)[:, ::-1].copy()
    stats = rng.normal(size=(U, N, 7)).astype(np.float32)
    stats[..., 6] = 0.0
    stats[np.arange(U), target_at, 6] = 1.0
    cands = Candidates(rows, scores, rng.normal(size=(U, 8)).astype(np.float32), rng.normal(size=(U, 3)).astype(np.float32),
                       stats, rng.normal(size=(U, N, 8)).astype(np.float32))
    return cands, [rows[u, target_at[u]][None] for u in range(U)]


def test_reranker_check_cross_fits_on_validation_and_says_whether_it_beats_retrieval(tmp_path):
    from recsys.rerank import Reranker

    rng = np.random.default_rng(0)
    U, N = 300, 30
    # the target is deep in the retrieval order but marked by a feature: reranking must help
    cands, targets = _candidates(U, N, rng, rng.integers(10, N, size=U))
    r = Reranker(max_iter=50, seed=0)
    check = r.check(cands, targets)
    assert check.retrieval_ndcg10 == 0.0 and check.reranked_ndcg10 > 0.8 and check.helps and check.users == U
    assert not r.fitted  # checking fits fold models only; the served model is fitted separately
    r.fit(cands, targets)
    assert r.helps
    r.save(tmp_path / "r.joblib")
    loaded = Reranker.load(tmp_path / "r.joblib")
    assert loaded.validation == check and loaded.helps

    # retrieval already puts every target first: a reranker cannot beat it, and says so
    cands, targets = _candidates(U, N, rng, np.zeros(U, dtype=int))
    stats = cands.item_stats
    stats[..., 6] = rng.integers(0, 2, size=stats.shape[:2])  # the marker is now noise
    r = Reranker(max_iter=50, seed=0)
    check = r.check(cands, targets)
    assert check.retrieval_ndcg10 == 1.0 and not check.helps
    assert not r.fit(cands, targets).helps  # fitted, but not used by default


def test_reranker_on_too_few_validation_users_stays_unfitted_instead_of_crashing():
    """A tiny or sparse dataset: one validation user (one cross-fitting fold is empty) or none at all."""
    from recsys.rerank import Reranker

    rng = np.random.default_rng(1)
    for users in (1, 3):
        cands, targets = _candidates(users, 20, rng, np.zeros(users, dtype=int))
        r = Reranker(max_iter=10)
        check = r.check(cands, targets)
        assert check.users == users and not check.helps
        assert not r.fit(cands, targets).fitted
        rows, _ = r.rerank(cands, 5)
        np.testing.assert_array_equal(rows, cands.rows[:, :5])  # the retrieval order stands
    empty, _ = _candidates(1, 20, rng, np.zeros(1, dtype=int))
    assert not Reranker().fit(empty.subset(np.array([], dtype=int)), []).fitted


@pytest.mark.slow  # a whole stage end to end: `make test` runs it, `make test-fast` does not
def test_the_pipeline_chooses_the_item_input_on_validation_registers_it_and_every_later_stage_reads_it(
        synthetic, synthetic_dir, tmp_path):
    """item_input auto on a catalog with images, two newest_items values, ids or not: a two-tower per input with the
    first values, per better half of the inputs with the second newest_items, the lead of those with ids, trained
    select_epochs, the best on validation NDCG@10 trained on to max_epochs, kept and registered with what it reads;
    the nightly job resolves that space and `recsys evaluate` reloads the kept checkpoint with it (same test figures)."""
    import json

    import mlflow

    from recsys.flows.nightly import served_item_input
    from recsys.embed.catalog import embed_catalog, item_input_candidates
    from recsys.flows.protocol import run_protocol
    from recsys.flows.saved import evaluate_saved
    from tests.conftest import small_config

    cfg = small_config(tmp_path, data={"source": "generic", "path": str(synthetic_dir)}, eval={"protocols": ["loo"]},
                       train={"max_epochs": 3, "select_epochs": 1, "patience": 5, "newest_items": [0, 1],
                              "id_embeddings": [False, True]})
    assert served_item_input(cfg) == "fused"  # nothing registered yet
    iv, ds = embed_catalog(cfg, synthetic)
    cands = item_input_candidates(cfg, ds, iv)
    run = run_protocol(cfg, ds, iv, "loo", register=True, baselines=("popularity",), candidates=cands)
    choice = run.extra["item_input"]
    # the rounds themselves are checked in test_variant_search_halves_then_screens_ids_on_the_lead (fast); here: six
    # variants (three inputs, the better two with newest1, the lead with ids), the best on validation kept
    val = choice["val_ndcg10"]
    assert len(val) == 6 and sum(label.endswith("+ids") for label in val) == 1
    assert choice["variant"] == max(val, key=lambda m: (val[m], -list(val).index(m)))
    assert choice["variant"] == f"{choice['chosen']}+newest{choice['newest_items']}" + ("+ids" if choice["id_embeddings"] else "")
    assert run.trained.module.model.cfg.use_ids == choice["id_embeddings"]
    assert choice["val_ndcg10"][choice["variant"]] == max(choice["val_ndcg10"].values()) and choice["screen_epochs"] == 1
    # the choice was made on the first epoch's validation; only the chosen variant trained on, in the same run
    assert run.trained.epochs == 3 and len(run.trained.val_results) == 3
    assert run.trained.val_results[0].estimates["NDCG@10"].mean == choice["val_ndcg10"][choice["variant"]]
    assert choice["kept_val_ndcg10"] == max(r.estimates["NDCG@10"].mean for r in run.trained.val_results)
    assert run.trained.content_vectors.shape[1] == cands[choice["chosen"]].dim
    assert run.trained.module.model.cfg.newest_items == choice["newest_items"]
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mv = mlflow.tracking.MlflowClient().get_model_version_by_alias(cfg.train.registered_model, "champion")
    tower = json.loads(open(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="two_tower/two_tower.json")).read())
    assert tower["item_input"] == choice["chosen"] == served_item_input(cfg)
    assert tower["dim"] == cands[choice["chosen"]].dim and tower["embedder_version"] == choice["item_vectors"]
    from recsys import contract  # the registered model records the contract it was written under, and it is ours

    assert tower["contract"] == contract.record(run.trained.module.model.cfg.layout)
    assert contract.check(tower) == run.trained.module.model.cfg.layout
    again = evaluate_saved(cfg, baselines=())[0].results[0]
    assert again.estimates["NDCG@10"].mean == pytest.approx(run.results[0].estimates["NDCG@10"].mean, abs=1e-6)
    # the rerank path scores the two-tower from the test candidates' head: the same ranking as its own top 50
    ranked = run.trained.candidates(run.split.test, ds.catalog, cfg, cfg.serve.candidates)
    own = run.trained.evaluate(run.split, ds.catalog, cfg, n_boot=10, keep_topk=True)
    shared = run.trained.evaluate(run.split, ds.catalog, cfg, n_boot=10, keep_topk=True, ranked=ranked)
    assert np.array_equal(own.topk, shared.topk) and own.per_user.equals(shared.per_user)


@pytest.mark.slow  # a whole stage end to end: `make test` runs it, `make test-fast` does not
def test_cold_trains_on_items_as_new_items_look_unless_told_to_keep_their_tags(synthetic, tmp_path, capsys):
    """COLD scores cold items on their own content (no user tags): with ``[train.cold] item_content`` "new" (the default)
    the two-tower also reads every other item that way, with "full" the warm items keep their tags; an item that
    is nothing but tags keeps its vector (and is named); LOO always reads the tags."""
    import polars as pl

    from recsys.data.types import Catalog
    from recsys.embed import item_embedder
    from recsys.eval import make_split
    from recsys.embed.catalog import embed_catalog
    from recsys.eval.inputs import new_item_vectors, protocol_vectors
    from tests.conftest import small_config

    cfg = small_config(tmp_path)
    cold_items = make_split("cold", synthetic, cfg.eval).cold_items
    warm = [r for r in range(len(synthetic.catalog)) if r not in set(cold_items.tolist())]
    tags_only = next(r for r in warm if not synthetic.catalog.modalities[r, 1])  # no image: the COLD pool stays
    tagged = [r for r in warm if r != tags_only][:3] + [int(cold_items[0])]
    tag = {"kind": "text", "text": "tags: slow burn, great soundtrack", "path": None, "source": "user"}
    parts = [[tag] if r == tags_only else (p + [tag] if r in tagged else p)
             for r, p in enumerate(synthetic.catalog.items["parts"].to_list())]
    items = synthetic.catalog.items.with_columns(pl.Series("parts", parts, dtype=synthetic.catalog.items.schema["parts"]))
    ds = synthetic._like(Catalog(items), synthetic.interactions.frame)
    iv, ds = embed_catalog(cfg, ds, cold=True, save=False)
    split = make_split("cold", ds, cfg.eval)
    assert np.array_equal(split.cold_items, cold_items)
    emb = item_embedder(cfg, "fused")
    own = emb.embed([ds.catalog.content(r, cold=True) for r in tagged], dim=cfg.embedder.dim)
    capsys.readouterr()
    _, _, new = protocol_vectors(cfg, ds, iv, split)
    assert "keep their tagged vectors" in (said := capsys.readouterr().out) and ds.catalog.ids[tags_only] in said
    _, _, full = protocol_vectors(cfg.with_train(cold_item_content="full"), ds, iv, split)
    np.testing.assert_allclose(new[tagged], own, atol=1e-5)  # warm and cold tagged items, without their tags
    np.testing.assert_allclose(full[tagged[:-1]], iv.vectors[tagged[:-1]])  # "full": warm items keep their tags...
    np.testing.assert_allclose(full[tagged[-1]], own[-1], atol=1e-5)  # ... a cold item never has them
    assert not np.allclose(new[tagged[0]], full[tagged[0]], atol=1e-3)
    untouched = [r for r in range(len(ds.catalog)) if r not in tagged]
    np.testing.assert_array_equal(new[untouched], iv.vectors[untouched])  # tags_only included: it keeps its vector
    assert np.isfinite(new).all()
    _, _, loo = protocol_vectors(cfg, ds, iv, make_split("loo", ds, cfg.eval))
    np.testing.assert_array_equal(loo, iv.vectors)
    assert np.array_equal(new_item_vectors(cfg, ds, iv), new)


@pytest.mark.slow  # a whole stage end to end: `make test` runs it, `make test-fast` does not
def test_cold_training_hides_every_items_id_and_statistics_as_its_test_items_have_none(synthetic, tmp_path):
    """COLD trains with ``[train.cold] id_dropout`` (1: every example's item id and statistics hidden, the item tower learns
    from content alone, as every cold item is scored); LOO keeps ``id_dropout`` (a share hidden). COLD's towers
    add the embedder's similarity (``[train.cold] content_match``), LOO's do not (``content_match``)."""
    from recsys.eval import make_split
    from recsys.embed.catalog import embed_catalog
    from recsys.eval.inputs import protocol_vectors
    from recsys.flows.features import build_features
    from tests.conftest import small_config
    from training.datamodule import RandomBatches
    from training.train import _two_tower_data

    cfg = small_config(tmp_path)
    assert cfg.train.cold.id_dropout == 1.0 and cfg.train.id_dropout == 0.5
    iv, ds = embed_catalog(cfg, synthetic, cold=True, save=False)
    hidden, matched = {}, {}
    for protocol in ("cold", "loo"):
        split = make_split(protocol, ds, cfg.eval)
        pds, piv, vec = protocol_vectors(cfg, ds, iv, split)
        repo = build_features(cfg, pds, vec, piv, split.train, name=protocol, materialize=False)
        dm, module = _two_tower_data(cfg, pds.catalog, split, repo, vec, True, None)
        dm.epoch = 0
        batch = RandomBatches(dm)[0]
        stats_hidden = (batch["p_stats"][:, :3] == 0).all(1).numpy()
        hidden[protocol] = stats_hidden.mean(), (~batch["p_id_mask"].numpy()).mean()
        # mined hard negatives hide theirs at the same rate (never only the positives': the stats would tell them apart)
        dm.hard = np.random.default_rng(0).integers(0, dm.n_items, (len(dm.rows.times), 3))
        mined = RandomBatches(dm)[0]
        dm.hard = None
        shown = (mined["h_stats"][..., :3] != 0).any(-1).numpy()
        known = dm.known[mined["h_rows"].numpy()]  # ids that could be shown
        if protocol == "cold":
            assert known.any() and not shown.any() and not mined["h_id_mask"].numpy().any()
        else:
            assert shown.any() and 0.3 < mined["h_id_mask"].numpy()[known].mean() < 0.7
        matched[protocol] = module.model.user.match is not None
    assert hidden["cold"] == (1.0, 1.0)
    assert matched == {"cold": True, "loo": False}  # either setting can be changed:
    assert not cfg.with_train(cold_content_match=False).train.for_protocol("cold").content_match
    assert cfg.with_train(content_match=True).train.for_protocol("loo").content_match
    assert cfg.with_train(id_embeddings=[False, True]).train.for_protocol("cold").id_choices == [False]  # nothing to screen
    assert cfg.with_train(id_embeddings=[False, True], cold_id_dropout=0.5).train.for_protocol("cold").id_choices == [False, True]
    assert 0.3 < hidden["loo"][0] < 0.9 and 0.3 < hidden["loo"][1] < 0.9


def test_variant_search_halves_then_screens_ids_on_the_lead(monkeypatch, tmp_path):
    """Successive halving (recsys.flows.protocol.VariantSearch) with made-up validation scores: every input with
    the first values, the better half of the inputs with the other newest_items values, the lead with the other
    id_embeddings values; the best kept (ties: the first trained) and trained on from its screening fit."""
    from types import SimpleNamespace

    from recsys.flows import protocol
    from tests.conftest import small_config

    scores = {"fused+newest0": 0.30, "text+newest0": 0.10, "concat+newest0": 0.20, "fused+newest1": 0.35,
              "concat+newest1": 0.40, "concat+newest1+ids": 0.40}
    trained, resumed, dropped = [], [], []

    def fake_fit(cfg, catalog, split, repo, vectors, max_epochs=None, name="", rows_cache=None, resume=None):
        if resume is not None:
            resumed.append((resume.name, cfg.train.newest_items, cfg.train.id_embeddings))
            return SimpleNamespace(name=resume.name, val_results=resume.val_results, content_vectors=vectors, epochs=3,
                                   examples_per_s=1.0, seconds=2.0, drop_training_data=lambda: dropped.append("kept"))
        label = name.removeprefix("two-tower[").removesuffix("]")
        trained.append((label, max_epochs))
        est = SimpleNamespace(estimates={"NDCG@10": SimpleNamespace(mean=scores[label])})
        return SimpleNamespace(name=name, val_results=[est], content_vectors=vectors, epochs=1, examples_per_s=1.0,
                               seconds=1.0, drop_training_data=lambda: dropped.append(label))

    monkeypatch.setattr(protocol, "fit_two_tower", fake_fit)
    def fake_input(self, mode):
        return self.inputs.setdefault(mode, protocol.ProtocolInput(SimpleNamespace(catalog=None),
                                                                   SimpleNamespace(model_version=mode), None, None))

    monkeypatch.setattr(protocol.VariantSearch, "input", fake_input)
    cfg = small_config(tmp_path, train={"max_epochs": 3, "select_epochs": 1, "newest_items": [0, 1],
                                        "id_embeddings": [False, True]})
    search = protocol.VariantSearch(cfg, None, SimpleNamespace(name="loo"), {"fused": 0, "text": 0, "concat": 0})
    best = search.run()
    assert [label for label, _ in trained] == ["fused+newest0", "text+newest0", "concat+newest0", "fused+newest1",
                                               "concat+newest1", "concat+newest1+ids"]
    assert all(epochs == 1 for _, epochs in trained)  # screening fits
    assert best.label == "concat+newest1" and best.trained.name == "two-tower"  # the tie goes to the first trained
    assert resumed == [("two-tower[concat+newest1]", 1, False)]
    assert sorted(dropped) == sorted(["kept", *(label for label, _ in trained if label != "concat+newest1")])  # no rows kept
    extra = search.record(best)["item_input"]
    assert extra["val_ndcg10"] == scores and extra["chosen"] == "concat" and extra["screen_epochs"] == 1
    assert search.record(best)["train_s"] == 2.0 + 5 * 1.0  # the kept fit and the five that lost
    one = protocol.VariantSearch(cfg.with_train(newest_items=0, id_embeddings=False), None, SimpleNamespace(name="loo"),
                                 {"fused": 0})
    trained.clear()
    scores["two-tower"] = 0.1
    assert one.run().label == "fused" and trained == [("two-tower", None)]  # a single variant trains fully at once


@pytest.mark.slow  # every stage of the scale benchmark, tiny: `make test` runs it, `make test-fast` does not
def test_the_scale_benchmark_runs_every_stage_and_records_time_and_memory(tmp_path):
    """benchmarks/scale_bench.py at 20k interactions: each stage timed with its peak resident memory, the training
    set streamed from Feast into compact rows, an epoch, a full-ranking evaluation that beats chance, the
    online writes, the index and a nightly that rebuilds only the touched users."""
    from benchmarks.scale_bench import run_size

    res = run_size(20_000, tmp_path / "scale", n_items=2_000, eval_users=300)
    st = res["stages"]
    assert list(st) == ["generate", "load", "split", "feast offline writes", "point-in-time training set",
                        "two-tower epoch", "evaluation", "feast online writes", "index build", "nightly (1% changed)"]
    assert all(s["seconds"] > 0 and s["peak_rss_mb"] >= s["start_rss_mb"] > 0 for s in st.values())
    assert st["load"]["interactions"] == 20_000 and st["point-in-time training set"]["rows"] == st["split"]["training_interactions"]
    assert st["two-tower epoch"]["examples_per_s"] > 0 and not st["two-tower epoch"]["capped"]
    assert st["two-tower epoch"]["rows_freed_after"]  # evaluation and the writes never share memory with them
    assert st["evaluation"]["users"] == 300 and st["evaluation"]["Recall@50"] > 50 / 2_000  # chance: 0.025
    assert 0 < st["nightly (1% changed)"]["users_refreshed"] < res["users"]
    assert st["nightly (1% changed)"]["items_changed"] > 0
