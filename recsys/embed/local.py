"""The ``local`` backend: offline, CPU, frozen backbones + the trained fusion model.

Weights live in a folder with ``fusion.safetensors`` and ``manifest.json`` (backbones, dims, data
used, metrics). The default folder ships inside the package (``recsys/embed/weights/local-v1``),
so a fresh offline machine embeds with no manual step; ``recsys train-embedder`` makes new ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from recsys.content import Content, ContentError
from recsys.embed.backbones import FEATURIZER_VERSION, Backbones, Featurizer
from recsys.embed.base import EmbedResult, Embedder, ItemError, Limits, Task, apply_task, truncate_normalize
from recsys.embed.cache import VectorCache, embedding_key
from recsys.embed.fusion import FusionConfig, FusionEncoder

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "local-v1"
CENTRES_FILE = "centres.npz"  # the modality-gap correction (ModalityCentres), next to the weights


def load_fusion(folder: str | Path) -> tuple[FusionEncoder, dict]:
    """Read a weights folder -> (model in eval mode, manifest)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "manifest.json").exists() or not (folder / "fusion.safetensors").exists():
        raise FileNotFoundError(
            f"no local embedder weights in {folder} (expected manifest.json and fusion.safetensors); "
            "train them with `recsys train-embedder --install`"
        )
    manifest = json.loads((folder / "manifest.json").read_text())
    model = FusionEncoder(FusionConfig.from_dict(manifest["config"]))
    state = {k: v.float() for k, v in load_file(str(folder / "fusion.safetensors")).items()}
    model.load_state_dict(state)
    return model.eval(), manifest


def save_fusion(model: FusionEncoder, folder: str | Path, manifest: dict, centres: "ModalityCentres | None" = None) -> Path:
    """Write weights (float16), the modality centres and the manifest; the version is derived from the hash of
    the weights and the centres (either changes every vector)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "fusion.safetensors"))
    h = hashlib.sha256((folder / "fusion.safetensors").read_bytes())
    (folder / CENTRES_FILE).unlink(missing_ok=True)
    if centres is not None:
        centres.save(folder / CENTRES_FILE)
        h.update((folder / CENTRES_FILE).read_bytes())
    digest = h.hexdigest()[:10]
    manifest = {**manifest, "config": model.cfg.to_dict(), "featurizer": FEATURIZER_VERSION,
                "version": f"fusion-{digest}"}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return folder


def signature(content: Content, task: str) -> str:
    """What a content's vector offset depends on: the task and the kinds of its own parts, e.g. "query:image"."""
    return f"{task}:{'+'.join(sorted(set(content.kinds)))}"


