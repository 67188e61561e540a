"""The local embedder: real media decoding, one space for every modality, limits, tasks, Matryoshka, cache."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from recsys.content import Content, ContentError, Part
from recsys.embed import EmbeddingError, Limits, apply_task
from recsys.media import decode_audio, decode_image, decode_video


def test_decoders_on_real_media(posters, fsdd, microlens):
    img = decode_image((posters / "1.jpg").read_bytes())
    assert img.size == (185, 278) and img.mode == "RGB"
    import soundfile as sf

    wav = fsdd / "0_george_0.wav"
    wave = decode_audio(wav.read_bytes())  # 8 kHz -> 16 kHz
    assert sf.info(str(wav)).samplerate == 8000
    assert wave.dtype == np.float32 and wave.size == 2 * sf.info(str(wav)).frames
    clip = decode_video((microlens / "videos" / "1002.mp4").read_bytes())
    assert 15 <= len(clip.frames) <= 17  # ~1 fps over 16.4 s
    assert clip.audio is not None and abs(clip.audio.size / 16000 - clip.duration_s) < 0.5


def test_featurizer_segments_per_modality(embedder, posters, fsdd):
    """An image gives its 5 EfficientNet tokens and its style statistics from one forward pass; the style
    vector is the per-stage channel mean and std, so a flat grey picture has (almost) zero std parts."""
    from recsys.embed.backbones import STYLE_DIM

    grey = io.BytesIO()
    Image.new("RGB", (200, 300), (128, 128, 128)).save(grey, format="PNG")
    contents = [Content.of("Toy Story (1995)", Part.of_file("image", posters / "1.jpg")),
                Content((Part("image", data=grey.getvalue(), mime_type="image/png"),)),
                Content((Part.of_file("audio", fsdd / "0_george_0.wav"),))]
    segs = [f.segments for f in embedder.featurizer.featurize(contents)]
    assert [(n, x.shape) for n, x in segs[0]] == [("text", segs[0][0][1].shape), ("image", (5, 1280)), ("image_style", (1, STYLE_DIM))]
    assert [n for n, _ in segs[2]] == ["audio"] and segs[2][0][1].shape[0] == 64
    poster_style, grey_style = segs[0][2][1][0], segs[1][1][1][0]
    # the first stage (16 channels): means then stds; the grey image is flat, except at its borders
    assert np.abs(grey_style[16:32]).mean() < 0.2 * np.abs(poster_style[16:32]).mean()


def test_corrupt_media_raise_a_clear_error():
    with pytest.raises(ContentError, match="cannot decode image"):
        decode_image(b"not an image")
    with pytest.raises(ContentError, match="cannot decode video"):
        decode_video(b"not a video")


def test_task_prefixes_follow_gemini_embedding_2():
    c = Content.of("red running shoes", Part("image", data=b"x", mime_type="image/png"))
    q = apply_task(c, "query")
    assert q.parts[0].text == "task: search result | query: red running shoes"
    assert apply_task(c, "document").parts[0].text.startswith("title: none | text: ")
    image_only = apply_task(Content((Part("image", data=b"x", mime_type="image/png"),)), "query")
    assert image_only.kinds == ("text", "image")
    with pytest.raises(ContentError):
        apply_task(c, "nonsense")


def test_limits_name_the_item(tmp_path, microlens):
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    many = Content(tuple(Part("image", data=png.getvalue(), mime_type="image/png") for _ in range(7)), item_id="sku-7")
    with pytest.raises(ContentError, match="sku-7.*7 images"):
        Limits().check(many)
    long_video = Part.of_file("video", microlens / "videos" / "10040.mp4")  # 28.9 s with sound
    with pytest.raises(ContentError, match="over the 20 s limit"):
        Limits(max_video_with_audio_s=20).check(Content((long_video,), item_id="v"))
    with pytest.raises(ContentError, match="MIME type"):
        Limits(image_mimes=frozenset({"image/png"})).check(
            Content((Part("image", data=b"x", mime_type="image/webp"),), item_id="w"))


def test_one_space_every_modality_and_interleaving(embedder, synthetic):
    contents = synthetic.catalog.contents()
    result = embedder.embed_many(contents, dim=128)
    assert not result.errors, result.errors[:3]
    v = result.vectors
    assert v.shape == (len(contents), 128) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    # items of the same latent cluster sit closer than items of different clusters, across layouts
    clusters = synthetic.catalog.items["cluster"].to_numpy()
    sims = v @ v.T
    same = clusters[:, None] == clusters[None, :]
    np.fill_diagonal(same, False)
    other = ~same
    np.fill_diagonal(other, False)
    assert sims[same].mean() > sims[other].mean() + 0.05


def test_matryoshka_prefixes_and_cache(embedder, synthetic):
    c = synthetic.catalog.contents()[:8]
    full = embedder.embed(c, dim=768)
    short = embedder.embed(c, dim=64)
    prefix = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    assert np.allclose(short, prefix, atol=1e-4)
    again = embedder.embed_many(c, dim=64)
    assert again.cache_hits == len(c)
    assert np.allclose(again.vectors, short, atol=1e-3)  # float32 round-trip through SQLite
    with pytest.raises(ValueError, match="dim"):
        embedder.embed(c, dim=4096)


def test_matryoshka_sweep_reports_every_prefix_of_one_embedding(embedder, synthetic):
    from recsys.eval.embedder_report import matryoshka_sweep
    from recsys.embed.tasks import PairTask

    items = [c for c in synthetic.catalog.contents() if c.text() and any(p.kind == "image" for p in c.parts)][:40]
    task = PairTask("image-caption", [Content(tuple(p for p in c.parts if p.kind == "image")) for c in items],
                    [Content.of(c.text()) for c in items], np.arange(len(items)))
    sweep = matryoshka_sweep(embedder, task)
    assert list(sweep) == list(embedder.dims)
    from recsys.eval.embedder import retrieval_recall
    at64 = retrieval_recall(embedder.embed(task.b, task="query", dim=64), embedder.embed(task.a, task="document", dim=64))
    assert sweep[64]["text->poster R@10"] == pytest.approx(at64[10])  # a prefix = the embedding at that dim
    assert all(0 <= v <= 1 for d in sweep.values() for v in d.values())


def test_a_corrupt_part_fails_its_item_not_the_batch(embedder, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    contents = [Content.of("a cosy cabin in a pine forest", item_id="good-1"),
                Content.of("broken poster", Part.of_file("image", bad), item_id="broken"),
                Content.of("snowy mountain ski trip", Part.of_file("image", tmp_path / "nope.png"), item_id="missing"),
                Content.of("jazz saxophone night", item_id="good-2")]
    result = embedder.embed_many(contents)
    assert [e.item_id for e in result.errors] == ["broken", "missing"]
    assert "cannot decode image" in result.errors[0].message and "No such file" in result.errors[1].message
    assert result.ok.tolist() == [True, False, False, True]
    with pytest.raises(EmbeddingError, match="2 item\\(s\\) failed.*broken"):
        embedder.embed(contents)


def test_real_clips_embed_offline(embedder, microlens, fsdd):
    contents = [Content.of("a street interview", Part.of_file("video", microlens / "videos" / "10034.mp4"), item_id="v"),
                Content((Part.of_file("audio", fsdd / "3_theo_1.wav"),), item_id="a")]
    v = embedder.embed(contents, dim=256)
    assert v.shape == (2, 256) and np.isfinite(v).all()


@pytest.mark.slow  # a whole stage end to end: `make test` runs it, `make test-fast` does not
def test_recsys_embed_cli_mixed_catalog_and_query(synthetic_dir, synthetic, tmp_path):
    """`recsys embed` on a catalog mixing text, image, audio, video and interleaved items, offline; then an
    ad-hoc text query finds items of the theme it names."""
    import polars as pl
    from typer.testing import CliRunner

    from recsys.cli import app
    from recsys.data.synthetic import THEMES

    kinds = {k for c in synthetic.catalog.contents() for k in c.kinds}
    assert kinds == {"text", "image", "audio", "video"}
    assert any(len(c.parts) >= 3 for c in synthetic.catalog.contents())  # text, image, text: interleaved
    common = ["--source", "generic", "--data", str(synthetic_dir), "--workdir", str(tmp_path), "--dim", "128"]
    result = CliRunner().invoke(app, ["embed", *common])
    assert result.exit_code == 0, result.output
    frame = pl.read_parquet(tmp_path / "embeddings" / "items.parquet")
    assert frame.height == len(synthetic.catalog) and len(frame["vector"][0]) == 128
    by_id = dict(zip(synthetic.catalog.ids, synthetic.catalog.items["cluster"].to_list()))
    precision = []
    for cluster in sorted(set(by_id.values())):
        result = CliRunner().invoke(app, ["embed", *common, "--query", " ".join(THEMES[cluster][:4]), "--top", "10"])
        assert result.exit_code == 0, result.output
        shown = re.findall(r"-?\d\.\d{3}\s+(s\d{5})\b", result.output)  # "score  item_id  title" rows
        assert len(shown) == 10, result.output
        precision.append(np.mean([by_id[i] == cluster for i in shown]))
    # chance is about 1 / n_clusters (0.17); image-only items (no text) drift up for some queries
    assert np.mean(precision) >= 0.6, precision


def test_stage3_candidates_interpolate_between_stage1_and_the_soup():
    from training.embedder import stage3_candidates

    s1, s2, soup_state = ({"w": torch.full((2, 2), v), "n": torch.tensor(v)} for v in (0.0, 5.0, 4.0))
    cands = stage3_candidates(s1, s2, soup_state, (0.25, 0.75))
    assert list(cands)[0] == "soup" and list(cands)[-1] == "stage-1 best checkpoint"  # preference on ties
    assert torch.equal(cands["stage-1 best + 0.25 x (soup - stage-1 best)"]["w"], torch.full((2, 2), 1.0))
    assert float(cands["stage-1 best + 0.75 x (soup - stage-1 best)"]["n"]) == 3.0
    assert cands["stage-2 best checkpoint"] is s2


def test_task_mix_gives_a_named_task_its_share_and_keeps_the_others_proportions():
    from training.embedder import TaskBatches, task_mix
    from recsys.embed.tasks import PairTask

    def task(name, n, w):
        return PairTask(name, [None] * n, [None] * n, np.arange(n), weight=w)

    tasks = [task("poster", 400, 1.0), task("digit", 100, 1.0), task("coengagement", 10000, 2.0)]
    p = task_mix(tasks)
    assert p[2] > 0.8 and np.isclose(p.sum(), 1.0)  # by weight x sqrt(size), co-engagement dominates
    p = task_mix(tasks, {"coengagement": 0.5})
    assert np.isclose(p[2], 0.5) and np.isclose(p[0] / p[1], 2.0) and np.isclose(p.sum(), 1.0)
    assert np.allclose(task_mix(tasks, {"coengagement": None}), task_mix(tasks))  # None: the default mix
    assert np.allclose(task_mix(tasks[:2], {"coengagement": 0.5}), task_mix(tasks[:2]))  # absent task: ignored
    with pytest.raises(ValueError, match="shares"):
        task_mix(tasks, {"coengagement": 1.5})
    # the stream draws by that mix
    for t in tasks:
        t.feats = {"a": ([[("text", np.zeros((1, 4)))]] * len(t),) * 2, "b": ([[("text", np.zeros((1, 4)))]] * len(t),) * 2}
    stream = iter(TaskBatches(tasks, batch_size=4, prefix_keep=0.5, seed=0, shares={"coengagement": 0.5}))
    drawn = [next(stream)["task"] for _ in range(400)]
    assert 0.4 < drawn.count("coengagement") / 400 < 0.6


def test_fusion_optimizer_gives_the_audio_encoder_its_own_rate_and_never_decays_the_temperature():
    from recsys.embed.fusion import FusionConfig
    from training.embedder import EmbedderTrainConfig, FusionModule

    cfg = EmbedderTrainConfig(lr=3e-4, weight_decay=0.5, audio_lr=1e-3, audio_weight_decay=0.1)
    module = FusionModule(FusionConfig(), cfg, total_steps=10)
    groups = module.configure_optimizers()[0][0].param_groups
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in module.parameters())  # every parameter, once
    audio = {id(p) for p in module.model.audio.parameters()}
    by_rate = {(g["lr"], g["weight_decay"]): {id(p) for p in g["params"]} for g in groups}
    assert by_rate[(1e-3, 0.1)] == audio
    assert by_rate[(3e-4, 0.0)] == {id(module.log_inv_temp)}
    assert not by_rate[(3e-4, 0.5)] & audio


@pytest.mark.slow  # a whole stage end to end: `make test` runs it, `make test-fast` does not
def test_train_embedder_three_stages_saves_loadable_weights_and_logs_to_mlflow(synthetic_dir, synthetic, tmp_path):
    """A few steps of the real 3-stage recipe on the synthetic media/caption pairs: weights + manifest saved,
    the run and its held-out metrics in MLflow, image style statistics set from the training images, and
    the weights load into the `local` backend and embed every modality."""
    import mlflow

    from recsys.config import Config
    from recsys.embed.local import LocalEmbedder
    from training.embedder import EmbedderTrainConfig, train_embedder
    from recsys.embed.tasks import build

    cfg = Config.load(None, workdir=str(tmp_path))
    data = build(None, cfg.eval, None, synthetic_dir)
    assert data.sources["posters"] == "absent" and data.sources["fsdd"] == "absent"
    tcfg = EmbedderTrainConfig(stage1_steps=6, stage2_steps=4, batch_size=16, val_every=3, soup_last=2,
                               correction_steps=3, correction_batch=16)
    folder, test = train_embedder(data, tmp_path / "weights", cfg.tracking_uri, tcfg, cache_dir=tmp_path / "cache")

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["version"].startswith("fusion-") and manifest["featurizer"] == "feat-v2"
    assert manifest["dims"] == [64, 128, 256, 512, 768]
    assert manifest["stages"]["1"]["steps"] == 6
    stage3 = manifest["stages"]["3"]  # every candidate validated; the kept one is the best of them
    assert len(stage3["val_scores"]) == 2 + len(tcfg.interpolate) + 1
    assert stage3["val_scores"][stage3["kept"]] == max(stage3["val_scores"].values())
    stage4 = manifest["stages"]["4"]  # the correction after them, its step chosen the same way
    assert sorted(stage4["val_scores"]) == ["0", "3"] and stage4["val_scores"][str(stage4["kept_step"])] == max(stage4["val_scores"].values())
    assert 0 <= test["synthetic-caption/caption->media R@10"] <= 1 and test["synthetic-caption/chance R@10"] > 0

    run = mlflow.MlflowClient(cfg.tracking_uri).get_run(manifest["mlflow_run_id"])
    assert "test/synthetic-caption/caption to media R at 10" in run.data.metrics
    assert run.data.params["stage1_steps"] == "6" and run.data.params["fusion.image_anchor_hidden"] == "512"

    local = LocalEmbedder(weights=folder, cache_dir=tmp_path / "cache")
    assert local.model_version == manifest["version"]
    assert not torch.allclose(local.model.style_std, torch.ones_like(local.model.style_std))  # set from the images
    result = local.embed_many(synthetic.catalog.contents()[:24], dim=64)
    assert not result.errors and np.isfinite(result.vectors).all()


def test_hard_negatives_exclude_the_pairs_own_items_by_id_not_only_by_group():
    from training.embedder import pick_hard_negatives
    from recsys.embed.tasks import PairTask

    # co-engagement pairs (anchor, partner): groups are the anchor; item "x" is pair 0's anchor and pair 1's
    # partner, item "y" pair 0's partner and pair 2's partner
    a = [Content.of("x", item_id="x"), Content.of("z", item_id="z"), Content.of("w", item_id="w"), Content.of("v", item_id="v")]
    b = [Content.of("y", item_id="y"), Content.of("x", item_id="x"), Content.of("y", item_id="y"), Content.of("u", item_id="u")]
    task = PairTask("coengagement", a, b, np.array([0, 1, 2, 3]))
    nearest = np.array([[1, 2, 3, 0], [0, 1, 3, 2], [0, 2, 3, 1], [3, 2, 1, 0]])  # pair 0's nearest b: "x" then "y"
    hard = pick_hard_negatives(nearest, task, top=1, rng=np.random.default_rng(0))
    assert hard[0] == 3  # neither "x" (its own anchor, another group) nor "y" (its positive) but "u"
    assert hard[1] == 0 and hard[2] == 3  # pair 2 ("w"->"y") skips b[0] = "y" too
    assert all(b[h].item_id not in {a[i].item_id, b[i].item_id} for i, h in enumerate(hard))


def test_modality_centres_remove_each_signatures_offset_and_fall_back_by_parts():
    from recsys.embed.local import ModalityCentres, signature

    rng = np.random.default_rng(0)
    base = rng.normal(size=(200, 16)).astype(np.float32)
    offsets = {"document:image+text": 5.0, "query:image": -5.0}
    sigs = ["document:image+text"] * 100 + ["query:image"] * 100
    raw = base + np.array([offsets[s] for s in sigs], np.float32)[:, None] * np.eye(16, dtype=np.float32)[0]
    c = ModalityCentres.fit(raw, sigs)
    out = c.apply(raw, sigs, 8)
    assert out.shape == (200, 8) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    # the offset dominated the first coordinate; centred, the two signatures no longer sit apart
    assert abs(out[:100, 0].mean() - out[100:, 0].mean()) < 0.1 < abs(raw[:100, 0].mean() - raw[100:, 0].mean())
    # fallbacks: the same parts under another task, else the same task with the most parts in common, else none
    assert c.centre("document:image") is c.centres["query:image"]
    assert c.centre("query:image+text") is c.centres["document:image+text"]
    assert c.centre("document:audio+text") is c.centres["document:image+text"]
    assert c.centre("query:audio") is None
    assert signature(Content.of("a title", item_id="x"), "query") == "query:text"


def test_modality_centres_learned_maps_apply_after_the_centre_fall_back_by_parts_and_survive_save_and_load(tmp_path):
    """Stage 4's maps: x - c, then x + (x V) U^T, per signature (the same task's nearest signature's map, never
    another task's: a document never borrows a query's); a signature with no map is only centred; the centres
    file round-trips centres and maps alike."""
    from recsys.embed.local import ModalityCentres

    rng = np.random.default_rng(0)
    raw = rng.normal(size=(8, 16)).astype(np.float32)
    c = {"query:text": rng.normal(size=16).astype(np.float32), "document:image+text": rng.normal(size=16).astype(np.float32)}
    v, u = rng.normal(size=(16, 3)).astype(np.float32), rng.normal(size=(16, 3)).astype(np.float32)
    mc = ModalityCentres(c).with_maps({"query:text": (v, u)})
    sigs = ["query:text", "document:text", "document:image+text", "query:image+text"] * 2
    # document:text takes query:text's centre (the same parts), query:image+text document:image+text's
    x = raw - np.stack([c["query:text"], c["query:text"], c["document:image+text"], c["document:image+text"]] * 2)
    want = x.copy()
    want[[0, 3, 4, 7]] += (x[[0, 3, 4, 7]] @ v) @ u.T  # queries only: query:image+text borrows query:text's map
    assert np.allclose(mc.correct(raw, sigs), want, atol=1e-5)
    assert mc.map("document:image+text") is None and mc.map("document:text") is None
    assert mc.map("query:image+text") is mc.maps["query:text"]
    mc.save(tmp_path / "c.npz")
    back = ModalityCentres.load(tmp_path / "c.npz")
    assert sorted(back.centres) == sorted(c) and sorted(back.maps) == ["query:text"]
    assert np.allclose(back.apply(raw, sigs, 8), mc.apply(raw, sigs, 8))


def test_one_part_queries_are_ranked_against_the_pool_with_their_own_items_documents_masked():
    """Stage 4's part->item loss: a pool document of the query's own item (the same item under another
    signature, or with its tags) is never a negative; any other item's is."""
    import torch

    from training.embedder_correction import _query_vs_pool

    torch.manual_seed(0)
    a, b, z = torch.randn(1, 8), torch.randn(1, 8), torch.randn(1, 8)  # query x, its item's document, item z's
    own = torch.tensor([0])  # item codes: x 0, y 1, z 2

    def loss(pool, items):
        return _query_vs_pool(a, b, own, pool, torch.tensor(items), (4, 8), 0.05)

    z_only = loss(z, [2])
    # the query's own vector in the pool as its own item's document (the item with tags, say): masked
    assert torch.allclose(loss(torch.cat([z, a, 2 * a]), [2, 0, 0]), z_only)
    # the same rows as another item's documents: the hardest negatives there are
    assert loss(torch.cat([z, a, 2 * a]), [2, 1, 1]) > z_only + 1


