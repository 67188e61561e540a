"""The Feast feature store, against SQLite and a real redis-server: point-in-time correctness,
validation, explicit misses, the event log's fold, incremental materialization, versioned views."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest

from features.store import FeatureRepo, FeatureValidationError
from tests.conftest import small_config

DIM = 16


@pytest.fixture(scope="module")
def small(movielens):
    return movielens.with_users(40)


def vectors(n, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(params=["sqlite", "redis"])
def repo(request, tmp_path, small):
    feats = {"online_store": request.param}
    if request.param == "redis":
        feats["redis_connection"] = request.getfixturevalue("redis_connection")
        feats["project"] = f"t{abs(hash(str(tmp_path))) % 10**8}"  # a fresh key space per test
    cfg = small_config(tmp_path, features=feats)
    r = FeatureRepo(cfg, "local", "test-v1", DIM, name="serve")
    V = vectors(len(small.catalog))
    r.write_item_embeddings(small.catalog.ids, V)
    r.write_interaction_features(small.interactions.frame, small.catalog, V)
    r.apply()
    r.V = V
    return r


def test_online_reads_and_explicit_misses(repo, small):
    report = repo.materialize()
    assert report.rows[repo.views.item_embedding.name] == len(small.catalog)
    users = small.interactions.frame["user_id"].unique().sort().to_list()
    u = repo.online_users([users[0], "no-such-user"])
    assert u.found.tolist() == [True, False]
    assert u.recent_item_ids[1] == [] and not u.history_vector[1].any()
    last = small.interactions.frame.filter(pl.col("user_id") == users[0]).tail(1)["item_id"][0]
    assert u.recent_item_ids[0][0] == last  # newest first
    assert u.history_count[0] == small.interactions.frame.filter(pl.col("user_id") == users[0]).height
    items = repo.online_items([small.catalog.ids[0], "no-such-item"])
    assert items.found.tolist() == [True, False]
    assert np.allclose(items.embedding[0], repo.V[0], atol=1e-6)


def test_point_in_time_training_set_never_sees_the_label(repo, small):
    labels = small.interactions.frame.select("user_id", "item_id", "timestamp")
    ts = repo.training_set(labels)
    assert ts.height == labels.height
    assert ts.select("user_id", "item_id", "timestamp").equals(labels)  # the labels' order, so training is reproducible
    # no label item ever appears in its own history
    leaks = ts.filter(pl.col("recent_item_ids").list.contains(pl.col("item_id")))
    same_item_earlier = small.interactions.frame.join(labels, on=["user_id", "item_id"]).filter(
        pl.col("timestamp") < pl.col("timestamp_right"))
    assert leaks.height <= same_item_earlier.height  # only a genuine earlier interaction with the same item
    # the joined history is the snapshot strictly before the label: its count equals the number of earlier events
    f = small.interactions.frame.with_columns(pl.int_range(pl.len()).over("user_id").alias("pos"))
    earlier = f.join(f.select("user_id", pl.col("timestamp").alias("t2")), on="user_id").filter(
        pl.col("t2") < pl.col("timestamp")).group_by("user_id", "item_id", "timestamp").len()
    check = ts.join(earlier, on=["user_id", "item_id", "timestamp"], how="left").with_columns(
        pl.col("len").fill_null(0))
    assert (check["history_count"].fill_null(0) == check["len"]).all()


def test_vector_columns_read_as_arrays_equal_row_by_row_reading(repo, small):
    """features.inputs._vectors reads Feast's history-vector column (nulls before a user's first event) without
    Python lists; it must give exactly the per-row values, zeros for nulls, and name the column on a bad width."""
    from features.inputs import _vectors

    col = repo.training_set(small.interactions.frame.select("user_id", "item_id", "timestamp"))["history_vector"]
    assert col.null_count() > 0
    got = _vectors(col, repo.dim)
    for i, v in enumerate(col.to_list()):
        assert np.array_equal(got[i], np.zeros(repo.dim, np.float32) if v is None else np.asarray(v, np.float32))
    with pytest.raises(ValueError, match="history_vector.*expected vectors of"):
        _vectors(col, repo.dim + 1)


def test_a_history_written_after_the_label_is_never_joined(repo, small):
    user = small.interactions.frame["user_id"][0]
    t = small.interactions.frame.filter(pl.col("user_id") == user)["timestamp"].max() + timedelta(days=1)
    future = pl.DataFrame({"user_id": [user], "item_id": [small.catalog.ids[5]], "timestamp": [t]})
    before = repo.training_set(future)["history_count"][0]
    f = small.interactions.frame
    later = pl.DataFrame({"user_id": [user], "item_id": [small.catalog.ids[7]], "timestamp": [t + timedelta(hours=1)],
                          "value": [None]}, schema=f.schema)  # after the label
    repo.write_interaction_features(pl.concat([f, later]), small.catalog, repo.V)
    after = repo.training_set(future)["history_count"][0]
    assert before == after


def test_asof_offline_store_matches_feasts_stock_duckdb_join(repo, small):
    import yaml

    labels = small.interactions.frame.sample(300, seed=1).select("user_id", "item_id", "timestamp")
    ours = repo.training_set(labels).sort("user_id", "item_id", "timestamp")
    conf_path = repo.dir / "feature_store.yaml"
    conf = yaml.safe_load(conf_path.read_text())
    conf["offline_store"] = {"type": "duckdb"}
    conf_path.write_text(yaml.safe_dump(conf))
    stock = FeatureRepo.__new__(FeatureRepo)
    stock.__dict__.update({k: v for k, v in repo.__dict__.items() if k != "store"})
    theirs = stock.training_set(labels).sort("user_id", "item_id", "timestamp")
    assert ours.columns == theirs.columns
    for col in ours.columns:
        a, b = ours[col].to_list(), theirs[col].to_list()
        if col in ("history_vector", "embedding"):
            assert all((x is None and y is None) or np.allclose(x, y) for x, y in zip(a, b)), col
        else:
            assert a == b, col


def test_invalid_vectors_are_rejected_and_nothing_is_damaged(repo, small):
    repo.materialize()
    bad = vectors(3, seed=9)
    bad[0, 0] = np.nan
    bad[2, 1] = np.inf
    ids = small.catalog.ids[:3]
    with pytest.raises(FeatureValidationError) as err:
        repo.write_item_embeddings(ids, bad)
    assert set(err.value.ids) == {ids[0], ids[2]}
    with pytest.raises(FeatureValidationError, match="length != 16"):
        repo.write_item_embeddings(ids[:1], [np.ones(DIM + 1)])
    assert np.allclose(repo.online_items(ids).embedding, repo.V[:3], atol=1e-6)
    assert pl.read_parquet(repo._path(repo.views.item_embedding)).height == len(small.catalog)


def test_incremental_materialization_writes_only_what_changed(repo, small):
    first = repo.materialize()
    again = repo.materialize()
    assert sum(again.rows.values()) == 0
    changed = vectors(2, seed=5)
    at = datetime.now(timezone.utc)
    assert repo.write_item_embeddings(small.catalog.ids[:2], changed, at=at) == 2
    assert repo.write_item_embeddings(small.catalog.ids[:2], changed, at=at) == 0  # unchanged: not rewritten
    third = repo.materialize(end=at + timedelta(seconds=1))
    assert third.rows[repo.views.item_embedding.name] == 2
    assert np.allclose(repo.online_items(small.catalog.ids[:2]).embedding, changed, atol=1e-6)
    assert sum(first.rows.values()) > 2


def event_log(repo):
    from recsys.events import SqliteEventLog

    return SqliteEventLog(repo.cfg.workdir / "events" / "events.db")


def now_features(repo, log, user):
    return repo.online_users_now([user], log, lambda i: repo.V[repo.row[i]] if i in repo.row else None)


def test_logged_events_are_in_the_online_features_at_once(repo, small):
    from recsys.events import Event

    repo.materialize()
    repo.row = small.catalog.index
    log = event_log(repo)
    user = small.interactions.frame["user_id"][0]
    before = repo.online_users([user])
    item = small.catalog.ids[11]
    for i in (item, small.catalog.ids[12], item):  # the service takes many
        log.append(Event.new(user, i))
    after = now_features(repo, log, user)
    assert after.recent_item_ids[0][0] == item and after.events_folded[0] == 3
    assert after.history_count[0] == before.history_count[0] + 3
    assert after.n_interactions[0] == before.n_interactions[0] + 3
    # the full seen set (serving's filter) holds every item the user ever had, and now the new one first
    had = small.interactions.frame.filter(pl.col("user_id") == user)["item_id"].unique().to_list()
    assert sorted(before.seen_item_ids[0]) == sorted(had)
    assert after.seen_item_ids[0][0] == item and set(had) <= set(after.seen_item_ids[0])
    assert not np.allclose(after.history_vector[0], before.history_vector[0])
    # a user the store has never seen becomes known through the log alone
    new = now_features(repo, log, "brand-new") if log.append(Event.new("brand-new", item)).new else None
    assert new.found[0] and new.seen_item_ids[0] == [item] and new.history_count[0] == 1


def test_rows_rebuilt_with_the_events_are_not_folded_twice(repo, small):
    """Once a rebuild (the nightly) includes the log's events, its rows carry their sequence and serving folds
    only what came after: the features equal those of the rebuild plus the newer events, never counted twice."""
    from recsys.events import Event, with_events

    repo.row = small.catalog.index
    log = event_log(repo)
    user = small.interactions.frame["user_id"][0]
    for i in (3, 4):
        log.append(Event.new(user, small.catalog.ids[i]))
    ds, n = with_events(small, log)
    assert n == 2
    repo.write_interaction_features(ds.interactions.frame, small.catalog, repo.V)
    repo.materialize(full=(repo.views.user_history.name, repo.views.user_stats.name, repo.views.user_seen.name))
    rebuilt = now_features(repo, log, user)
    assert rebuilt.events_folded[0] == 0 and rebuilt.events_seq["seen"][0] == 2
    assert rebuilt.history_count[0] == small.interactions.frame.filter(pl.col("user_id") == user).height + 2
    log.append(Event.new(user, small.catalog.ids[5]))
    later = now_features(repo, log, user)
    assert later.events_folded[0] == 1 and later.history_count[0] == rebuilt.history_count[0] + 1


def test_a_new_embedder_version_or_dim_gets_its_own_views(tmp_path):
    cfg = small_config(tmp_path)
    a = FeatureRepo(cfg, "local", "v1", 16)
    b = FeatureRepo(cfg, "local", "v2", 16)
    c = FeatureRepo(cfg, "local", "v1", 32)
    names = {r.views.item_embedding.name for r in (a, b, c)}
    assert len(names) == 3
    assert c.views.item_embedding.tags == {"embedder": "local", "model_version": "v1", "dim": "32"}
    with pytest.raises(FeatureValidationError):
        c.write_item_embeddings(["1"], [np.ones(16)])  # a 16-d vector never lands in the 32-d view


def test_folded_events_continue_the_decayed_history_exactly(repo, small):
    """The online history with a logged event equals what the offline snapshots compute with that event."""
    from features.compute import user_snapshots
    from recsys.events import Event

    repo.materialize()
    repo.row = small.catalog.index
    log = event_log(repo)
    f = small.interactions.frame
    user = f["user_id"][0]
    at = f["timestamp"].max() + timedelta(days=1)
    item = small.catalog.ids[13]
    log.append(Event.new(user, item, at))
    online = now_features(repo, log, user)
    extended = pl.concat([f.filter(pl.col("user_id") == user),
                          pl.DataFrame({"user_id": [user], "item_id": [item], "timestamp": [at], "value": [None]},
                                       schema=f.schema)])
    hist, _ = user_snapshots(extended, repo.V, small.catalog.index, repo.cfg.features.recent_items,
                             repo.cfg.embedder.history_half_life)
    last = hist.sort("event_timestamp").tail(1)
    assert np.allclose(online.history_vector[0], np.array(last["history_vector"][0]), atol=1e-5)
    assert online.recent_item_ids[0] == last["recent_item_ids"][0].to_list()
    assert online.history_count[0] == last["history_count"][0]


def test_last_only_snapshots_are_each_users_last_full_snapshot(repo, small):
    """What evaluation reads (``last_only``, features.inputs.eval_inputs) is, row for row, each user's last
    snapshot of the full computation, including users with several interactions at their last second."""
    from features.compute import user_snapshots

    f = small.interactions.frame
    args = (repo.V, small.catalog.index, repo.cfg.features.recent_items, repo.cfg.embedder.history_half_life)
    full_h, full_s = user_snapshots(f, *args)
    last_h, last_s = user_snapshots(f, *args, last_only=True)
    assert len(full_h) > len(last_h) == f["user_id"].n_unique()
    for full, last in ((full_h, last_h), (full_s, last_s)):
        want = full.group_by("user_id", maintain_order=True).last().sort("user_id")
        assert want.equals(last.sort("user_id")), (want.head(3), last.head(3))


def _online_contents(repo) -> dict:
    """Everything the online store holds for this repository, as Feast stored it (created_ts left out):
    SQLite: (table, entity_key, feature) -> (value, value_text, event_ts); Redis: entity key -> hash."""
    online, config = repo.store._get_provider().online_store, repo.store.config
    out = {}
    if config.online_store.type.endswith("RedisOnlineStore"):
        client = online._get_client(config.online_store)
        suffix = config.project.encode()
        for k in client.scan_iter(match=b"*" + suffix):
            out[k[: -len(suffix)]] = client.hgetall(k)
    else:
        conn = online._get_conn(config)
        for view in (repo.views.item_embedding, repo.views.user_history, repo.views.item_stats, repo.views.user_stats):
            table = f"{config.project}_{view.name}"
            for ek, f, v, text, ts in conn.execute(f'SELECT entity_key, feature_name, value, value_text, event_ts FROM "{table}"'):
                out[(view.name, ek, f)] = (v, text, ts)
    return out


@pytest.mark.slow  # a whole stage end to end: `make test` runs it, `make test-fast` does not
def test_bulk_writes_store_exactly_what_feasts_own_materialize_stores(repo, small, tmp_path):
    """The bulk online stores write the same bytes, keys and timestamps as Feast's plain ``materialize``,
    so every Feast read path sees the same data."""
    from features.online import entity_key_bytes
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    ids = ["1", "42", "naïve-ü", ""]
    assert entity_key_bytes("item_id", ids) == [
        serialize_entity_key(EntityKey(join_keys=["item_id"], entity_values=[Value(string_val=i)]), 3) for i in ids]
    assert type(repo.store._get_provider().online_store).__name__.startswith("Bulk")
    end = datetime.now(timezone.utc)
    repo.materialize(end=end)
    ours = _online_contents(repo)
    # the same data through Feast's stock materialize, into a second repository of the same store kind
    stock = FeatureRepo(repo.cfg, "local", "test-v1", DIM, name="stock")
    stock.write_item_embeddings(small.catalog.ids, repo.V)
    stock.write_interaction_features(small.interactions.frame, small.catalog, repo.V)
    stock.apply()
    stock.store.materialize(start_date=datetime(1970, 1, 2, tzinfo=timezone.utc), end_date=end)
    theirs = _online_contents(stock)
    assert len(ours) > len(small.catalog) and ours.keys() == theirs.keys()
    # One deliberate difference: a missing timestamp (an item nobody has interacted with has no first-seen
    # time) is an empty Value here, read back as None; Feast's pandas path stores NaT as int64 min seconds.
    nat = Value(unix_timestamp_val=-(2**63)).SerializeToString()
    if isinstance(next(iter(theirs)), tuple):
        theirs = {k: ((b"" if v[0] == nat else v[0]),) + v[1:] for k, v in theirs.items()}
    else:
        theirs = {k: {f: (b"" if x == nat else x) for f, x in h.items()} for k, h in theirs.items()}
    assert sum(v[0] == b"" for v in ours.values() if isinstance(v, tuple)) < len(ours) // 10
    assert ours == theirs


def test_snapshots_in_chunks_equal_each_users_own_decayed_sums_bit_for_bit(small):
    """user_snapshot_chunks (vectorised across users, a chunk of whole users at a time) gives, for any chunk
    size, exactly the rows of the per-user computation: history_sums over each user's sequence alone."""
    from features.compute import history_sums, user_snapshot_chunks, user_snapshots

    V = vectors(len(small.catalog))
    f = small.interactions.frame.with_columns((pl.int_range(pl.len()) % 5).alias("seq"))
    whole_h, whole_s = user_snapshots(f, V, small.catalog.index, 20, 50.0)
    for chunk in (1, 97, 10**9):  # one user per chunk, several, all in one
        parts = list(user_snapshot_chunks(f, V, small.catalog.index, 20, 50.0, chunk_rows=chunk))
        want = {1: f["user_id"].n_unique(), 10**9: 1}.get(chunk)
        assert len(parts) == want if want else 1 < len(parts) < f["user_id"].n_unique()
        assert pl.concat([h for h, _ in parts]).equals(whole_h) and pl.concat([s for _, s in parts]).equals(whole_s)
    for user in f["user_id"].unique().sort().head(5).to_list():
        mine = f.filter(pl.col("user_id") == user).sort("timestamp", maintain_order=True)
        sums = history_sums(np.array([small.catalog.index[i] for i in mine["item_id"]]), V, 50.0)
        last = np.r_[mine["timestamp"].to_numpy()[1:] != mine["timestamp"].to_numpy()[:-1], True]
        want = sums[last] / np.linalg.norm(sums[last], axis=1, keepdims=True)
        got = np.array(whole_h.filter(pl.col("user_id") == user)["history_vector"].to_list(), np.float32)
        assert np.array_equal(got, want)
        ids = mine["item_id"].to_list()
        recent = whole_h.filter(pl.col("user_id") == user)["recent_item_ids"].to_list()
        assert recent == [ids[max(0, k - 19): k + 1][::-1] for k in np.flatnonzero(last)]


