"""One configuration object for the whole flow.

Every stage reads its settings from :class:`Config`; nothing else holds tunable constants.
Load it from a TOML file (``recsys --config my.toml ...``) or build it in code; each section can be
overridden field by field (``Config.load(path, train={"epochs": 5})``).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_DIR = PACKAGE_DIR.parent
BUNDLED_MOVIELENS = PACKAGE_DIR / "data" / "ml-latest-small"
SHARED_DATA = PROJECT_DIR.parent / "shared" / "data"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Which catalog and interactions to load."""

    source: Literal["movielens", "generic", "synthetic"] = "movielens"
    path: Path | None = None  # movielens: folder (default: bundled); generic: folder or items file
    posters: Path | None = None  # movielens: folder of <movieId>.jpg
    max_users: int | None = None  # a slice for quick runs / tests (first N users by id order)
    max_tags_per_item: int = 10
    check_media: bool = True  # generic format: check media files' headers at load (false: skip, for speed)


class EmbedderConfig(_Section):
    """The multimodal embedder (see recsys.embed)."""

    backend: Literal["local", "gemini"] = "local"
    dim: int = 256  # Matryoshka truncation; vectors are L2-normalised after truncation
    # What the two-tower reads of an item (recsys.embed.item_input): fused, text, concat, or auto (the pipeline
    # trains on each and keeps the best on validation; the registered model records its choice).
    item_input: Literal["auto", "fused", "text", "concat"] = "auto"
    batch_size: int = 64
    cache: bool = True  # content-hash cache under <workdir>/cache/embeddings
    local_weights: Path | None = None  # default: the weights shipped in recsys/embed/weights
    gemini_model: str = "gemini-embedding-2"
    gemini_base_url: str | None = None  # e.g. a local stand-in server; default: the SDK's
    gemini_batch_size: int = 100  # the API's cap per batchEmbedContents call
    gemini_concurrency: int = 4  # requests in flight, across all Ray actors with --engine ray
    gemini_items_per_minute: int | None = None  # your project's quota (contents/min); None: no pacing, 429s back off
    gemini_max_retries: int = 6
    gemini_timeout_s: float = 60.0
    gemini_upload_above_bytes: int = 2**20  # larger media parts go through the Files API, not inline
    gemini_file_wait_s: float = 300.0  # how long an uploaded video may stay PROCESSING
    history_half_life: float = 50.0  # in items: the history vector is a decayed sum (an item this old weighs half)

    @property
    def item_dim(self) -> int:
        """Width of the item vectors the two-tower reads in the configured item input (auto: fused)."""
        return 2 * self.dim if self.item_input == "concat" else self.dim


class FeatureConfig(_Section):
    """The Feast feature store (see features/)."""

    project: str = "recsys"
    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_connection: str = "localhost:6379"
    bulk_writes: bool = True  # Feast's stores plus a bulk write (features/online.py); False: Feast's stock types
    registry: str | None = None  # default: <workdir>/feast/data/registry.db
    recent_items: int = 20  # ids kept in the user-history feature
    write_chunk_rows: int = 5000  # rows per online write (bounds memory)


class EventsConfig(_Section):
    """The interaction event log (recsys/events.py): every event the service accepts, the nightly's input."""

    backend: Literal["sqlite", "redis"] = "sqlite"  # redis: a Redis Stream, for services on several machines
    path: Path | None = None  # sqlite: default <workdir>/events/events.db
    sync: bool = True  # sqlite: fsync each append before the 2xx (synchronous=FULL); False: NORMAL (WAL)
    redis_connection: str | None = None  # redis: default features.redis_connection
    redis_prefix: str = "recsys:events"