@pytest.mark.slow  # a whole stage end to end: `make test` runs it, `make test-fast` does not
def test_stage4_on_trained_weights_keeps_the_best_validated_step_and_saves_a_new_version(synthetic, tmp_path):
    """``correct_weights`` on the shipped weights with a part-item task from the synthetic catalog: every
    validated step recorded, the kept one the best (step 0, centres alone, when nothing beats it), a new
    version saved whose vectors are the kept correction's, and held-out part->item search ranked over the
    distractors (its chance level counts them)."""
    import json

    from recsys.config import Config
    from recsys.embed.local import DEFAULT_WEIGHTS, LocalEmbedder, ModalityCentres, load_fusion, signature
    from training.embedder import EmbedderTrainConfig, correct_weights
    from recsys.embed.tasks import EmbedderData, part_item_task

    rows = [r for r in range(len(synthetic.catalog)) if "image" in synthetic.catalog.content(r).kinds]
    train, val, test = rows[:24], rows[24:30], rows[30:36]
    data = EmbedderData(stage2=[part_item_task(synthetic, train)])
    for part, own in (("val", val), ("test", test)):
        t = part_item_task(synthetic, own, f"part-item/{part}", seed=None)
        t.distractors = [synthetic.catalog.content(r, cold=True) for r in range(len(synthetic.catalog)) if r not in own][:40]
        getattr(data, part)["part-item"] = t
    cfg = Config.load(None, workdir=str(tmp_path))
    tcfg = EmbedderTrainConfig(correction_rank=4, correction_steps=6, val_every=3, correction_batch=16,
                               correction_pairs=20)  # fewer than the task holds: a subset of its pairs
    folder, test_metrics = correct_weights(DEFAULT_WEIGHTS, data, tmp_path / "w", cfg.tracking_uri, tcfg, tmp_path / "cache")

    manifest = json.loads((folder / "manifest.json").read_text())
    stage4 = manifest["stages"]["4"]
    assert sorted(int(k) for k in stage4["val_scores"]) == [0, 3, 6]
    best = max(stage4["val_scores"].values())
    assert stage4["val_scores"][str(stage4["kept_step"])] == best
    assert manifest["corrected_from"] == load_fusion(DEFAULT_WEIGHTS)[1]["version"] != manifest["version"]
    assert test_metrics["part-item/chance R@1"] == pytest.approx(1 / (2 * len(test) + 40))
    local = LocalEmbedder(weights=folder)
    assert (local.centres.maps != {}) == (stage4["kept_step"] > 0)
    assert sorted(local.centres.maps) == stage4["signatures"]
    item = synthetic.catalog.content(test[0])
    feats = local.featurizer.featurize([apply_task(item, "document")])
    want = local.centres.apply(local.encode([feats[0].segments]), [signature(item, "document")], 64)
    assert np.allclose(local.embed_many([item], "document", 64).vectors, want, atol=1e-5)
    # queries move, documents (the item vectors recommendations use) keep their centred vectors
    assert all(sig.startswith("query:") for sig in local.centres.maps)
    plain = ModalityCentres(local.centres.centres)
    assert np.allclose(want, plain.apply(local.encode([feats[0].segments]), [signature(item, "document")], 64))
    # the weights' own data only: another dataset or split is refused before any work
    from recsys.errors import DataError

    data.provenance = {**load_fusion(DEFAULT_WEIGHTS)[1]["training_data"], "dataset_hash": "another"}
    with pytest.raises(DataError, match="other data or another split"):
        correct_weights(DEFAULT_WEIGHTS, data, tmp_path / "w2", cfg.tracking_uri, tcfg, tmp_path / "cache")