def test_training_rows_streamed_from_feast_equal_the_whole_join(repo, small, tmp_path):
    """TrainingRowsBuilder fills the rows from Feast's join a batch at a time, in whatever order DuckDB returns
    them, and with the join run per chunk of users: the result equals the rows built from the whole (ordered)
    join, and the int8 history stays within half a quantisation step of the float vectors. The positives' item
    statistics, read as of each label from the snapshots (not joined per chunk), equal the whole join's."""
    from features.inputs import (ItemStatsAsOf, TrainingRowsBuilder, _seconds, _vectors, item_stat_matrix, recent_matrix,
                                 user_stat_matrix)

    labels = small.interactions.frame.select("user_id", "item_id", "timestamp")
    whole = repo.training_set(labels)
    known = np.ones(len(small.catalog), bool)
    asof = ItemStatsAsOf(repo.item_stats_snapshots(), small.catalog)
    built = {}
    for int8 in (False, True):
        b = TrainingRowsBuilder(labels, small.catalog, DIM, 20, known, int8=int8, asof=asof)
        # the float rows from a join run per chunk of whole users (each reading its users' part of the files)
        batches = list(repo.training_batches(labels, rows=333, chunk_labels=10**9 if int8 else 700))
        assert len(batches) > 1 and sum(x.height for x in batches) == labels.height
        for batch in batches[::-1]:
            b.add(batch)
        built[int8] = b.done()
    rows = built[False]
    idx = np.arange(len(rows))
    assert np.array_equal(rows.history.take(idx), _vectors(whole["history_vector"], DIM))
    want, _ = recent_matrix(whole["recent_item_ids"].to_list(), small.catalog.index, 20, len(small.catalog))
    assert np.array_equal(rows.users(idx).recent_rows, want)
    assert np.array_equal(rows.item_rows, [small.catalog.index[i] for i in labels["item_id"]])
    assert np.array_equal(rows.user_stats, user_stat_matrix(
        whole["n_interactions"].fill_null(0).to_numpy(), whole["mean_value"].fill_null(0).to_numpy(),
        _seconds(whole["user_first_seen"]), _seconds(whole["timestamp"])))
    mods = whole.select("has_text", "has_image", "has_audio", "has_video").fill_null(0).to_numpy()
    joined = item_stat_matrix(whole["pop_all"].fill_null(0).to_numpy(), whole["pop_30d"].fill_null(0).to_numpy(),
                              _seconds(whole["item_first_seen"]), _seconds(whole["timestamp"]), mods)
    assert np.array_equal(rows.item_stats, joined) and joined[:, 0].std() > 0
    assert "pop_all" not in batches[0].columns  # the join read the user views only
    q = built[True].history
    assert q.values.dtype == np.int8
    err = np.abs(q.take(idx) - rows.history.take(idx))
    assert (err <= q.scale[:, None] / 2 + 1e-7).all() and err.max() > 0
    with pytest.raises(RuntimeError, match="no row for"):
        TrainingRowsBuilder(labels, small.catalog, DIM, 20, known, int8=False, asof=asof).done()