def _layered(base: dict, top: dict) -> dict:
    """``top`` over ``base``: nested tables merged key by key, anything else (lists included) replaced."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _layered(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _listed(v) -> list:
    """A setting that is one value or a list of values to screen, as a list."""
    return list(v) if isinstance(v, list) else [v]


class ColdOverrides(_Section):
    """``[train.cold]``: what the two-tower does differently on the COLD protocol, where every test item is new."""

    # COLD's id_dropout: every test item there is new (no id, no statistics), so by default every training example
    # hides them too and the item tower learns to score from content alone (no id table is then screened: it
    # would never train). Validation NDCG@10 rose with it for every item input (`python -m benchmarks.run cold-content`).
    id_dropout: float = Field(1.0, ge=0.0, le=1.0)
    # COLD's content_match: content is all a cold item has, and the towers' 64-wide output does not carry all of the
    # embedder's similarity; with it COLD validation NDCG@10 rose for every item input
    # (`python -m benchmarks.run content-match`); on LOO it fell (`content-match-loo`).
    content_match: bool = True
    # The item content the two-tower trains on. "new": every item as a brand-new item looks (its own content, no
    # user-derived parts such as MovieLens tags), which is all a cold item has, so the item tower learns on the
    # inputs it is scored with; "full": with the user tags of the training window (cold items still without).
    # Tagged items are the popular ones, so under "full" the towers learn tag-bearing vectors and meet none at test
    # (`python -m benchmarks.run cold-content`).
    item_content: Literal["new", "full"] = "new"


class TrainConfig(_Section):
    """The Lightning two-tower head (see training/)."""

    out_dim: int = 64
    hidden_dim: int = 256
    # in both towers' MLPs (and the sequential user encoder); 0.3 and 0.5 were worse on COLD validation (`cold-recipe`)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    # A learned id embedding per item, beside its content (the item tower's and the user tower's recent items').
    # A list: the pipeline screens the values on validation after the item input and newest_items are chosen
    # (one more select_epochs fit of the lead variant with the other value), because the protocols disagree:
    # LOO validation prefers ids (one epoch: concat+newest1 0.0389 -> 0.0468), COLD refuses them (fused+newest0
    # 0.2048 -> 0.1784; a cold item's id was never trained). A single fit outside the pipeline reads the first.
    id_embeddings: bool | list[bool] = [False, True]
    # The id table's learning rate (None: ``lr``): at the towers' 5e-5 the table barely moves in 10 epochs (its
    # rows start at std 0.02); chosen on LOO validation among 5e-5, 1e-3, 5e-3, 1e-2 (`python -m benchmarks.run id-lr`)
    id_lr: float | None = 5e-3
    id_dropout: float = 0.5  # share of examples whose item id / stats are hidden (cold-start training); LOO, TEMPORAL
    user_encoder: Literal["attention", "sequential"] = "attention"  # how the user tower reads recent items
    # Add the embedder's own similarity, cos(user history, item content), with a learned weight to the towers'
    # score (training/towers.py: TowerConfig.content_match); the vectors served grow by the content width (65 -> 577
    # for the concatenated input). LOO, TEMPORAL; COLD reads cold.content_match.
    content_match: bool = False
    # The newest k recent items also enter the user tower each in its own slot, not only pooled. A list: the
    # pipeline screens the values jointly with the item inputs on validation and keeps the best (select_epochs
    # fits: every input with the first value, the better half of the inputs with the others), because the
    # protocols disagree: LOO validation prefers 1 (`python -m benchmarks.run newest-items`), COLD validation 0
    # (`python -m benchmarks.run demo-newest`: NDCG@10 0.243 -> 0.215). A single fit outside the pipeline
    # (benchmarks, `fit_two_tower`) reads a list's first value.
    newest_items: int | list[int] = [0, 1]
    newest_skip: bool = False  # a linear path from the newest item's content to the user vector
    max_epochs: int = 10
    # With several item inputs (embedder.item_input auto), each is first trained this many epochs; only the
    # best on validation NDCG@10 then continues to max_epochs (successive halving). 0: train each fully.
    # 1: in the demo run of 2026-12-03 (MLflow val/NDCG10 per epoch) the inputs ranked the same after 1 epoch as
    # after 2 on both LOO and COLD; each extra screening epoch costs two losing fits an epoch per protocol.
    select_epochs: int = 1
    patience: int = 2  # validation NDCG peaks by epoch 2-3 on ml-latest-small; a third idle epoch cost ~45 s
    val_bucket_days: float = 28.0  # per-epoch validation: item stats as of each 4-week bucket (final eval: weekly)
    val_max_groups: int = 32  # ... and at most this many buckets (equal-size time groups past it)
    batch_size: int = 512
    lr: float = 5e-5  # chosen on LOO + COLD validation among 5e-4, 1.5e-4, 5e-5: `python -m benchmarks.run learning-rate`
    weight_decay: float = 1e-5
    temperature: float = 0.07  # initial value; learnable when learn_temperature
    learn_temperature: bool = True
    logq_correction: bool = True
    mixed_negatives: int = 0  # extra uniformly sampled catalog items per batch; 0 chosen over 1,024 on LOO + COLD
    # validation (`python -m benchmarks.run negatives`)
    hard_negatives: int = 0  # per example, mined with FAISS from the previous epoch's item vectors
    remove_accidental_hits: bool = True
    seed: int = 0
    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"  # e.g. "ddp" for several GPUs / nodes
    num_nodes: int = 1
    num_workers: int = 0
    # training sets larger than this many rows hold their history vectors as int8 with a per-row scale (a quarter
    # of the memory, cosine to the float vector > 0.9999: features.inputs.History); 0: always float32
    int8_history_above: int = 2_000_000
    epoch_batches: int = 0  # at most this many batches per epoch (0: every training row once); quick runs, scale timing
    registered_model: str = "recsys-two-tower"
    cold: ColdOverrides = Field(default_factory=ColdOverrides)  # [train.cold]: the COLD protocol's overrides

    @model_validator(mode="before")
    @classmethod
    def _cold_keys(cls, data):
        """The former flat names (``cold_id_dropout``, ``cold_content_match``, ``cold_item_content``: saved
        configurations and TOML files from before ``[train.cold]``) are read into it."""
        if isinstance(data, dict) and any(k.startswith("cold_") for k in data):
            data = dict(data)
            cold = dict(data.get("cold") or {})
            for k in [k for k in data if k.startswith("cold_")]:
                cold[k.removeprefix("cold_")] = data.pop(k)
            data["cold"] = cold
        return data

    @field_validator("newest_items")
    @classmethod
    def _newest_items(cls, v: int | list[int]) -> int | list[int]:
        values = _listed(v)
        if not values or min(values) < 0 or len(set(values)) != len(values):
            raise ValueError(f"newest_items must be a count >= 0 or a non-empty list of distinct ones, got {v!r}")
        return v

    @field_validator("id_embeddings")
    @classmethod
    def _id_embeddings(cls, v: bool | list[bool]) -> bool | list[bool]:
        values = _listed(v)
        if not values or len(set(values)) != len(values):
            raise ValueError(f"id_embeddings must be true, false or a non-empty list of distinct ones, got {v!r}")
        return v

    @field_validator("id_lr")
    @classmethod
    def _id_lr(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError(f"id_lr must be > 0 (or unset: the towers' lr), got {v!r}")
        return v

    @property
    def newest_choices(self) -> list[int]:
        """The ``newest_items`` values the pipeline screens (one: nothing to choose)."""
        return _listed(self.newest_items)

    @property
    def id_choices(self) -> list[bool]:
        """The ``id_embeddings`` values the pipeline screens (one: nothing to choose)."""
        return _listed(self.id_embeddings)

    def for_protocol(self, protocol: str) -> "TrainConfig":
        """The settings a fit on ``protocol`` trains with: COLD hides ids and statistics for ``cold.id_dropout``
        of the examples, the others for ``id_dropout`` (with every one hidden there is no id table to learn), and
        COLD adds the content match when ``cold.content_match``, the others when ``content_match``."""
        if protocol != "cold":
            return self
        update = {"id_dropout": self.cold.id_dropout, "content_match": self.cold.content_match}
        update |= {"id_embeddings": False} if self.cold.id_dropout >= 1.0 else {}
        return self.model_copy(update=update)


class ServeConfig(_Section):
    """Online candidate generation, filters and reranking (see serving/)."""

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1  # uvicorn worker processes (each loads the model; see README for how many)
    candidates: int = 200  # FAISS candidates the reranker reads (max(candidates, k) are fetched)
    k: int = 10
    max_k: int = Field(500, ge=1, le=10_000)  # the largest k a request may ask
    rerank: bool = True
    # The multi-source ranking stage (recsys/ranking.py, fitted by `recsys ranker fit` into <workdir>/ranker):
    # "auto" serves it where its fit chose it on validation over the best single source, "on" always, "off" never
    ranker: Literal["auto", "on", "off"] = "auto"
    faiss_index: Literal["auto", "flat", "hnsw", "ivf"] = "auto"  # auto: exact up to exact_below items, else IVF
    exact_below: int = 50_000
    target_recall: float = 0.95  # recall@100 vs exact search that an approximate index is tuned to
    use_gpu: bool | None = None  # None: use a GPU index when faiss reports GPUs
    model_alias: str = "champion"
    feature_repo: str = "serve"  # the Feast repository whose online store requests read (a replay uses its own)
    # Keys: also from the environment, RECSYS_API_KEYS / RECSYS_ADMIN_KEYS (comma-separated). Without any
    # key the service refuses to start on a non-loopback host.
    api_keys: list[str] = []
    admin_keys: list[str] = []
    max_body_bytes: int = 1 << 20  # JSON bodies
    max_upload_bytes: int = 20 << 20  # one /search upload (the whole multipart body may hold a few)
    max_uploads: int = 4
    reload_poll_s: float = 1.0  # how often each worker looks for a reload request
    reload_in_child: bool = True  # build a reload's snapshot in a nice-19 child process (serving/prepare.py)
    # Back-pressure: requests one worker takes at once; beyond, 503 + Retry-After at once (counted in /metrics as
    # recsys_shed_total) rather than a queue whose latency grows without bound. 0: no limit.
    max_in_flight: int = Field(64, ge=0)
    # Dynamic batching of /recommend (serving/batching.py): one model thread serves what has queued, up to
    # max_batch at a time; batch_wait_ms > 0 holds a small batch that long for more (0: never wait)
    max_batch: int = Field(32, ge=1, le=1024)
    batch_wait_ms: float = Field(0.0, ge=0, le=50)
    max_searches: int = Field(2, ge=1)  # /search requests one worker takes at once (their own pool); beyond: 503
    search_workers: int = Field(1, ge=1)  # threads embedding /search queries (one embedder lock: more would wait)
    open_docs: bool = False  # /docs and /openapi.json without a key (with keys configured they need one otherwise)


class NightlyConfig(_Section):
    """The nightly batch (recsys/flows/nightly.py) and the failure rule `recsys embed` shares."""

    failure_threshold: float = 0.01  # share of items to embed that may fail before the run refuses to publish
    batch_items: int = 256  # items per committed embedding batch (a kill loses at most one batch)
    engine: Literal["local", "ray"] = "local"
    ray_address: str | None = None  # None: a local Ray; "ray://head:10001" or "auto" for a cluster
    ray_actors: int = 2  # embedder actors (each holds one embedder)
    keep_runs: int = 7  # versioned run folders kept (the published one is never removed)
    # An item whose embedding fails this many runs in a row (same content) is quarantined: listed in the summary
    # and the dead letters, not retried until its content changes, and not counted in the failure rate.
    quarantine_after: int = Field(3, ge=1)


class ArmConfig(_Section):
    """One arm: the registered version it serves (an alias or a version number) and its traffic share."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    alias: str | None = None  # default: serve.model_alias
    version: str | None = Field(None, pattern=r"^\d+$")
    share: float = Field(0.5, gt=0, le=1)