@pytest.mark.slow  # a whole stage end to end: `make test` runs it, `make test-fast` does not
def test_part_item_task_with_titles_of_poster_less_movies_never_holds_a_held_out_item(synthetic_dir, tmp_path):
    """Search by one part: a poster movie gives its poster alone and its title alone; asked to, every movie
    without a poster gives its title alone; no item the COLD protocol holds out ever appears, with or without
    a poster."""
    from recsys.config import Config
    from recsys.data import load_movielens
    from recsys.data.movielens import POSTER_IDS_FILE
    from recsys.eval.splits import cold_split
    from recsys.embed.tasks import build

    posters = tmp_path / "posters"
    posters.mkdir()
    for item_id in POSTER_IDS_FILE.read_text().split()[:80]:
        Image.new("RGB", (32, 48), (int(item_id) % 255, 90, 160)).save(posters / f"{item_id}.jpg")
    ds = load_movielens(posters=posters)
    cfg = Config.load(None, workdir=str(tmp_path))
    held = set(cold_split(ds, cfg.eval).cold_items.tolist())
    has_image = ds.catalog.modalities[:, 1]
    for titles in (False, True):
        task = build(ds, cfg.eval, None, synthetic_dir, coengagement_pairs=500, titles_without_posters=titles).part_item
        rows = task.groups.tolist()
        assert not held & set(rows)
        kinds: dict[int, set] = {}
        for row, query, item in zip(rows, task.a, task.b):
            assert item.item_id == query.item_id == ds.catalog.ids[row]
            kinds.setdefault(row, set()).add(tuple(query.kinds))
        poster_rows = [r for r in kinds if has_image[r]]
        plain_rows = {r for r in kinds if not has_image[r]}
        assert poster_rows and all(kinds[r] == {("image",), ("text",)} for r in poster_rows)
        assert all(kinds[r] == {("text",)} for r in plain_rows)
        assert plain_rows == ({r for r in range(len(ds.catalog)) if not has_image[r] and r not in held} if titles else set())


