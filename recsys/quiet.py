"""Keep third-party noise out of what users see: deprecation warnings, framework adverts, INFO chatter and
download bars of libraries we drive. Called by the CLI and the service at start-up (not on import, so a
library user keeps their own warning settings); the messages still reach the log at DEBUG/WARNING level."""

from __future__ import annotations

import logging
import os
import re
import warnings

OURS = re.compile(r"/(recsys|features|training|serving|benchmarks)/")
_show = warnings.showwarning


def _route(message, category, filename, lineno, file=None, line=None):
    """Warnings raised in our code are shown; any other library's go to the log (libraries add their own
    "once"/"default" filters on import, so filters alone do not keep them out)."""
    if OURS.search(filename) and "site-packages" not in filename:
        _show(message, category, filename, lineno, file, line)
    else:
        logging.getLogger("recsys.thirdparty").debug("%s:%s: %s: %s", filename, lineno, category.__name__, message)


def silence() -> None:
    warnings.showwarning = _route
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("FEAST_USAGE", "False")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=r".*(noload|LeafSpec|does not have many workers|log_every_n_steps|"
                                              r"Clearing labels|pickle|litlogger|torch.jit).*")
    try:  # SQLAlchemy's own deprecation class is not a DeprecationWarning subclass
        from sqlalchemy.exc import SADeprecationWarning

        warnings.filterwarnings("ignore", category=SADeprecationWarning)
    except ImportError:
        pass
    for name in ("mlflow", "alembic", "lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "feast",
                 "ray", "ray.data", "sentence_transformers", "transformers", "httpx", "urllib3", "py.warnings",
                 # Lightning sets its package loggers back to INFO when it is imported (after this runs): the
                 # modules that talk ("Seed set to 0", "GPU available", its adverts) are quieted one by one
                 "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.seed", "lightning.pytorch.loggers.mlflow",
                 "pytorch_lightning.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
