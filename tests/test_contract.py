"""The train-to-serve contract (recsys.contract): a change to the towers' inputs, the statistics columns or
the vector layout made on one side only fails here, in seconds, before any demo runs."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from features.inputs import ItemInputs, UserInputs, item_stat_matrix, user_stat_matrix
from recsys import contract
from training.towers import N_ITEM_STATS, N_USER_STATS, ItemTower, TowerConfig, TwoTower, UserTower

N_ITEMS, D, L = 12, 8, 4


def tiny(**kw) -> TwoTower:
    torch.manual_seed(0)
    cfg = TowerConfig(content_dim=D, n_items=N_ITEMS, out_dim=6, hidden_dim=16, id_dim=4, recent=L, **kw)
    return TwoTower(cfg).eval()


def some_users(n: int = 5) -> tuple[UserInputs, np.ndarray, np.ndarray]:
    """Users with histories, 0..L recent items and statistics; the padded content table and known flags."""
    rng = np.random.default_rng(1)
    rows = np.full((n, L), N_ITEMS, np.int64)
    for u in range(n):
        k = u % (L + 1)
        rows[u, :k] = rng.choice(N_ITEMS, k, replace=False)
    users = UserInputs(rng.normal(size=(n, D)).astype(np.float32), rows, rows < N_ITEMS,
                       user_stat_matrix(rng.integers(0, 50, n), rng.uniform(0, 5, n), np.full(n, 1e9), 1.1e9))
    content = np.vstack([rng.normal(size=(N_ITEMS, D)), np.zeros((1, D))]).astype(np.float32)
    known = np.append(rng.random(N_ITEMS) < 0.7, False)
    return users, content, known


def params(fn) -> tuple[str, ...]:
    return tuple(list(inspect.signature(fn).parameters)[1:])  # without self


def test_the_towers_take_their_inputs_by_the_contracts_names_and_order():
    assert params(UserTower.forward) == contract.USER_INPUTS
    assert params(ItemTower.forward) == contract.ITEM_INPUTS


def test_inputs_are_assembled_in_contract_order_with_their_shapes():
    users, content, known = some_users()
    got = dict(zip(contract.USER_INPUTS, users.tensors(content, known)))
    assert list(got) == list(contract.USER_INPUTS)
    assert got["history"].shape == (5, D) and got["recent_content"].shape == (5, L, D)
    assert got["recent_ids"].dtype == torch.int64 and got["recent_mask"].dtype == torch.bool
    assert torch.equal(got["recent_id_mask"], got["recent_mask"] & torch.from_numpy(known)[got["recent_ids"]])
    assert got["stats"].shape == (5, len(contract.USER_STATS))
    empty = UserInputs.empty(2, L, D, N_ITEMS)
    assert [t.shape[0] for t in empty.tensors(content, known)] == [2] * len(contract.USER_INPUTS)
    items = ItemInputs(content[:3], np.zeros((3, len(contract.ITEM_STATS)), np.float32), np.arange(3), known[:3])
    assert len(items.tensors()) == len(contract.ITEM_INPUTS)


def test_statistics_columns_are_what_their_names_say():
    assert (N_ITEM_STATS, N_USER_STATS) == (len(contract.ITEM_STATS), len(contract.USER_STATS))
    day = 86400.0
    m = item_stat_matrix([99], [9], [1000.0], [1000.0 + 3 * day], np.array([[1, 0, 1, 0]]))
    col = dict(zip(contract.ITEM_STATS, m[0]))
    assert col["log_pop_all"] == pytest.approx(np.log1p(99) / 5) and col["log_pop_30d"] == pytest.approx(np.log1p(9) / 5)
    assert col["log_age_days"] == pytest.approx(np.log1p(3) / 8)
    assert (col["has_text"], col["has_image"], col["has_audio"], col["has_video"]) == (1, 0, 1, 0)
    u = dict(zip(contract.USER_STATS, user_stat_matrix([7], [4.0], [1000.0], [1000.0 + 2 * day])[0]))
    assert u["log_n_interactions"] == pytest.approx(np.log1p(7) / 5) and u["mean_value"] == pytest.approx(0.8)
    assert u["log_days_since_first"] == pytest.approx(np.log1p(2) / 8)
    assert contract.ITEM_INTERACTION_STATS == ("log_pop_all", "log_pop_30d", "log_age_days")


@pytest.mark.parametrize("content_match,item_bias", [(False, True), (True, True), (True, False), (False, False)])
def test_the_vector_layout_is_what_the_towers_output(content_match, item_bias):
    model = tiny(content_match=content_match, item_bias=item_bias)
    layout = model.cfg.layout
    assert contract.VectorLayout.from_tower(model.cfg.to_dict()) == layout and layout.width == model.cfg.vector_dim
    if content_match:
        with torch.no_grad():
            model.user.match.fill_(0.7)
    users, content, known = some_users()
    with torch.inference_mode():
        u = model.user(*users.tensors(content, known)).numpy()
        items = ItemInputs(content[:N_ITEMS], np.random.default_rng(2).random((N_ITEMS, N_ITEM_STATS), np.float32),
                           np.arange(N_ITEMS), known[:N_ITEMS])
        v = model.item(*items.tensors()).numpy()
    assert u.shape[1] == v.shape[1] == layout.width
    assert np.allclose(np.linalg.norm(u[:, layout.unit], axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(v[:, layout.unit], axis=1), 1, atol=1e-5)
    if layout.bias is not None:
        assert np.allclose(u[:, layout.bias], 1.0)  # the user side of the bias coordinate
        assert not np.allclose(v[:, layout.bias], 1.0)
    if layout.content is not None:
        unit_h = users.history / np.linalg.norm(users.history, axis=1, keepdims=True)
        assert np.allclose(u[:, layout.content], 0.7 * unit_h, atol=1e-5)
        assert np.allclose(v[:, layout.content], content[:N_ITEMS] / np.linalg.norm(content[:N_ITEMS], axis=1, keepdims=True),
                           atol=1e-5)
    # an item as a query (/similar): the bias coordinate as a user's, the content block weighed as a user's
    q = layout.item_as_query(v, content_match_weight=0.7)
    if layout.bias is not None:
        assert np.all(q[:, layout.bias] == 1.0)
    if layout.content is not None:
        assert np.allclose(q[:, layout.content], 0.7 * v[:, layout.content])
    assert np.array_equal(q[:, layout.unit], v[:, layout.unit])
    with pytest.raises(contract.ContractError, match="width"):
        layout.item_as_query(v[:, :-1])


def test_the_exported_user_tower_serving_runs_answers_as_the_trained_one(tmp_path):
    """Serving calls the exported program with UserInputs.tensors (serving/service.py) and warms it up with
    UserInputs.empty (serving/snapshot.py): both must be what the trained tower takes."""
    from serving.snapshot import ModelBundle, _warm_up
    from training.train import export_user_tower

    model = tiny(content_match=True, newest_items=1)
    users, content, known = some_users()
    example = tuple(t.numpy() for t in UserInputs.empty(2, L, D, N_ITEMS).tensors(content, known))
    exported = torch.export.load(str(export_user_tower(model.user, example, tmp_path / contract.USER_TOWER_FILE))).module()
    with torch.inference_mode():
        want = model.user(*users.tensors(content, known)).numpy()
        got = exported(*users.tensors(content, known)).numpy()
    assert np.allclose(got, want, atol=1e-5)
    config = {"tower": model.cfg.to_dict(), "contract": contract.record(model.cfg.layout)}
    bundle = ModelBundle("1", "run", exported, [str(i) for i in range(N_ITEMS)], [""] * N_ITEMS,
                         np.zeros((N_ITEMS, model.cfg.vector_dim), np.float32), content[:N_ITEMS], known[:N_ITEMS], config,
                         None, np.zeros((0, model.cfg.vector_dim), np.float32))
    _warm_up(bundle)
    assert bundle.layout == model.cfg.layout


def test_a_model_written_under_another_contract_is_refused_with_what_differs():
    layout = contract.VectorLayout(64, 32, content_match=True)
    rec = contract.record(layout)
    config = {"tower": {"out_dim": 64, "content_dim": 32, "content_match": True, "item_bias": True}, "contract": rec}
    assert contract.check(config) == layout
    assert contract.check({"tower": config["tower"]}) == layout  # a model from before the record: its tower
    swapped = {**rec, "user_inputs": [*rec["user_inputs"][:2], rec["user_inputs"][3], rec["user_inputs"][2],
                                      *rec["user_inputs"][4:]]}
    with pytest.raises(contract.ContractError, match="user_inputs") as err:
        contract.check({**config, "contract": swapped}, where="model m v3")
    assert "model m v3" in str(err.value) and "Retrain" in str(err.value)
    with pytest.raises(contract.ContractError, match="version"):
        contract.check({**config, "contract": {**rec, "version": contract.VERSION + 1}})
    with pytest.raises(contract.ContractError, match="layout"):
        contract.check({**config, "contract": {**rec, "layout": {**rec["layout"], "item_bias": False}}})