def test_own_validation_slice_shares_no_movie_with_the_cold_protocol(tmp_path):
    """With ``own_val`` the embedder validates on its own slice of the training poster movies; the COLD
    protocol's validation movies are in no task (so the two-tower's COLD validation is independent of the
    embedder's checkpoint choice) and its test movies stay the held-out test set."""
    from recsys.config import Config
    from recsys.data import load_movielens
    from recsys.data.movielens import POSTER_IDS_FILE
    from recsys.eval.splits import cold_split
    from recsys.embed.tasks import poster_tasks

    posters = tmp_path / "posters"
    posters.mkdir()
    for item_id in POSTER_IDS_FILE.read_text().split()[:400]:
        Image.new("RGB", (32, 48), (int(item_id) % 255, 90, 160)).save(posters / f"{item_id}.jpg")
    ds = load_movielens(posters=posters)
    cfg = Config.load(None, workdir=str(tmp_path)).eval
    split = cold_split(ds, cfg)
    cold_val = {ds.catalog.ids[r] for r in split.val.candidates}
    cold_test = {ds.catalog.ids[r] for r in split.test.candidates}

    def ids(task) -> set:
        return {c.item_id for c in task.a}

    old = poster_tasks(ds, cfg)
    assert ids(old[1]) == cold_val and ids(old[2]) == cold_test  # the installed weights' recipe
    train, val, test = poster_tasks(ds, cfg, own_val=0.1)
    assert ids(test) == cold_test
    assert not cold_val & (ids(train) | ids(val) | ids(test))
    assert not ids(train) & ids(val) and val
    assert ids(train) | ids(val) == ids(old[0])  # the same poster movies outside the COLD split, now split in two
    assert 0.05 < len(val) / (len(train) + len(val)) < 0.15