class GuardrailConfig(_Section):
    """``[experiment.guardrails]``: what the treatment may not make worse, named before launch and tested in the
    report on the logs (serving/experiments.py logs each reply's latency, fallback and errors)."""

    latency_p99_ms: float | None = Field(100.0, gt=0)  # each arm's p99 of the model's time per reply
    error_rate_increase: float = Field(0.005, ge=0)  # treatment's error rate over control's, at most
    fallback_rate_increase: float = Field(0.05, ge=0)  # replies answered by a fallback (popularity, ...), at most
    coverage_drop: float = Field(0.2, ge=0, le=1)  # distinct items shown, relative to control's, may fall by at most


class ExperimentConfig(_Section):
    """An online experiment in the service (serving/experiments.py). No name: no experiment; every reply
    still carries a request id and is logged when ``log`` is on."""

    name: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    arms: list[ArmConfig] = []
    salt: str = "recsys"  # change it to re-randomize users for a new experiment
    mode: Literal["ab", "interleave"] = "ab"  # interleave: team-draft of the first two arms in one reply
    explore: Literal["none", "softmax"] = "none"  # softmax: sample the shown list from the top explore_pool
    temperature: float = Field(0.05, gt=0)  # softmax temperature on the arm's scores
    explore_pool: int = Field(50, ge=1, le=500)
    log: bool = True  # write exposure and outcome logs
    log_dir: Path | None = None  # default: <workdir>/experiments/logs
    flush_rows: int = 500  # a log part file is written every this many rows ...
    flush_s: float = 5.0  # ... or this many seconds, whichever comes first
    # Pre-registration: the decision metric, the others (read with a multiple-testing correction), the smallest
    # relative effect worth detecting (sizes the plan and the sequential test's prior), the error rate, guardrails
    primary_metric: Literal["clicks", "hit", "ndcg", "engagement_rate"] = "clicks"
    secondary_metrics: list[Literal["clicks", "hit", "ndcg", "engagement_rate"]] = ["hit", "ndcg", "engagement_rate"]
    mde: float = Field(0.05, gt=0, lt=10)  # relative to the control's mean
    alpha: float = Field(0.05, gt=0, lt=0.5)
    power: float = Field(0.8, gt=0.5, lt=1)
    days: int = Field(14, ge=1, le=365)  # the planned duration: one look a day, the group-sequential test's horizon
    guardrails: GuardrailConfig = Field(default_factory=GuardrailConfig)

    @model_validator(mode="after")
    def _arms_add_up(self) -> "ExperimentConfig":
        total = sum(a.share for a in self.arms)
        if self.name and (len(self.arms) < 2 or abs(total - 1.0) > 1e-6):
            raise ValueError(f"experiment {self.name!r} needs two or more arms whose shares sum to 1 (got {total:g})")
        if len({a.name for a in self.arms}) != len(self.arms):
            raise ValueError(f"experiment {self.name!r}: arm names must differ")
        return self


