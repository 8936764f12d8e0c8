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
    asks_gpus = any(m.get("deployment", {}).get("num_gpus", 0) > 0
                    for a in serve_config()["applications"] for m in a["args"]["models"])
    reserves = any("nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in workers)
    assert reserves == asks_gpus  # no GPU reserved that no deployment asks for, and none missing
    assert rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "batchserve:0.1.0"


def test_dockerfile_builds_the_image_the_rayservice_names(tmp_path):
    """The Dockerfile's install step, run here without Docker: the same pip line builds the wheel,
    and the wheel holds the service (no benchmarks, no tests)."""
    from tests.helpers import build_wheel

    docker = (ROOT / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-py311" in docker
    assert 'pip install --no-cache-dir "/srv/batchserve[cpu]"' in docker
    names = build_wheel(tmp_path)
    assert "deployments/builder.py" in names and "app/config/__init__.py" in names
    tops = {n.split("/")[0] for n in names}
    assert not {t for t in tops if t in ("bench", "tests")}, tops
    assert not [n for n in names if "/bench/" in n or n.endswith("noop.py")]


def test_cluster_launcher_distributes_the_auth_token():
    doc = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    assert "~/.ray/auth_token" in doc["file_mounts"]
    head = " ".join(doc["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "auth_token" in head and "exit 1" in head
    assert all("RAY_SERVE_ENABLE_HA_PROXY=1" in c for c in doc["head_start_ray_commands"] if "ray start" in c)


def test_every_cluster_file_that_starts_haproxy_spreads_arrivals_round_robin():
    """The slot gate's overload rule needs each ingress replica to get its part of the arrivals
    (deployments/slot_gate.py); Serve's default leastconn starves a full ingress of them."""
    launcher = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in launcher[key]
              if "ray start" in c]
    assert starts and all("RAY_SERVE_HAPROXY_BALANCE_ALGORITHM=roundrobin" in c for c in starts)
    service = (ROOT / "cluster" / "rayservice.yaml").read_text()
    assert "RAY_SERVE_HAPROXY_BALANCE_ALGORITHM\n              value: roundrobin" in service
    first_command = (ROOT / "README.md").read_text().split("```")[1]
    assert "RAY_SERVE_HAPROXY_BALANCE_ALGORITHM=roundrobin" in first_command.splitlines()[1]


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