def test_item_inputs_text_alone_and_concatenated_and_a_failed_part_fails_the_item(embedder, synthetic, tmp_path):
    from recsys.embed.item_input import ItemInputEmbedder, text_parts

    contents = synthetic.catalog.contents()[:6]
    assert any("image" in c.kinds for c in contents)
    fused, text = embedder.embed(contents, dim=64), embedder.embed([text_parts(c) for c in contents], dim=64)
    assert not np.allclose(fused, text)  # the items with media differ
    assert np.allclose(ItemInputEmbedder(embedder, "text").embed(contents, dim=64), text, atol=1e-6)
    both = ItemInputEmbedder(embedder, "concat")
    cat = both.embed(contents, dim=64)
    assert cat.shape == (6, 128) and np.allclose(np.linalg.norm(cat, axis=1), 1, atol=1e-5)
    assert np.allclose(cat * np.sqrt(2), np.hstack([fused, text]), atol=1e-5)
    # a query joins the concatenated space: it scores (q . fused + q . text) / 2
    q = Content.of("a query about the first item", item_id="q")
    qv, qc = embedder.embed([q], task="query", dim=64), both.embed([q], task="query", dim=64)
    assert np.allclose(qc @ cat.T, (qv @ fused.T + qv @ text.T) / 2, atol=1e-5)
    assert both.model_version == embedder.model_version + "+concat"
    # an image that cannot be decoded fails the item (never a half vector), the rest embed
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    res = both.embed_many([contents[0], Content.of("broken poster", Part.of_file("image", bad), item_id="broken")], dim=64)
    assert [e.item_id for e in res.errors] == ["broken"] and res.ok.tolist() == [True, False]
    assert np.allclose(res.vectors[0], cat[0], atol=1e-6)
    with pytest.raises(ValueError, match="unknown item input"):
        ItemInputEmbedder(embedder, "poster")


