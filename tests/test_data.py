"""Loaders: MovieLens (bundled), the generic format (bad rows reported, not fatal), the synthetic catalog."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl

from recsys.config import BUNDLED_MOVIELENS
from recsys.data import load_folder, load_movielens


def test_movielens_bundled(movielens):
    ds = movielens
    assert len(ds.catalog) == 9742
    assert len(ds.interactions) == 100836
    assert ds.interactions.n_users == 610
    assert ds.report.ok, ds.report.render()
    first = ds.catalog.content(ds.catalog.index["1"])
    assert first.parts[0].text == "Toy Story (1995) | Adventure, Animation, Children, Comedy, Fantasy"
    # tags are user-derived: present for a warm item, dropped for a brand-new one
    assert first.parts[-1].source == "user" and "pixar" in first.parts[-1].text
    assert all(p.source == "content" for p in ds.catalog.content(0, cold=True).parts)
    assert ds.interactions.frame["timestamp"].dtype == pl.Datetime("us", "UTC")


def test_movielens_posters_attach_as_image_parts(posters):
    ds = load_movielens(posters=posters)
    assert ds.report.loaded["posters"] == 2947
    assert ds.catalog.modalities[:, 1].sum() == 2947
    toy = ds.catalog.content(ds.catalog.index["1"])
    assert toy.kinds == ("text", "image", "text")


def test_movielens_bad_rows_are_reported_not_fatal(tmp_path):
    root = tmp_path / "ml"
    shutil.copytree(BUNDLED_MOVIELENS, root)
    for f in root.iterdir():
        f.chmod(0o644)
    with open(root / "ratings.csv", "a") as f:
        f.write("1,999999999,4.0,964982703\n")  # unknown movie
        f.write("1,1,4.0,not-a-time\n")  # unparseable timestamp
    with open(root / "movies.csv", "a") as f:
        f.write("abc,Broken id (2000),Drama\n")
    ds = load_movielens(root)
    assert ds.report.count("ratings of unknown movies (skipped)") == 1
    assert ds.report.count("ratings with an unparseable timestamp (skipped)") == 1
    assert ds.report.count("movies with a bad id or no title (skipped)") == 1
    assert "999999999" in ds.report.render()
    assert len(ds.interactions) == 100836  # everything good still loaded


def write_generic(folder, items, interactions):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "media").mkdir(exist_ok=True)
    (folder / "items.jsonl").write_text("\n".join(json.dumps(i) if isinstance(i, dict) else i for i in items) + "\n")
    pl.DataFrame(interactions, schema=["user_id", "item_id", "timestamp"], orient="row").write_csv(folder / "interactions.csv")


def test_generic_format_reports_every_kind_of_bad_row(tmp_path):
    from PIL import Image

    folder = tmp_path / "shop"
    write_generic(folder, [
        {"item_id": "a", "title": "Red bike", "parts": [{"text": "a red bike"}, {"image": "a.png"}, {"text": "fast", "source": "user"}]},
        {"item_id": "b", "parts": [{"text": "blue kettle"}, {"image": "missing.png"}]},  # media missing: part dropped
        {"item_id": "c", "parts": [{"image": "gone.png"}]},  # nothing left: item skipped
        {"item_id": "a", "parts": [{"text": "duplicate"}]},
        "this is not json",
    ], [("u1", "a", "1700000000"), ("u1", "b", "2024-01-02T03:04:05Z"), ("u2", "zzz", "1700000000"),
        ("u2", "a", "yesterday-ish")])
    Image.new("RGB", (8, 8), "red").save(folder / "media" / "a.png")
    ds = load_folder(folder)
    r = ds.report
    assert ds.catalog.ids == ["a", "b"]
    assert ds.catalog.content(0).kinds == ("text", "image", "text")
    assert ds.catalog.content(1).kinds == ("text",)
    assert r.count("missing media files (part dropped)") == 2
    assert r.count("items with no usable part (skipped)") == 1
    assert r.count("duplicate item ids (later rows skipped)") == 1
    assert r.count("item lines that are not JSON objects (skipped)") == 1
    assert r.count("interactions with unknown item ids (skipped)") == 1
    assert r.count("interactions with an unparseable timestamp (skipped)") == 1
    assert "zzz" in r.render() and "yesterday-ish" in r.render()
    assert len(ds.interactions) == 2
    assert ds.interactions.frame["timestamp"].dt.year().to_list() == [2023, 2024]


def test_generic_timestamps_in_any_epoch_unit_or_iso_land_in_a_plausible_year(tmp_path):
    folder = tmp_path / "times"
    write_generic(folder, [{"item_id": "a", "parts": [{"text": "a"}]}], [
        ("s", "a", "1700000000"), ("ms", "a", "1700000000123"), ("us", "a", "1700000000123456"),
        ("ns", "a", "1700000000123456789"), ("iso", "a", "2023-11-14T22:13:20Z"),
        ("future", "a", "2999-01-01T00:00:00Z"), ("zero", "a", "0")])
    ds = load_folder(folder)
    f = ds.interactions.frame.sort("user_id")
    assert f["user_id"].to_list() == ["iso", "ms", "ns", "s", "us"]
    assert set(f["timestamp"].dt.year().to_list()) == {2023}
    r = ds.report
    assert r.count("epoch timestamps read as milliseconds (from their size)") == 1
    assert r.count("epoch timestamps read as microseconds (from their size)") == 1
    assert r.count("interactions dated before 1970 or in the future (skipped)") == 2
    assert "2999-01-01" in r.render()


def test_generic_csv_columns(tmp_path):
    folder = tmp_path / "csv"
    folder.mkdir()
    pl.DataFrame({"item_id": ["x", "y"], "title": ["X", "Y"], "text": ["first", "second"], "brand": ["p", "q"]}).write_csv(
        folder / "items.csv")
    pl.DataFrame({"user_id": ["u"], "item_id": ["x"], "timestamp": [1700000000], "value": [3.5]}).write_csv(
        folder / "interactions.csv")
    ds = load_folder(folder)
    assert ds.catalog.items["brand"].to_list() == ["p", "q"]
    assert ds.interactions.frame["value"].to_list() == [3.5]


def test_synthetic_catalog_has_every_modality_and_clusters_drive_users(synthetic):
    m = synthetic.catalog.modalities
    assert m.all(axis=0).sum() == 0 and m.any(axis=0).all()  # every modality present, not every item has all
    kinds = [synthetic.catalog.content(i).kinds for i in range(len(synthetic.catalog))]
    assert any(k == ("text", "image", "text") for k in kinds)  # interleaved
    assert any(k == ("image",) for k in kinds)  # media only
    clusters = dict(zip(synthetic.catalog.ids, synthetic.catalog.items["cluster"].to_list()))
    f = synthetic.interactions.frame.with_columns(pl.col("item_id").replace_strict(clusters).alias("c"))
    top_share = f.group_by("user_id").agg((pl.col("c").mode().first() == pl.col("c")).mean().alias("s"))["s"].mean()
    n_clusters = len(set(clusters.values()))
    assert top_share > 2.0 / n_clusters  # users concentrate on their clusters, far above uniform


def test_data_check_says_which_protocols_a_sparse_dataset_can_form(tmp_path):
    """Almost every customer with one purchase: LOO cannot be formed."""
    from typer.testing import CliRunner

    from recsys.cli import app

    folder = tmp_path / "sparse"
    items = [{"item_id": f"p{i}", "title": f"product {i}", "parts": [{"text": f"product number {i}"}]} for i in range(30)]
    rows = [(f"c{u}", f"p{u % 30}", str(1_700_000_000 + 3600 * u)) for u in range(60)]  # one purchase each
    rows += [("c0", "p1", "1700100000"), ("c0", "p2", "1700200000")]  # one customer with three
    write_generic(folder, items, rows)
    res = CliRunner().invoke(app, ["data", "check", "--source", "generic", "--data", str(folder),
                                   "--workdir", str(tmp_path / "w")])
    assert res.exit_code == 2, res.output
    assert "LOO needs users with 3+ interactions; 1 have them" in res.output
    assert "interactions per user" in res.output and "min 1, median 1" in res.output
    # `recsys demo` on it: tests/test_tutorial.py (content only: nothing trained, the catalog still served)


def test_cold_pool_is_configured_explicitly_and_reported(synthetic):
    from recsys.config import EvalConfig
    from recsys.data.check import check_protocol
    from recsys.eval.splits import cold_pool

    mods = synthetic.catalog.modalities
    assert cold_pool(synthetic, "all").size == len(synthetic.catalog)
    audio = cold_pool(synthetic, "audio")
    assert audio.size == mods[:, 2].sum() and mods[audio, 2].all()
    check = check_protocol(synthetic, "cold", EvalConfig(cold_pool="audio"), min_users=1)
    assert check.ok and f"of {audio.size:,} eligible (eval.cold_pool = audio: items with an audio part)" in check.note


def test_a_corrupt_media_part_is_dropped_at_load_and_the_item_keeps_its_other_parts(tmp_path):
    import io

    import soundfile as sf
    from PIL import Image

    folder = tmp_path / "media-check"
    write_generic(folder, [
        {"item_id": "ok", "parts": [{"text": "fine"}, {"image": "ok.jpg"}, {"audio": "ok.wav"}]},
        {"item_id": "cut", "parts": [{"text": "still has its text"}, {"image": "cut.jpg"}]},
        {"item_id": "noise", "parts": [{"text": "text"}, {"audio": "noise.wav"}]},
    ], [("u", "ok", "1700000000"), ("u", "cut", "1700000100")])
    b = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(b, format="JPEG")
    (folder / "media" / "ok.jpg").write_bytes(b.getvalue())
    (folder / "media" / "cut.jpg").write_bytes(b.getvalue()[: len(b.getvalue()) // 2])  # truncated
    sf.write(folder / "media" / "ok.wav", np.zeros(1600, np.float32), 16000)
    (folder / "media" / "noise.wav").write_bytes(b"RIFF not really a wave file")
    ds = load_folder(folder)
    assert ds.catalog.ids == ["ok", "cut", "noise"]
    assert ds.catalog.content(0).kinds == ("text", "image", "audio")
    assert ds.catalog.content(1).kinds == ("text",) and ds.catalog.content(2).kinds == ("text",)
    assert ds.report.count("media parts that do not decode (part dropped)") == 2
    text = ds.report.render()
    assert "cut.jpg" in text and "truncated" in text.lower() and "noise.wav" in text
    unchecked = load_folder(folder, check_media=False)  # the option to skip: the parts stay (embedding will fail them)
    assert unchecked.catalog.content(1).kinds == ("text", "image")


def test_user_tags_are_limited_to_each_protocols_training_window(movielens):
    from datetime import timedelta

    from recsys.eval import make_split

    assert movielens.tags is not None and movielens.tags.height > 3000
    split = make_split("temporal", movielens)
    end = split.train["timestamp"].max() + timedelta(seconds=1)
    restricted, changed, dropped = movielens.with_tags_before({}, end)
    late = movielens.tags.filter(movielens.tags["timestamp"] >= end)
    assert dropped == late.height > 1000  # about a third of the tags come after the TEMPORAL validation cut
    assert changed and len(restricted.catalog) == len(movielens.catalog)
    # an item tagged only after the cut loses its tag part; one tagged before keeps its tags
    only_late = set(late["item_id"].to_list()) - set(movielens.tags.filter(movielens.tags["timestamp"] < end)["item_id"].to_list())
    row = movielens.catalog.index[sorted(only_late)[0]]
    assert any(p.source == "user" for p in movielens.catalog.content(row).parts)
    assert not any(p.source == "user" for p in restricted.catalog.content(row).parts)
    assert row in changed
    # LOO: a user's own tags after the time they are asked at validation are left out
    loo = make_split("loo", movielens)
    limit = dict(zip(loo.val.users, loo.val.at))
    _, _, dropped_loo = movielens.with_tags_before(limit, loo.train["timestamp"].max() + timedelta(seconds=1))
    expected = sum(1 for u, t in movielens.tags.select("user_id", "timestamp").iter_rows() if u in limit and t >= limit[u])
    assert dropped_loo == expected > 0


def test_scale_generator_has_the_shape_of_real_logs_and_loads_through_the_generic_loader(tmp_path):
    """recsys.data.scale: exactly the asked number of interactions, >= 3 per user, a power-law head, users who
    stay in their clusters, sessions (minutes apart within, days between), unit item vectors that carry the
    clusters; and its files load through the generic loader as a team's own would."""
    from recsys.data.scale import ScaleSpec, generate

    spec = ScaleSpec(n_interactions=30_000, n_items=5_000, n_clusters=10)
    ds, vectors = generate(spec)
    f = ds.interactions.frame
    assert f.height == 30_000 and f["user_id"].n_unique() == spec.n_users
    assert f.group_by("user_id").len()["len"].min() >= 3
    counts = np.sort(f.group_by("item_id").len()["len"].to_numpy())[::-1]
    assert counts[: len(counts) // 100].sum() > 0.1 * f.height  # the top 1% of items take over 10% of interactions
    cluster = dict(zip(ds.catalog.ids, ds.catalog.items["cluster"].to_list()))
    top = (f.with_columns(pl.col("item_id").replace_strict(cluster).alias("c")).group_by("user_id", "c").len()
           .group_by("user_id").agg((pl.col("len").max() / pl.col("len").sum()).alias("share")))
    assert top["share"].mean() > 0.4  # 10 clusters: a user picking at random would have about 0.1-0.2
    gaps = f.with_columns(pl.col("timestamp").diff().over("user_id").dt.total_seconds().alias("gap"))["gap"].drop_nulls()
    assert (gaps < 3600).mean() > 0.4 and (gaps > 86400).mean() > 0.2
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    c = ds.catalog.items["cluster"].to_numpy()
    same = (vectors[c == 0] @ vectors[c == 0].T).mean()
    assert same > (vectors[c == 0] @ vectors[c == 1].T).mean() + 0.3
    f.write_parquet(tmp_path / "interactions.parquet")
    ds.catalog.items.drop("parts").with_columns(pl.col("title").alias("text")).write_parquet(tmp_path / "items.parquet")
    loaded = load_folder(tmp_path, check_media=False)
    assert len(loaded.interactions) == 30_000 and len(loaded.catalog) == 5_000 and loaded.report.ok
