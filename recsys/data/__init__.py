"""Catalogs and interactions: typed containers and loaders (MovieLens, generic folder, synthetic)."""

from recsys.data.generic import load_folder, load_generic
from recsys.data.movielens import load_movielens
from recsys.data.synthetic import SyntheticSpec, generate, load_synthetic
from recsys.data.types import Catalog, Dataset, Interactions, LoadReport
from recsys.errors import DataError

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
            raise DataError("data.path must name the folder of a generic-format dataset (--data DIR)")
        ds = load_folder(data.path, check_media=data.check_media)
    else:
        if data.path is None:
            raise DataError("data.path must name the folder to write the synthetic dataset to (--data DIR)")
        ds = load_synthetic(data.path)
    return ds.with_users(data.max_users)


def describe_source(cfg) -> str:
    """One line saying which dataset a command is using."""
    data = getattr(cfg, "data", cfg)
    if data.source == "movielens":
        where = data.path or "the bundled ml-latest-small"
        return f"dataset: movielens ({where}{', posters from ' + str(data.posters) if data.posters else ''})"
    return f"dataset: {data.source} ({data.path})"