@pytest.mark.slow  # a whole stage end to end: `make test` runs it, `make test-fast` does not
def test_the_pipelines_item_input_candidates_are_what_the_item_embedder_gives(synthetic, tmp_path):
    """The demo assembles the candidates from the fused and text-only vectors; the nightly job and serving embed
    with item_embedder: both must give the same item space."""
    from recsys.embed import item_embedder
    from recsys.embed.catalog import embed_catalog, item_input_candidates
    from tests.conftest import small_config

    cfg = small_config(tmp_path)
    assert cfg.embedder.item_input == "auto"
    iv, ds = embed_catalog(cfg, synthetic, cold=True, save=False)
    cands = item_input_candidates(cfg, ds, iv)
    assert list(cands) == ["fused", "text", "concat"] and cands["fused"] is iv and iv.cold
    rows = [0, 1, 2, *list(iv.cold)[:3]]
    for mode in ("text", "concat"):
        emb = item_embedder(cfg, mode)
        got = emb.embed(ds.catalog.contents(rows), dim=cfg.embedder.dim)
        assert np.allclose(got, cands[mode].vectors[rows], atol=1e-5), mode
        assert cands[mode].model_version == emb.model_version and cands[mode].item_input == mode
        r = next(iter(iv.cold))
        assert np.allclose(emb.embed([ds.catalog.content(r, cold=True)], dim=cfg.embedder.dim)[0], cands[mode].cold[r], atol=1e-5)
    assert cands["concat"].dim == 2 * cfg.embedder.dim == cfg.with_item_input("concat").embedder.item_dim
    fixed = cfg.with_item_input("fused")
    assert list(item_input_candidates(fixed, ds, iv)) == ["fused"]