def test_a_point_in_time_job_gives_back_its_rows_and_its_database(repo, small):
    """Each join runs in a DuckDB database of its own, closed when the job is dropped, and its entity rows are
    unregistered once read (ibis keeps a registered frame until the process exits: about 0.5 GB after 8M labels)."""
    import gc

    import duckdb
    import ibis
    from ibis.expr import operations as ops

    labels = small.interactions.frame.select("user_id", "item_id", "timestamp").head(500)
    for read in ("whole", "streamed"):
        job = repo._training_job(labels)
        backend = job.table._find_backend()
        assert backend is not ibis.get_backend()
        got = job.to_df() if read == "whole" else [b for b in job.to_arrow_batches(100)]
        assert (len(got) if read == "whole" else sum(b.num_rows for b in got)) == labels.height
        entity = {op.name for op in job.table.op().find(ops.InMemoryTable)}
        views = {r[0] for r in backend.con.execute("SELECT view_name FROM duckdb_views() WHERE temporary").fetchall()}
        assert len(entity) == 1 and not backend._memtables and not entity & views
        assert job.to_df().shape[0] == labels.height  # read again: the rows are registered again
        del job
        gc.collect()
        with pytest.raises(duckdb.ConnectionException):
            backend.con.execute("SELECT 1")


def test_concurrent_point_in_time_joins_each_get_the_whole_answer(repo, small):
    """Joins from 8 threads at once (each in its own DuckDB database) return exactly what one join alone returns."""
    from concurrent.futures import ThreadPoolExecutor

    labels = small.interactions.frame.select("user_id", "item_id", "timestamp")
    parts = [labels.gather(list(range(i, labels.height, 4))) for i in range(4)]
    alone = [repo.training_set(p) for p in parts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(repo.training_set, parts * 4))
    for i, got in enumerate(together):
        assert got.equals(alone[i % 4])