class EvalConfig(_Section):
    """The evaluation protocols of design.md."""

    # TEMPORAL (a global time cut: the production-like question) beside LOO and COLD; `--protocols` picks fewer
    protocols: list[Literal["loo", "cold", "temporal"]] = ["loo", "cold", "temporal"]
    ks: list[int] = [10, 50]
    bootstrap: int = 1000
    cold_fraction: float = 0.2
    # which items COLD may hold out: "auto" = items with an image when any item has one (MovieLens without
    # posters: the movies that have one), else all; or explicitly all items, or those with a given part
    cold_pool: Literal["auto", "all", "text", "image", "audio", "video"] = "auto"
    temporal_quantile: float = 0.9
    holdout_share: float = Field(0.2, gt=0, lt=1)  # holdout (the experiment simulator's split): each user's last 20%
    ease_lambdas: list[float] = [20.0, 50.0, 100.0, 250.0, 500.0, 1000.0]
    seed: int = 0


class RankerConfig(_Section):
    """The multi-source ranking stage's fit (recsys/ranking.py): each user's last ``val_rounds`` interactions
    are validation questions, the ``train_rounds`` before them train the ranker."""

    val_rounds: int = Field(5, ge=1)
    train_rounds: int = Field(10, ge=1)
    per_source: int = Field(50, ge=1)  # candidates each source adds (4 sources: up to 200 slots)
    ease_lambdas: list[float] = [2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 250.0, 500.0, 1000.0]


