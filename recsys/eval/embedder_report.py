"""`recsys evaluate embedder`: what the embedder is worth, measured on held-out real data.

1. Cross-modal retrieval on held-out pairs: poster <-> "title | genres" on the COLD protocol's 589 test
   movies (never trained on), beside chance and a linear InfoNCE map from frozen EfficientNet features
   into MiniLM's space trained on the same training movies and early-stopped on the same validation
   movies as the embedder (the simple baseline to beat); spoken digit
   -> word accuracy on a held-out speaker; synthetic video <-> caption; the real MicroLens clips (smoke).
2. Recommendation value: content-kNN Recall@50 on LOO and COLD with MiniLM text vectors, our text-only
   vectors, and our fused text+poster vectors.
3. Throughput: items/s for text-only, text+image and video items (no cache), and the ratio to the
   bare backbones' forward time on the same items (the pipeline's overhead).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from rich.table import Table

from recsys.config import SHARED_DATA, Config
from recsys.content import Content, Part
from recsys.data import load_movielens
from recsys.embed.base import truncate_normalize
from recsys.eval.embedder import LinearMap, chance, nearest_label_accuracy, retrieval_recall


def _embed(embedder, contents, task, dim):
    return embedder.embed(contents, task=task, dim=dim)


def matryoshka_sweep(embedder, test) -> dict[int, dict[str, float]]:
    """text->poster / poster->text R@10 at every Matryoshka prefix of one full-width embedding."""
    full_p = _embed(embedder, test.a, "document", embedder.max_dim)
    full_t = _embed(embedder, test.b, "query", embedder.max_dim)
    out = {}
    for d in embedder.dims:
        p, t = truncate_normalize(full_p, d), truncate_normalize(full_t, d)
        out[d] = {"text->poster R@10": retrieval_recall(t, p)[10], "poster->text R@10": retrieval_recall(p, t)[10]}
    return out


def cross_modal(embedder, ds, cfg: Config, fsdd: Path | None, dim: int) -> dict:
    from recsys.embed.tasks import DIGITS, digit_tasks, poster_tasks, synthetic_tasks

    out: dict = {}
    train, val, test = poster_tasks(ds, cfg.eval)
    posters = _embed(embedder, test.a, "document", dim)
    texts = _embed(embedder, test.b, "query", dim)
    t2p, p2t, ch = retrieval_recall(texts, posters), retrieval_recall(posters, texts), chance(len(test))
    # The baseline: frozen EfficientNet global features -> MiniLM sentence space, linear, InfoNCE.
    bb = embedder.featurizer.backbones
    from recsys.media import decode_image

    def image_feats(task):
        return bb.image_grid([decode_image(c.parts[0].read_bytes()) for c in task.a], grid=False)

    lin = LinearMap.fit(image_feats(train), bb.sentence_vectors([c.text() for c in train.b]),  # early-stopped on val
                        val=(image_feats(val), bb.sentence_vectors([c.text() for c in val.b])))
    lp, lt = lin(image_feats(test)), bb.sentence_vectors([c.text() for c in test.b])
    out["poster-text"] = {
        "held_out_movies": len(test), "train_movies": len(train),
        "ours": {"text->poster R@1": t2p[1], "text->poster R@10": t2p[10], "poster->text R@1": p2t[1], "poster->text R@10": p2t[10]},
        "linear map baseline": {"text->poster R@1": retrieval_recall(lt, lp)[1], "text->poster R@10": retrieval_recall(lt, lp)[10],
                                "poster->text R@1": retrieval_recall(lp, lt)[1], "poster->text R@10": retrieval_recall(lp, lt)[10]},
        "chance": {"R@1": ch[1], "R@10": ch[10]},
        "ours by Matryoshka dim": matryoshka_sweep(embedder, test),
    }
    if fsdd is not None and Path(fsdd).is_dir():
        _, _, dt = digit_tasks(Path(fsdd))
        audio = _embed(embedder, dt.a, "document", dim)
        words = _embed(embedder, [Content.of(w) for w in DIGITS], "query", dim)
        out["digit-word"] = {"held_out_speaker": "theo", "clips": len(dt), "audio->word accuracy":
                             nearest_label_accuracy(audio, words, dt.groups), "chance": 0.1}
    _, _, st = synthetic_tasks(cfg.cache_dir / "embedder-synthetic")
    media, caps = _embed(embedder, st.a, "document", dim), _embed(embedder, st.b, "query", dim)
    top = (media @ caps.T).argmax(1)
    out["synthetic video/image/audio <-> caption"] = {
        "held_out_clips": len(st), "caption->media R@10": retrieval_recall(caps, media)[10],
        "media->caption R@10": retrieval_recall(media, caps)[10], "chance R@10": chance(len(st))[10],
        "media->caption same cluster @1": float((st.groups[top] == st.groups).mean()),
        "chance same cluster @1": float(np.mean([(st.groups == g).mean() for g in st.groups]))}
    ml = SHARED_DATA / "microlens-sample"
    if (ml / "videos").is_dir():
        import polars as pl

        titles = pl.read_csv(ml / "MicroLens-50k_titles.csv")
        ids = sorted(p.stem for p in (ml / "videos").glob("*.mp4"))
        caps = dict(zip(titles["item"].cast(pl.Utf8).to_list(), titles["title"].to_list()))
        vids = _embed(embedder, [Content((Part.of_file("video", ml / "videos" / f"{i}.mp4"),), item_id=i) for i in ids], "document", dim)
        txt = _embed(embedder, [Content.of(caps[i]) for i in ids], "query", dim)
        out["microlens real clips (smoke)"] = {"clips": len(ids), "video->caption accuracy": float(
            ((vids @ txt.T).argmax(1) == np.arange(len(ids))).mean()), "chance": 1 / len(ids)}
    return out


def recommendation_value(embedder, ds, cfg: Config, dim: int) -> dict:
    """Content-kNN Recall@50 (LOO, COLD) with three kinds of item vectors."""
    from recsys.eval import make_split
    from recsys.eval.baselines import ContentKNN
    from recsys.eval.evaluate import evaluate

    bb = embedder.featurizer.backbones
    text_only = [Content(tuple(p for p in c.parts if p.kind == "text"), item_id=c.item_id) for c in ds.catalog.contents()]
    variants = {
        "MiniLM text (raw backbone)": bb.sentence_vectors([c.text() for c in text_only]),
        "ours, text only": _embed(embedder, text_only, "document", dim),
        "ours, text + poster (fused)": _embed(embedder, ds.catalog.contents(), "document", dim),
    }
    out: dict = {}
    for protocol in ("loo", "cold"):
        split = make_split(protocol, ds, cfg.eval)
        cold = split.cold_items
        out[protocol] = {}
        for name, vecs in variants.items():
            v = vecs.copy()
            if cold.size:  # a brand-new item has no user tags
                rows = [int(r) for r in cold]
                cold_contents = [ds.catalog.content(r, cold=True) for r in rows]
                if name.startswith("MiniLM"):
                    v[rows] = bb.sentence_vectors([c.text() for c in cold_contents])
                elif "text only" in name:
                    v[rows] = _embed(embedder, [Content(tuple(p for p in c.parts if p.kind == "text"), item_id=c.item_id)
                                                for c in cold_contents], "document", dim)
                else:
                    v[rows] = _embed(embedder, cold_contents, "document", dim)
            res = evaluate(ContentKNN(ds.catalog.index, v, name=name), split.test, ds.catalog.index, protocol, n_boot=200)
            out[protocol][name] = {"Recall@50": res.estimates["Recall@50"].mean, "HR@10": res.estimates["HR@10"].mean}
    return out


def part_to_item(embedder, ds, cfg: Config, dim: int) -> dict:
    """Search with one part of an item: for every movie with a poster, the query is its poster alone (and,
    separately, its title alone), embedded as a query; the target is that movie's full item vector among the
    whole catalog's. R@1 / R@10 over all poster movies, and over the COLD protocol's held-out movies alone
    (the embedder never trained on those)."""
    from recsys.eval import make_split

    full = _embed(embedder, ds.catalog.contents(), "document", dim)
    rows = np.flatnonzero(ds.catalog.modalities[:, 1])
    held = set(make_split("cold", ds, cfg.eval).test.candidates.tolist())
    one_part = [ds.catalog.one_part_queries(int(r)) for r in rows]
    queries = {"poster alone": [q["image alone"] for q in one_part], "title alone": [q["title alone"] for q in one_part]}
    out: dict = {"movies": int(rows.size), "catalog": len(ds.catalog), "held_out_movies": len(held)}
    for name, contents in queries.items():
        out[name] = _own_item_ranks(_embed(embedder, contents, "query", dim), full, rows, held)
    return out


def title_reference(backbones, ds, cfg: Config) -> dict:
    """The text backbone alone (plain MiniLM sentence vectors): each poster movie's title vs every item's text,
    scored as :func:`part_to_item` scores the fused vectors. How much of a title's identity the backbone holds
    before fusion."""
    from recsys.eval import make_split

    rows = np.flatnonzero(ds.catalog.modalities[:, 1])
    held = set(make_split("cold", ds, cfg.eval).test.candidates.tolist())
    docs = backbones.sentence_vectors([" ".join(p.text for p in c.parts if p.kind == "text") for c in ds.catalog.contents()])
    return _own_item_ranks(backbones.sentence_vectors([ds.catalog.titles[int(r)] for r in rows]), docs, rows, held)


def _own_item_ranks(q: np.ndarray, docs: np.ndarray, rows: np.ndarray, held: set) -> dict:
    """R@1 / R@10 (all, and the held-out rows alone) and the median rank of ``docs[rows[i]]`` for query i."""
    scores = q @ docs.T
    rank = (scores > scores[np.arange(rows.size), rows][:, None]).sum(1)  # 0 = the movie itself is first
    ho = np.array([int(r) in held for r in rows])
    return {"R@1": float((rank < 1).mean()), "R@10": float((rank < 10).mean()),
            "held-out R@1": float((rank[ho] < 1).mean()), "held-out R@10": float((rank[ho] < 10).mean()),
            "median rank": float(np.median(rank) + 1)}


def throughput(embedder_factory, ds, microlens: Path | None, n: int = 128) -> dict:
    """items/s with a cold cache, and the bare backbones' time on the same parts."""
    from recsys.media import decode_image, decode_video

    out: dict = {}
    contents = ds.catalog.contents()
    text = [Content(tuple(p for p in c.parts if p.kind == "text"), item_id=c.item_id) for c in contents[:n]]
    with_image = [c for c in contents if "image" in c.kinds][:n]
    sets = {"text-only": text, "text+image": with_image}
    if microlens is not None and (microlens / "videos").is_dir():
        vids = sorted((microlens / "videos").glob("*.mp4"))
        sets["video (real MicroLens clips)"] = [Content.of("a short video", Part.of_file("video", v), item_id=v.stem)
                                                for v in vids]
    for name, items in sets.items():
        if not items:
            continue
        emb = embedder_factory()  # fresh: no cache, no part features in memory
        bb = emb.featurizer.backbones
        bb.text_model, bb.image_model  # load weights outside the timing
        t0 = time.perf_counter()
        emb.embed(items)
        total = time.perf_counter() - t0
        # the bare backbones on the same parts (decoding included for media)
        t0 = time.perf_counter()
        bb.text_tokens([p.text for c in items for p in c.parts if p.kind == "text"])
        imgs = [decode_image(p.read_bytes()) for c in items for p in c.parts if p.kind == "image"]
        frames = [f for c in items for p in c.parts if p.kind == "video" for f in decode_video(p.read_bytes()).frames]
        if imgs:
            bb.image_grid(imgs)
        if frames:
            bb.image_grid(frames, grid=False)
        bare = time.perf_counter() - t0
        out[name] = {"items": len(items), "items_per_s": len(items) / total, "seconds": total,
                     "bare_backbones_s": bare, "overhead_ratio": total / max(bare, 1e-9)}
    return out