def test_kd_items_distils_minilm_on_every_content_with_text_and_only_those():
    """--kd-items: a batch of whole items (some with an image, one with none of text) gets MiniLM teachers for the
    contents with text (the mean of their text parts' sentence vectors); without it, such a batch gets none."""
    from training.embedder import TaskBatches, text_teacher
    from recsys.embed.tasks import PairTask

    rng = np.random.default_rng(0)
    t1, t2, t3 = (rng.normal(size=(4, 384)).astype(np.float32) for _ in range(3))
    img = rng.normal(size=(5, 1280)).astype(np.float32)
    b = [[("text", t1)], [("image", img)], [("text", t2), ("image", img), ("text", t3)]]
    task = PairTask("coengagement", [Content.of("x")] * 3, [Content.of("y")] * 3, np.arange(3))
    task.feats = {"a": (b, b), "b": (b, b)}
    assert np.allclose(text_teacher(b[2]), (t2[0] + t3[0]) / 2)
    batch = next(iter(TaskBatches([task], 3, prefix_keep=0.5, seed=0, kd_items=True)))
    rows = batch["teacher_rows"].tolist()
    with_text = [j for j, segs in enumerate(batch["b"]) if any(name == "text" for name, _ in segs)]
    assert rows == with_text and len(rows) == 2  # the image-only item has no teacher
    want = np.stack([text_teacher([(n, f.numpy()) for n, f in batch["b"][j]]) for j in rows])
    assert batch["teacher"].shape == (2, 384) and np.allclose(batch["teacher"].numpy(), want)
    assert "teacher" not in next(iter(TaskBatches([task], 3, prefix_keep=0.5, seed=0)))
