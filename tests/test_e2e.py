"""The demo flow end to end on a slice of ml-latest-small, then the HTTP service on what it produced."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from recsys.cli import app as cli
from tests.conftest import small_config

pytestmark = pytest.mark.slow  # every test here reads the demo fixture (the whole flow, ~2 minutes)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from recsys.flows.demo import run_demo

    cfg = small_config(tmp_path_factory.mktemp("demo"), data={"max_users": 60}, eval={"protocols": ["loo", "cold"]})
    report = run_demo(cfg, sample_users=2)
    return cfg, report


def test_demo_runs_every_stage_and_reports(demo):
    cfg, report = demo
    assert set(report["timings_s"]) >= {"load data", "embed catalog", "train + evaluate: loo", "train + evaluate: cold"}
    models = {(r["protocol"], r["model"]) for r in report["results"]}
    assert {("loo", "two-tower"), ("loo", "popularity"), ("loo", "ease"), ("loo", "sasrec"), ("cold", "two-tower"),
            ("loo", "two-tower + rerank"), ("loo", "content-knn (text)"), ("loo", "content-knn (fused)"),
            ("cold", "content-knn (text)"), ("cold", "content-knn (fused)")} <= models
    # on COLD, popularity, EASE and SASRec are one honest "random" row, not three rows named as models
    assert not {("cold", "popularity"), ("cold", "ease"), ("cold", "sasrec")} & models
    assert any(p == "cold" and m.startswith("random (") for p, m in models)
    loo_extra = next(r for r in report["results"] if r["protocol"] == "loo" and r["model"] == "two-tower")["extra"]
    diffs = loo_extra["two_tower_minus"]
    assert {"ease", "sasrec", "popularity"} <= set(diffs)
    assert all(d["NDCG@10"]["low"] <= d["NDCG@10"]["mean"] <= d["NDCG@10"]["high"] for d in diffs.values())
    assert loo_extra["sasrec"]["epochs"] >= 1 and loo_extra["sasrec"]["val_ndcg10"]
    loo = next(r for r in report["results"] if r["protocol"] == "loo" and r["model"] == "two-tower")
    check = loo["extra"]["rerank_val"]  # rerank-or-not is decided on validation, never on test
    assert check["helps"] == (check["reranked_ndcg10"] > check["retrieval_ndcg10"]) and check["users"] > 0
    for r in report["results"]:
        assert 0 <= r["HR@10"]["low"] <= r["HR@10"]["mean"] <= r["HR@10"]["high"] <= 1
    for protocol in ("loo", "cold"):  # text only (no posters here): the item input has nothing to choose from
        assert report["item_input"][protocol]["chosen"] == "fused"
        assert set(report["item_input"][protocol]["val_ndcg10"]) == {"fused"}
    saved = json.loads((cfg.workdir / "report" / "demo.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"], default=str))
    # everything it wrote is under the work directory
    assert (cfg.workdir / "mlflow.db").exists() and (cfg.workdir / "feast" / "serve" / "data" / "online_store.db").exists()


def test_the_demo_runs_temporal_beside_loo_and_cold_by_default(tmp_path, synthetic_dir):
    """The default protocols are all three (the 60-user MovieLens slice above has 3 users across any time cut, so
    TEMPORAL runs here on the synthetic catalog): each is a stage with its own rows, users and intervals."""
    from recsys.config import EvalConfig
    from recsys.flows.demo import run_demo

    assert EvalConfig().protocols == ["loo", "cold", "temporal"]
    cfg = small_config(tmp_path, data={"source": "generic", "path": str(synthetic_dir)},
                       eval={"protocols": EvalConfig().protocols})
    report = run_demo(cfg, sample_users=1)
    assert "train + evaluate: temporal" in report["timings_s"] and "train + evaluate: loo" in report["timings_s"]
    temporal = {r["model"]: r for r in report["results"] if r["protocol"] == "temporal"}
    assert {"two-tower", "popularity", "ease", "sasrec"} <= set(temporal) and "two-tower + rerank" not in temporal
    tt = temporal["two-tower"]
    assert tt["users"] >= 20 and tt["HR@10"]["low"] <= tt["HR@10"]["mean"] <= tt["HR@10"]["high"]
    assert {"ease", "sasrec", "popularity"} <= set(tt["extra"]["two_tower_minus"])


def test_registered_model_has_towers_vectors_and_alias(demo):
    import mlflow

    cfg, _ = demo
    mlflow.set_tracking_uri(cfg.tracking_uri)
    client = mlflow.tracking.MlflowClient()
    mv = client.get_model_version_by_alias(cfg.train.registered_model, "champion")
    artifacts = {a.path for a in client.list_artifacts(mv.run_id, "two_tower")}
    assert {"two_tower/item_vectors.npz", "two_tower/two_tower.json", "two_tower/reranker.joblib"} <= artifacts
    run = client.get_run(mv.run_id)
    assert "val/NDCG10" in run.data.metrics and run.data.params["protocol"] == "loo"
    model_info = mlflow.models.get_model_info(f"runs:/{mv.run_id}/item_tower")
    assert model_info.signature is not None


def test_evaluate_reloads_each_protocols_kept_model_with_the_item_input_it_reads(demo):
    from recsys.flows.saved import evaluate_saved

    cfg, report = demo
    runs = {r.protocol: r for r in evaluate_saved(cfg, baselines=())}
    for protocol in ("loo", "cold"):
        demo_row = next(r for r in report["results"] if r["protocol"] == protocol and r["model"] == "two-tower")
        again = runs[protocol].results[0]
        assert again.model == "two-tower"
        assert again.estimates["NDCG@10"].mean == pytest.approx(demo_row["NDCG@10"]["mean"], abs=1e-6), protocol
        assert again.estimates["HR@10"].mean == pytest.approx(demo_row["HR@10"]["mean"], abs=1e-6), protocol


def test_http_service(demo):
    from serving.app import create_app

    cfg, _ = demo
    with TestClient(create_app(cfg)) as client:
        _check_service(client, demo)


def _check_service(client, demo):
    import time

    for _ in range(300):  # the model loads in the background; /readyz says when it is in
        if client.get("/readyz").status_code == 200:
            break
        time.sleep(0.2)
    assert client.get("/healthz").json()["status"] == "ok"
    r = client.get("/recommend/1?k=5")
    assert r.status_code == 200
    body = r.json()
    assert len(body["items"]) == 5 and body["known_user"]
    helps = next(r for r in demo[1]["results"] if r["model"] == "two-tower")["extra"]["rerank_val"]["helps"]
    assert body["reranked"] == helps  # by default, the reranker only where validation says it helps
    forced = client.post("/recommend", json={"user_id": "1", "k": 5, "rerank": True}).json()
    off = client.post("/recommend", json={"user_id": "1", "k": 5, "rerank": False}).json()
    assert forced["reranked"] and "rerank_ms" in forced["timings_ms"] and not off["reranked"]
    ids = {name: [i["item_id"] for i in reply["items"]] for name, reply in (("default", body), ("forced", forced), ("off", off))}
    assert ids["default"] == ids["forced" if helps else "off"]
    seen = {i["item_id"] for i in body["items"]}
    r2 = client.post("/recommend", json={"user_id": "1", "k": 5, "exclude": list(seen)})
    assert not seen & {i["item_id"] for i in r2.json()["items"]}
    unknown = client.get("/recommend/nobody-at-all?k=3").json()
    assert not unknown["known_user"] and unknown["fallback"] == "popularity" and len(unknown["items"]) == 3
    assert client.get("/recommend/1?k=0").status_code == 422
    assert client.post("/recommend", json={"user_id": "", "k": 5}).status_code == 422
    assert client.post("/recommend", json={"user_id": "1", "modalities": ["smell"]}).status_code == 422
    assert client.post("/interactions", json={"user_id": "1", "item_id": "no-such-item"}).status_code == 404
    assert client.post("/interactions", json={"user_id": "1", "item_id": "2"}).status_code == 202
    after = client.get("/recommend/1?k=50").json()
    assert "2" not in {i["item_id"] for i in after["items"]}  # just interacted: now in the recent items


def test_ab_notebook_compares_champion_and_challenger(demo, monkeypatch):
    """Train a challenger (other settings) through the CLI, then execute the A/B notebook on both."""
    import nbformat
    from nbclient import NotebookClient

    from recsys.config import PROJECT_DIR

    cfg, _ = demo
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "--workdir", str(cfg.workdir), "--max-users", "60", "--epochs", "1",
                                 "--protocols", "loo", "--alias", "challenger"])
    assert result.exit_code == 0, result.output
    nb = nbformat.read(PROJECT_DIR / "notebooks" / "ab_analysis.ipynb", as_version=4)
    monkeypatch.setenv("RECSYS_WORKDIR", str(cfg.workdir))
    monkeypatch.setenv("RECSYS_AB_BOOT", "200")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(PROJECT_DIR / "notebooks")}}).execute()
    report = json.loads((cfg.workdir / "report" / "ab_analysis.json").read_text())
    assert "champion" in report["a"] and "challenger" in report["b"]
    assert {d["metric"] for d in report["difference"]} == {"HR@10", "Recall@10", "Recall@50", "NDCG@10"}
    assert (cfg.workdir / "report" / "ab_analysis.png").stat().st_size > 10_000
    segs = {(s["segment"], s["arm"]) for s in report["item_segments"]}
    assert {("popularity", "champion"), ("modality", "challenger")} <= segs
