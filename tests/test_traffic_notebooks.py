"""The experiment notebooks on the logs a real service writes under real traffic: a small two-tower behind
`uvicorn --factory serving.app:app_from_env` with a configured experiment, driven by returning users over
simulated days (recsys.experiments.traffic): an A/B run with a planted lift, an A/A run, an interleaved run and
an explored A/A run. Each notebook runs top to bottom on them and ends by asserting its own numbers (the A/A
false-positive rate within 5% +- 2%, every off-policy interval covering the greedy run's value)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import small_config
from tests.test_serving import KEY, served

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def experiments(tmp_path_factory):
    from recsys.data.synthetic import SyntheticSpec, generate
    from recsys.experiments.traffic import TrafficSpec, drive
    from recsys.flows.demo import run_demo

    root = tmp_path_factory.mktemp("traffic")
    data = generate(root / "data", SyntheticSpec(n_items=300, n_users=60, mean_interactions=15, seed=7))
    cfg = small_config(root / "work", data={"source": "synthetic", "path": str(data)}, eval={"protocols": ["loo"]},
                       train={"newest_items": 0, "id_embeddings": False})
    run_demo(cfg, sample_users=1)
    ex = root / "experiments"
    ab = [{"name": "control", "share": 0.5}, {"name": "treatment", "share": 0.5}]
    runs = {  # name: (experiment settings, traffic)
        "ab": ({"arms": ab}, TrafficSpec(users=800, days=7, seed=1, effect={"treatment": 0.5}, concurrency=8)),
        "aa": ({"arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5}]},
               TrafficSpec(users=1200, days=7, seed=2, eta=0.0, concurrency=8)),
        "il": ({"arms": ab, "mode": "interleave"}, TrafficSpec(users=300, days=7, seed=3, concurrency=8)),
        "explore": ({"arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5}], "explore": "softmax",
                     "temperature": 0.05}, TrafficSpec(users=1000, days=7, seed=4, eta=0.0, concurrency=8)),
    }
    for name, (exp, spec) in runs.items():
        settings = {"name": f"nb-{name}", "salt": f"nb-{name}", "log_dir": str(ex / name / "logs"), "flush_s": 0.5, **exp}
        with served(cfg.model_copy(update={"experiment": cfg.experiment.model_validate(settings)})) as base:
            run = drive(base, spec, headers={"X-API-Key": KEY})
        assert run.errors == 0, (name, run)
    return ex


@pytest.mark.parametrize("name", ["ab_test", "interleaving", "off_policy"])
def test_notebooks_run_top_to_bottom_on_real_traffic_logs(experiments, name, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    os.environ["RECSYS_EXPERIMENTS"] = str(experiments)
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ.pop("RECSYS_EXPERIMENTS", None)
    outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Traceback" not in outputs
    assert "CHECKS PASSED" in outputs  # each notebook ends by asserting the numbers it produced