class ModalityCentres:
    """The modality-gap correction, per signature (task + kinds of parts): each signature's mean raw fusion
    output on the embedder's training data is subtracted, then (where learned) a low-rank residual map
    ``x + (x V) U^T`` moves the centred output, before truncation and normalisation.

    Without the centres, vectors cluster by which kinds of parts a content has (every item with a poster sits
    near every other one), so a query made of one part (a poster alone, a title alone) does not find the item
    that holds it. The mean is linear, so centring the raw output centres every Matryoshka prefix exactly.
    Centring leaves a spread: an item's poster adds directions its title does not have, so a title alone sits
    nearer a poster-less item with a similar title than its own item. The maps, fitted on the training pairs
    of every task against the whole training catalog (training/embedder.py ``fit_correction``), take that
    out; they move queries only, so item vectors (what recommendations are built from) keep their geometry.
    A signature never seen in training takes the centre of the same parts under another task, else the same
    task's with the most parts in common, else none; a map comes from the same task only.
    """

    def __init__(self, centres: dict[str, np.ndarray], maps: dict[str, tuple[np.ndarray, np.ndarray]] | None = None):
        self.centres = {k: np.asarray(v, np.float32) for k, v in centres.items()}
        self.maps = {k: (np.asarray(v, np.float32), np.asarray(u, np.float32)) for k, (v, u) in (maps or {}).items()}

    @classmethod
    def fit(cls, raw: np.ndarray, signatures: list[str], min_count: int = 20) -> "ModalityCentres":
        """Args: raw (n, out_dim) fusion outputs; signatures: one per row. Signatures with fewer than
        ``min_count`` rows get no centre of their own (they fall back)."""
        sigs = np.array(signatures)
        return cls({s: raw[sigs == s].mean(0) for s in sorted(set(signatures)) if (sigs == s).sum() >= min_count})

    def with_maps(self, maps: dict[str, tuple[np.ndarray, np.ndarray]]) -> "ModalityCentres":
        """The same centres with these low-rank maps: signature -> (V, U), each (out_dim, rank)."""
        return ModalityCentres(self.centres, maps)

    @staticmethod
    def _resolve(sig: str, known, across_tasks: bool = True) -> str | None:
        """Which known signature stands in for ``sig``: itself, the same parts under another task (``across_tasks``),
        else the same task's with the most parts in common."""
        if sig in known:
            return sig
        task, kinds = sig.split(":", 1)
        same_parts = [k for k in known if k.split(":", 1)[1] == kinds] if across_tasks else []
        if same_parts:
            return same_parts[0]
        want = set(kinds.split("+"))

        def overlap(k: str) -> float:
            have = set(k.split(":", 1)[1].split("+"))
            return len(want & have) / len(want | have)

        near = max((k for k in known if k.startswith(task + ":")), key=overlap, default=None)
        return near if near is not None and overlap(near) > 0 else None

    def centre(self, sig: str) -> np.ndarray | None:
        key = self._resolve(sig, self.centres)
        return None if key is None else self.centres[key]

    def map(self, sig: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The map of ``sig``, else of the same task's nearest signature: never another task's (the maps are
        learned for queries; a document borrowing one would move every item vector)."""
        key = self._resolve(sig, self.maps, across_tasks=False)
        return None if key is None else self.maps[key]

    def correct(self, raw: np.ndarray, signatures: list[str]) -> np.ndarray:
        """(n, out_dim) raw outputs -> (n, out_dim) corrected outputs (centred, then mapped), not normalised."""
        out = np.array(raw, dtype=np.float32, copy=True)
        sigs = np.array(signatures)
        for sig in sorted(set(signatures)):
            rows = sigs == sig
            c = self.centre(sig)
            if c is not None:
                out[rows] -= c
            m = self.map(sig)
            if m is not None:
                v, u = m
                out[rows] += (out[rows] @ v) @ u.T
        return out

    def apply(self, raw: np.ndarray, signatures: list[str], dim: int) -> np.ndarray:
        """(n, out_dim) raw outputs -> (n, dim) corrected, truncated, L2-normalised vectors."""
        return truncate_normalize(self.correct(raw, signatures), dim)

    def save(self, path: Path) -> None:
        maps = {f"{part}|{k}": m[i] for k, m in self.maps.items() for i, part in enumerate(("V", "U"))}
        np.savez(path, **self.centres, **maps)

    @classmethod
    def load(cls, path: Path) -> "ModalityCentres | None":
        if not Path(path).exists():
            return None
        with np.load(path) as z:
            centres = {k: z[k] for k in z.files if "|" not in k}
            maps = {k.split("|", 1)[1]: (z[k], z["U|" + k.split("|", 1)[1]]) for k in z.files if k.startswith("V|")}
        return cls(centres, maps)


class LocalEmbedder(Embedder):
    """Offline multimodal embedder (see recsys.embed.fusion for the model)."""

    name = "local"

    def __init__(self, weights: str | Path | None = None, cache_dir: str | Path | None = None,
                 batch_size: int = 64, default_dim: int = 256, device: str = "cpu",
                 model: FusionEncoder | None = None, manifest: dict | None = None,
                 featurizer: Featurizer | None = None, centres: ModalityCentres | None = None,
                 featurize_items: int = 1024):
        if model is None:
            model, manifest = load_fusion(weights or DEFAULT_WEIGHTS)
            centres = ModalityCentres.load(Path(weights or DEFAULT_WEIGHTS) / CENTRES_FILE)
        self.centres = centres
        self.model = model.eval().to(device)
        self.manifest = manifest or {"version": "untrained"}
        self.dims = tuple(self.model.cfg.matryoshka_dims)
        self.default_dim = default_dim
        self.batch_size = batch_size
        # Items featurized together (a weight budget, see _featurize_chunks): the text backbone sorts its inputs
        # by length across the whole chunk, so wider chunks than the fusion batch pad far less.
        self.featurize_items = max(batch_size, featurize_items)
        self.featurizer = featurizer or Featurizer(Backbones(device), cache_dir=cache_dir)
        self.cache = VectorCache(Path(cache_dir) / "embeddings.sqlite") if cache_dir else None
        self.limits = Limits()

    MEDIA_WEIGHT = {"text": 1, "image": 4, "audio": 16, "video": 16}  # memory a decoded part holds, roughly

    def _featurize_chunks(self, misses: list) -> Iterator[list]:
        """Consecutive slices of ``misses`` (index, content, key) to featurize together: up to ``featurize_items``
        text-only items, fewer where items hold images, audio or video (their decoded media wait in memory)."""
        chunk, weight = [], 0
        for m in misses:
            w = max((self.MEDIA_WEIGHT.get(p.kind, 16) for p in m[1].parts), default=1)
            if chunk and weight + w > self.featurize_items:
                yield chunk
                chunk, weight = [], 0
            chunk.append(m)
            weight += w
        if chunk:
            yield chunk

    @property
    def model_version(self) -> str:
        return str(self.manifest["version"])

    @torch.inference_mode()
    def encode(self, segments: list[list[tuple[str, np.ndarray]]]) -> np.ndarray:
        """Featurized contents -> (n, out_dim) raw fusion outputs (not normalised)."""
        batch = [[(name, torch.from_numpy(np.asarray(f, dtype=np.float32))) for name, f in segs] for segs in segments]
        return self.model(batch).float().numpy()

    def embed_many(self, contents: Sequence[Content], task: Task = "document", dim: int | None = None,
                   progress: bool = False) -> EmbedResult:
        dim = self.check_dim(dim)
        n = len(contents)
        vectors = np.zeros((n, dim), dtype=np.float32)
        errors: list[ItemError] = []
        todo: list[tuple[int, Content, str | None]] = []
        sig: dict[int, str] = {}
        for i, c in enumerate(contents):
            try:
                self.limits.check(c)
                sig[i] = signature(c, task)
                c = apply_task(c, task)
                key = embedding_key(c, task, self.name, self.model_version, dim) if self.cache is not None else None
                todo.append((i, c, key))
            except ContentError as exc:
                errors.append(ItemError(i, c.item_id, exc.problem))
        hits = self.cache.get_many([k for _, _, k in todo if k]) if self.cache is not None else {}
        for i, _, key in todo:
            if key in hits:
                vectors[i] = hits[key]
        misses = [(i, c, k) for i, c, k in todo if k not in hits]
        bar = tqdm(total=len(misses), desc=f"embed[{self.name}]", unit="item", disable=not progress)
        for fchunk in self._featurize_chunks(misses):
            ffeats = self.featurizer.featurize([c for _, c, _ in fchunk])
            for start in range(0, len(fchunk), self.batch_size):
                chunk, feats = fchunk[start : start + self.batch_size], ffeats[start : start + self.batch_size]
                good = [(j, f) for j, f in enumerate(feats) if f.error is None]
                for j, f in enumerate(feats):
                    if f.error is not None:
                        i, c, _ = chunk[j]
                        errors.append(ItemError(i, c.item_id, f.error.problem))
                if good:
                    raw = self.encode([f.segments for _, f in good])
                    out = (self.centres.apply(raw, [sig[chunk[j][0]] for j, _ in good], dim) if self.centres is not None
                           else truncate_normalize(raw, dim))
                    new = {}
                    for (j, _), v in zip(good, out):
                        i, _, key = chunk[j]
                        vectors[i] = v
                        if key:
                            new[key] = v
                    if self.cache is not None and new:
                        self.cache.put_many(new)
                bar.update(len(chunk))
        bar.close()
        errors.sort(key=lambda e: e.index)
        return EmbedResult(vectors, errors, cache_hits=len(hits))