def test_a_nightly_rewrite_streams_the_other_users_rows_through_unchanged(repo, small):
    """write_interaction_features(users=...) rebuilds those users and carries every other user's rows over from
    the file as they were (streamed a row group at a time, never read whole)."""
    path = repo._path(repo.views.user_history)
    before = pl.read_parquet(path)
    users = set(small.interactions.frame["user_id"].unique().sort().head(3).to_list())
    f = small.interactions.frame
    extra = f.filter(pl.col("user_id").is_in(list(users))).group_by("user_id").last().with_columns(
        pl.col("timestamp") + timedelta(days=30))
    counts = repo.write_interaction_features(pl.concat([f, extra.select(f.columns)]), small.catalog, repo.V, users=users)
    after = pl.read_parquet(path)
    others = ~pl.col("user_id").is_in(list(users))
    assert after.filter(others).equals(before.filter(others))
    assert after.filter(~others).height == before.filter(~others).height + len(users)
    assert counts["user_history"] == after.height and counts["users_refreshed"] == len(users)
    assert not list(path.parent.glob(f".{path.name}.*.tmp"))


def test_each_ddp_process_joins_and_holds_only_its_share_of_the_rows(repo, small):
    """training_rows(shard=(rank, world)), what a torchrun process builds, equals the full rows' share for that
    rank (TrainingRows.sharded, what a ddp_spawn child keeps); the shares partition the rows, and every share
    carries the positives' counts over all of them (the logQ correction is the same in every process)."""
    from training.train import training_rows
    from recsys.eval import make_split

    split = make_split("loo", small)
    repo.write_interaction_features(split.train, small.catalog, repo.V)
    full, _, _ = training_rows(repo, split, small.catalog, DIM, 20)
    shares = [training_rows(repo, split, small.catalog, DIM, 20, shard=(r, 3))[0] for r in range(3)]
    assert sum(len(s) for s in shares) == len(full) and all(s.total == len(full) for s in shares)
    for r, share in enumerate(shares):
        want = full.sharded(r, 3)
        for name in ("recent_rows", "user_stats", "item_rows", "item_stats", "item_known", "times", "item_counts"):
            assert np.array_equal(getattr(share, name), getattr(want, name)), name
        assert np.array_equal(share.history.values, want.history.values) and share.shard == want.shard == (r, 3)


