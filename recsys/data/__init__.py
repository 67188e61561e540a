"""Catalogs and interactions: typed containers and loaders (MovieLens, generic folder, synthetic)."""

from recsys.data.generic import load_folder, load_generic
from recsys.data.movielens import load_movielens
from recsys.data.synthetic import SyntheticSpec, generate, load_synthetic
from recsys.data.types import Catalog, Dataset, Interactions, LoadReport

__all__ = [
    "Catalog", "Dataset", "Interactions", "LoadReport", "SyntheticSpec",
    "generate", "load_folder", "load_generic", "load_movielens", "load_synthetic", "load_dataset",
]


def load_dataset(cfg) -> Dataset:
    """Load what ``cfg.data`` names (a :class:`recsys.config.Config` or its ``data`` section)."""
    data = getattr(cfg, "data", cfg)
    if data.source == "movielens":
        ds = load_movielens(data.path, posters=data.posters, max_tags_per_item=data.max_tags_per_item)
    elif data.source == "generic":
        if data.path is None:
            raise ValueError("data.path must name the folder of a generic-format dataset")
        ds = load_folder(data.path)
    else:
        if data.path is None:
            raise ValueError("data.path must name the folder to write the synthetic dataset to")
        ds = load_synthetic(data.path)
    return ds.with_users(data.max_users)
