"""The cluster files parse, and the RayService serves exactly what serve_config.yaml declares."""

import json

import yaml
from ray.serve.schema import ServeDeploySchema

from tests.helpers import ROOT, serve_config


def test_rayservice_embeds_serve_config_applications():
    rs = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())
    assert rs["kind"] == "RayService" and rs["apiVersion"] == "ray.io/v1"
    embedded = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert embedded["applications"] == serve_config()["applications"]
    ServeDeploySchema.model_validate(embedded)  # a config Serve itself accepts
    workers = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert any("nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in workers)


def test_cluster_launcher_yaml_parses_with_cpu_head_and_gpu_workers():
    doc = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    types = doc["available_node_types"]
    assert "GPU" not in types[doc["head_node_type"]]["resources"]
    assert any(t["resources"].get("GPU", 0) > 0 for t in types.values())
    assert any("--metrics-export-port" in c for c in doc["head_start_ray_commands"])


def test_prometheus_and_dashboard_parse():
    prom = yaml.safe_load((ROOT / "cluster" / "prometheus.yml").read_text())
    sd = prom["scrape_configs"][0]["file_sd_configs"][0]["files"][0]
    assert sd.endswith("prom_metrics_service_discovery.json")
    dash = json.loads((ROOT / "cluster" / "grafana-dashboard.json").read_text())
    assert dash["panels"] and all(p["targets"] for p in dash["panels"])


def test_repo_configs_are_valid_serve_configs():
    from app.config import parse_app_args

    for name in ("serve_config.yaml", "serve_config.parallel.yaml", "serve_config.fast.yaml", "serve_config.split.yaml"):
        doc = yaml.safe_load((ROOT / name).read_text())
        ServeDeploySchema.model_validate(doc)
        for app in doc["applications"]:
            parse_app_args(app["args"])  # the app's own validation, as `serve run` would apply it
