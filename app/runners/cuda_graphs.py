"""CUDA graphs for an encoder's forward pass, one per (batch bucket, sequence bucket).

A small batch of BERT-base is launch-bound: ~150 kernels at a few microseconds of CPU each cost more
than the math. A captured graph replays all of them with one launch. Shapes are static in a graph,
so a batch is padded up to the nearest bucket (extra rows and positions carry attention mask 0 and
are sliced off), and each bucket owns fixed input buffers that a batch is copied into.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from typing import Callable, Sequence

import torch

logger = logging.getLogger(__name__)


def default_batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then four buckets per doubling (16, 24, 32, 40, 48, 56, 64, 80, ...), and the cap.

    Powers of two padded a batch of 33 to 64 rows: the GPU spent half of a gathered batch's time on
    padding (README "The front-end/engine split"). With these steps a batch past 16 rows, where the
    cost grows with the rows, pads by less than a third (less than a fifth from 64 up), for about
    twice the graphs (15 instead of 8 up to 128); vLLM's capture sizes step by 8 likewise."""
    out, b = [], 1
    while b < min(max_batch, 16):
        out.append(b)
        b *= 2
    while b < max_batch:
        out.append(b)
        b += max(8, 1 << (b.bit_length() - 3))  # a quarter of the power of two at or below b
    return out + [max_batch]


def default_seq_buckets(max_seq_len: int, step: int = 32) -> list[int]:
    return sorted({*range(step, max_seq_len, step), max_seq_len})


def to_host(out: torch.Tensor, blocking: bool) -> torch.Tensor:
    """`out` as float32 on the CPU. `blocking`: copy asynchronously into pinned memory and wait on
    an event created with the blocking-sync flag, so the calling thread sleeps rather than spinning
    (CUDA spins while waiting whenever the process has fewer contexts than there are cores)."""
    out = out.float()
    if out.device.type != "cuda" or not blocking:
        return out.cpu()
    host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
    host.copy_(out, non_blocking=True)
    done = torch.cuda.Event(blocking=True)
    done.record()
    done.synchronize()
    return host


class _Graph:
    """One bucket's graph and its fixed buffers. The batch is padded on the host into a pinned
    staging buffer (ids and mask side by side) and crosses to the device in one copy; the output
    comes back into a pinned buffer: a replay is five CUDA calls from Python."""

    def __init__(self, batch: int, seq: int, device: torch.device, blocking: bool):
        self.inputs = torch.zeros(2, batch, seq, dtype=torch.long, device=device)
        self.ids, self.mask = self.inputs[0], self.inputs[1]  # what the graph reads
        self.staging = torch.zeros(2, batch, seq, dtype=torch.long).pin_memory()
        self.staging_np = self.staging.numpy()
        self.graph = torch.cuda.CUDAGraph()
        self.out: torch.Tensor | None = None  # float32 [batch, D] on the device, written by the graph
        self.host_out: torch.Tensor | None = None
        self.done = torch.cuda.Event(blocking=blocking)


class GraphedForward:
    """`forward(ids, mask) -> [B, D]` replayed from CUDA graphs; None when a batch fits no bucket."""

    def __init__(self, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device,
                 batch_buckets: Sequence[int], seq_buckets: Sequence[int], blocking_sync: bool = True):
        self.forward = forward
        self.blocking_sync = blocking_sync
        self.device = device
        self.batch_buckets = sorted(set(batch_buckets))
        self.seq_buckets = sorted(set(seq_buckets))
        self._graphs: dict[tuple[int, int], _Graph] = {}
        # A bucket's input buffers and output are shared state: one batch at a time per replica
        # (tokenisation of the next batch still overlaps, it happens before this lock).
        self._lock = threading.Lock()

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every bucket, largest first so smaller graphs reuse the shared memory pool."""
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for b in reversed(self.batch_buckets):
            for s in reversed(self.seq_buckets):
                g = _Graph(b, s, self.device, self.blocking_sync)
                g.mask[:, 0] = 1
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up outside the graph: lazy inits, cuBLAS workspaces
                        self.forward(g.ids, g.mask)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                with torch.cuda.graph(g.graph, pool=pool):
                    g.out = self.forward(g.ids, g.mask).float()
                g.host_out = torch.empty(g.out.shape, dtype=torch.float32).pin_memory()
                self._graphs[(b, s)] = g
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def bucket(self, batch: int, seq: int) -> tuple[int, int] | None:
        i = bisect.bisect_left(self.batch_buckets, batch)
        j = bisect.bisect_left(self.seq_buckets, seq)
        if i == len(self.batch_buckets) or j == len(self.seq_buckets):
            return None
        return self.batch_buckets[i], self.seq_buckets[j]

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """Float32 outputs on the CPU for the real rows, or None if (B, L) exceeds every bucket."""
        b, s = ids.shape
        key = self.bucket(b, s)
        if key is None:
            return None
        g = self._graphs[key]
        # Every torch call below releases the GIL and must win it back, which under a busy event
        # loop costs up to a switch interval each: the padding is numpy on the pinned host buffer
        # (the old path made 15 torch calls per batch; a split's model server measured ~0.4 ms each).
        with self._lock:
            staged = g.staging_np
            staged.fill(0)
            staged[0, :b, :s] = ids.numpy()
            staged[1, :b, :s] = mask.numpy()
            staged[1, b:, 0] = 1  # padding rows attend to one position rather than none
            g.inputs.copy_(g.staging, non_blocking=True)
            g.graph.replay()
            assert g.out is not None and g.host_out is not None
            g.host_out.copy_(g.out, non_blocking=True)
            g.done.record()
            g.done.synchronize()
            # The pinned buffer is the next batch's too: hand back a copy of this batch's rows.
            return torch.from_numpy(g.host_out.numpy()[:b].copy())

    def __len__(self) -> int:
        return len(self._graphs)