class Config(_Section):
    """Everything a run needs. All files a run writes go under ``workdir``."""

    workdir: Path = Path("work")
    data: DataConfig = Field(default_factory=DataConfig)
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    nightly: NightlyConfig = Field(default_factory=NightlyConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ranker: RankerConfig = Field(default_factory=RankerConfig)
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    mlflow_tracking_uri: str | None = None  # default: sqlite:///<workdir>/mlflow.db
    mlflow_experiment: str = "recsys"

    @classmethod
    def load(cls, path: str | Path | None = None, base: dict | None = None, **overrides: Any) -> "Config":
        """``base`` (e.g. a work directory's saved configuration), a TOML file's sections layered on it, then
        keyword overrides, section by section."""
        raw: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (base or {}).items()}
        if path is not None:  # the file's sections layered on the base, field by field (lists replaced whole)
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"no configuration file {path}")
            raw = _layered(raw, tomllib.loads(path.read_text()))
        for key, value in overrides.items():
            if value is None:
                continue
            if isinstance(value, dict):
                raw.setdefault(key, {}).update({k: v for k, v in value.items() if v is not None})
            else:
                raw[key] = value
        return cls.model_validate(raw)

    # Paths every stage agrees on -------------------------------------------------------------
    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{(self.workdir / 'mlflow.db').resolve()}"

    @property
    def experiment_logs(self) -> Path:
        return self.experiment.log_dir or self.workdir / "experiments" / "logs"

    @property
    def feast_dir(self) -> Path:
        return self.workdir / "feast"

    @property
    def cache_dir(self) -> Path:
        return self.workdir / "cache"

    @property
    def models_dir(self) -> Path:
        return self.workdir / "models"

    def save(self) -> Path:
        """The run's configuration next to its results (``<workdir>/config.json``: later verbs on the work
        directory and the A/B notebook reload it)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "config.json"
        path.write_text(self.model_dump_json(indent=2))
        return path

    def with_train(self, **updates) -> "Config":
        """A copy with ``train`` fields replaced (e.g. one screened ``newest_items`` value; ``cold_<field>`` sets
        ``cold.<field>``), validated."""
        train = TrainConfig.model_validate({**self.train.model_dump(exclude={"cold"}), "cold": self.train.cold.model_dump(),
                                            **updates})
        return self.model_copy(update={"train": train})

    def with_item_input(self, mode: str) -> "Config":
        """A copy whose ``embedder.item_input`` is ``mode`` (recsys.embed.item_input)."""
        return self.model_copy(update={"embedder": self.embedder.model_copy(update={"item_input": mode})})
