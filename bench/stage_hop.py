"""Time per hop of the channel between pipeline stages (app/models/generation_stages.py): one
torch.distributed send of a step's hidden states from one stage process to the next, and the
logits broadcast back, as gloo carries them on a CPU machine.

    python -m bench.stage_hop --tokens 1,16,64,512 --hidden 64,2048 --out DIR

Two processes; each size is a ping-pong (send, then receive it back) repeated --reps times after a
warm-up: a hop is half the median round trip. Prints a table and writes hop.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _pingpong(rank: int, port: int, sizes: list[tuple[int, int]], reps: int, out: "mp.Queue") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    rows = []
    for tokens, hidden in sizes:
        x = torch.randn(tokens, hidden)
        times = []
        for i in range(reps + 5):
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(x, dst=1)
                dist.recv(x, src=1)
            else:
                dist.recv(x, src=0)
                dist.send(x, dst=0)
            if i >= 5:
                times.append(time.perf_counter() - t0)
        times.sort()
        rows.append({"tokens": tokens, "hidden": hidden, "bytes": x.numel() * 4,
                     "hop_us": times[len(times) // 2] / 2 * 1e6, "hop_p90_us": times[int(len(times) * 0.9)] / 2 * 1e6})
    if rank == 0:
        out.put(rows)
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,16,64,512")
    ap.add_argument("--hidden", default="64,2048")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", default=None)
    ns = ap.parse_args()
    sizes = [(int(t), int(h)) for h in ns.hidden.split(",") for t in ns.tokens.split(",")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_pingpong, args=(r, port, sizes, ns.reps, q)) for r in range(2)]
    for p in procs:
        p.start()
    rows = q.get(timeout=600)
    for p in procs:
        p.join(60)
    print(f"{'tokens':>8}{'hidden':>8}{'bytes':>12}{'hop us p50':>12}{'p90':>10}")
    for r in rows:
        print(f"{r['tokens']:>8}{r['hidden']:>8}{r['bytes']:>12}{r['hop_us']:>12.1f}{r['hop_p90_us']:>10.1f}")
    if ns.out:
        Path(ns.out).mkdir(parents=True, exist_ok=True)
        (Path(ns.out) / "hop.json").write_text(json.dumps({"args": vars(ns), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
