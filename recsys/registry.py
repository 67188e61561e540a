"""Reading a registered two-tower version from the MLflow registry, as :mod:`recsys.contract` defines it.

Serving (``serving/snapshot.py``), the nightly's index stage and the offline replays all read a model through
:func:`read_registered`, so none of them needs the others' code, and each meets a model written under another
contract with the same :class:`~recsys.contract.ContractError`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recsys import contract
from recsys.config import Config


@dataclass
class Registered:
    """One registered version's artifacts, downloaded to ``folder`` and checked against the contract."""

    name: str
    version: str
    run_id: str
    config: dict  # two_tower.json
    layout: contract.VectorLayout
    _folder: Path | None = None

    @property
    def folder(self) -> Path:
        """The run's ARTIFACT_PATH folder, downloaded on first use (a version or config lookup needs only the
        config file)."""
        if self._folder is None:
            import mlflow

            self._folder = Path(mlflow.artifacts.download_artifacts(run_id=self.run_id,
                                                                    artifact_path=contract.ARTIFACT_PATH))
        return self._folder

    def arrays(self) -> dict[str, np.ndarray]:
        """The item vectors file's arrays (contract.ITEM_VECTOR_ARRAYS); ``queries`` is empty when absent."""
        with np.load(self.folder / contract.ITEM_VECTORS_FILE, allow_pickle=False) as a:
            out = {k: a[k] for k in a.files}
        out.setdefault("queries", np.zeros((0, out["vectors"].shape[1]), np.float32))
        return out

    def file(self, name: str) -> Path | None:
        """One of the run's artifact files (contract.*_FILE), None when the run has none."""
        path = self.folder / name
        return path if path.exists() else None

    def user_tower(self):
        """The exported user tower (a torch.export program's module)."""
        import torch

        path = self.file(contract.USER_TOWER_FILE)
        if path is None:
            raise FileNotFoundError(f"model {self.name} v{self.version} has no exported user tower (retrain it)")
        return torch.export.load(str(path)).module()

    def item_tower(self):
        """The item tower as logged (an MLflow pytorch model), in eval mode on the CPU."""
        import mlflow

        return mlflow.pytorch.load_model(f"runs:/{self.run_id}/{contract.ITEM_TOWER_MODEL}", map_location="cpu").eval()


def read_registered(cfg: Config, alias: str | None = None, version: str | None = None, check: bool = True) -> Registered:
    """The version ``version``, else the one ``alias`` (default ``serve.model_alias``) points at. ``check``
    False reads a model of another contract too (for its version and configuration only).

    Raises:
        mlflow.exceptions.MlflowException: no such model, version or alias.
        ContractError: the model was written under another contract."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking_uri)
    client = mlflow.tracking.MlflowClient()
    name = cfg.train.registered_model
    mv = client.get_model_version(name, version) if version else \
        client.get_model_version_by_alias(name, alias or cfg.serve.model_alias)
    config_path = mlflow.artifacts.download_artifacts(run_id=mv.run_id,
                                                      artifact_path=f"{contract.ARTIFACT_PATH}/{contract.CONFIG_FILE}")
    config = json.loads(Path(config_path).read_text())
    layout = contract.check(config, where=f"model {name} v{mv.version}") if check else \
        contract.VectorLayout.from_tower(config["tower"])
    return Registered(name, str(mv.version), mv.run_id, config, layout)


def registered_or_none(cfg: Config, alias: str | None = None, check: bool = True) -> Registered | None:
    """:func:`read_registered` for the alias, None when the registry has no such model or alias yet."""
    try:
        return read_registered(cfg, alias, check=check)
    except Exception as exc:
        if no_model_registered(exc):
            return None
        raise


def no_model_registered(exc: BaseException) -> bool:
    """The registry has no such model, version or alias (MLflow's RESOURCE_DOES_NOT_EXIST)."""
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"