def test_item_stats_as_of_are_strictly_before_each_time_to_the_microsecond():
    """ItemStatsAsOf searches one combined (item, time) key, which rounds to about 10 ms at 100k items over 30 years:
    a snapshot a millisecond before the time must still count, one at the time itself must not (Feast's join)."""
    from datetime import datetime, timedelta, timezone
    from types import SimpleNamespace

    from features.inputs import ItemStatsAsOf

    n = 100_000
    class Items(SimpleNamespace):  # what ItemStatsAsOf reads of a catalog: its index, modalities and length
        def __len__(self):
            return n

    catalog = Items(index={f"i{k}": k for k in range(n)}, modalities=np.zeros((n, 4), bool))
    t0 = datetime(1995, 1, 1, tzinfo=timezone.utc)
    last = n - 1
    snap_t = [t0 + timedelta(days=365 * 30), t0 + timedelta(days=365 * 30, seconds=86_400)]
    snaps = pl.DataFrame({"item_id": ["i0", f"i{last}", f"i{last}"], "event_timestamp": [t0] + snap_t,
                          "pop_all": [1, 5, 9], "pop_30d": [1, 5, 9], "item_first_seen": [t0, snap_t[0], snap_t[0]]},
                         schema_overrides={"event_timestamp": pl.Datetime("us", "UTC"), "item_first_seen": pl.Datetime("us", "UTC")})
    asof = ItemStatsAsOf(snaps, catalog)
    secs = np.array([s.timestamp() for s in snap_t])
    times = np.r_[secs[1] + 0.001, secs[1], secs[1] + 1e-6, secs[0] - 1e-6]
    got = np.expm1(asof.at(np.full(4, last), times)[:, 0] * 5).round()
    assert got.tolist() == [9, 5, 9, 0]