def run(cfg: Config, fsdd: Path | None = None, dim: int | None = None) -> dict:
    from recsys.embed.local import LocalEmbedder
    from recsys.progress import console

    dim = dim or cfg.embedder.dim
    posters = cfg.data.posters or (SHARED_DATA / "movielens-posters")
    if not Path(posters).is_dir():
        raise FileNotFoundError(f"the embedder evaluation needs the MovieLens posters (looked in {posters}); pass --posters")
    fsdd = fsdd or (SHARED_DATA / "fsdd" / "recordings")
    ds = load_movielens(cfg.data.path, posters=posters)
    embedder = LocalEmbedder(cfg.embedder.local_weights, cache_dir=cfg.cache_dir, default_dim=dim)
    report = {"model_version": embedder.model_version, "dim": dim,
              "cross_modal": cross_modal(embedder, ds, cfg, fsdd, dim),
              "recommendation_value": recommendation_value(embedder, ds, cfg, dim),
              "part_to_item": part_to_item(embedder, ds, cfg, dim),
              "throughput": throughput(lambda: LocalEmbedder(cfg.embedder.local_weights, default_dim=dim), ds,
                                       SHARED_DATA / "microlens-sample")}
    t = Table(title=f"Embedder {embedder.model_version}, dim {dim}: held-out cross-modal retrieval")
    for c in ("task", "metric", "ours", "linear map", "chance"):
        t.add_column(c)
    pt = report["cross_modal"]["poster-text"]
    for m in ("text->poster R@1", "text->poster R@10", "poster->text R@1", "poster->text R@10"):
        t.add_row("poster-text (589 held-out movies)", m, f"{pt['ours'][m]:.3f}", f"{pt['linear map baseline'][m]:.3f}",
                  f"{pt['chance']['R@' + m.split('R@')[1]]:.4f}")
    for d, vals in pt["ours by Matryoshka dim"].items():
        t.add_row(f"poster-text, dim {d}", "text->poster R@10", f"{vals['text->poster R@10']:.3f}", "", "")
    for task, vals in report["cross_modal"].items():
        if task == "poster-text":
            continue
        for m, v in vals.items():
            if isinstance(v, float) and "chance" not in m:
                t.add_row(task, m, f"{v:.3f}", "", "")
    console.print(t)
    console.print_json(data={"recommendation_value": report["recommendation_value"], "part_to_item": report["part_to_item"],
                             "throughput": report["throughput"]})
    out = cfg.workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    import json

    (out / "embedder.json").write_text(json.dumps(report, indent=2, default=str))
    return report
