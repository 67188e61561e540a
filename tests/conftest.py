"""Shared fixtures. Tests that need ../shared/data skip with a message where it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from recsys.config import SHARED_DATA, Config  # noqa: E402

POSTERS = SHARED_DATA / "movielens-posters"
FSDD = SHARED_DATA / "fsdd" / "recordings"
MICROLENS = SHARED_DATA / "microlens-sample"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs the shared data folder {path} (absent on this machine)")
    return path


@pytest.fixture(scope="session")
def posters() -> Path:
    return need(POSTERS)


@pytest.fixture(scope="session")
def fsdd() -> Path:
    return need(FSDD)


@pytest.fixture(scope="session")
def microlens() -> Path:
    return need(MICROLENS)


@pytest.fixture(scope="session")
def movielens():
    from recsys.data import load_movielens

    return load_movielens()


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    from recsys.data.synthetic import SyntheticSpec, generate

    return generate(tmp_path_factory.mktemp("synthetic"), SyntheticSpec(n_items=120, n_users=80, seed=3))


@pytest.fixture(scope="session")
def synthetic(synthetic_dir):
    from recsys.data import load_folder

    return load_folder(synthetic_dir, name="synthetic")


@pytest.fixture(scope="session")
def embedder(tmp_path_factory):
    """The shipped local embedder with a per-session cache."""
    from recsys.embed.local import LocalEmbedder

    return LocalEmbedder(cache_dir=tmp_path_factory.mktemp("embed-cache"))


@pytest.fixture(scope="session")
def redis_connection():
    """A real redis-server: RECSYS_TEST_REDIS_URL (host:port, started by .ci/run) or one started here."""
    from features.local_redis import redis_server

    with redis_server() as url:
        if url is None:
            pytest.skip("needs redis-server (apt-get install redis-server) or RECSYS_TEST_REDIS_URL")
        yield url


def small_config(workdir: Path, **sections) -> Config:
    """A quick configuration: few epochs, a small bootstrap."""
    base = {"workdir": str(workdir), "train": {"max_epochs": 2, "batch_size": 256, "mixed_negatives": 256, "newest_items": 0,
                       "id_embeddings": False},
            "eval": {"bootstrap": 100, "protocols": ["loo", "cold"]}}  # the default adds temporal: tests pin their own
    for k, v in sections.items():
        base.setdefault(k, {}).update(v) if isinstance(v, dict) else base.__setitem__(k, v)
    return Config.model_validate(base)
