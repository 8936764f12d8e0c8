"""The internal request and result types: what the ingress hands a model server and gets back.

Built once at the edge from whichever wire format the client spoke (app/protocols/); nothing
past the ingress knows about JSON, v1 or v2.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class ModelInput:
    """One request's items: either raw texts (tokenised in the replica) or token id lists."""

    texts: Optional[list[str]] = None
    token_ids: Optional[list[list[int]]] = None
    # Client requests these items came from: more than one when the ingress merged them (ingress.gather).
    requests: int = 1
    # Its traffic class (app/config TrafficOptions): realtime batches run first, bulk fills the rest.
    traffic_class: str = "realtime"
    # Where it came from, for the batch's log line and span (app/tracing.py): the ingress span's
    # W3C traceparent and Serve's request id ("" for calls the ingress merged).
    traceparent: str = ""
    request_id: str = ""

    def __len__(self) -> int:
        return len(self.texts) if self.texts is not None else len(self.token_ids or [])

    def split(self, size: int) -> list["ModelInput"]:
        """Chunks of at most `size` items, so no single batch entry exceeds the batch cap."""
        if len(self) <= size:
            return [self]
        if self.texts is not None:
            return [replace(self, texts=self.texts[i : i + size], requests=1) for i in range(0, len(self.texts), size)]
        ids = self.token_ids or []
        return [replace(self, token_ids=ids[i : i + size], requests=1) for i in range(0, len(ids), size)]


@dataclass(frozen=True)
class InferenceResult:
    """What a model server returns for one request."""

    outputs: np.ndarray  # [n_items, dim] float32
    batch_size: int  # items in the largest batch this request's items ran in
    queue_wait_ms: float  # arrival at the replica to batch start (max over chunks)
    batch_ms: float = 0.0  # wall time of the batch run (tokenise + forward), max over chunks
    replica: str = ""  # which replica answered, and on which node (for debugging and scaling tests)
    node: str = ""
    gathered: int = 0  # requests in the ingress's merged call that carried this one (0: not merged)
    link: str = ""  # with gather.transport direct: how the call went, "direct" or "handle" (the fallback)
    batch_id: str = ""  # the device batch it ran in (its last, for a request split over several)
    # Set by the ingress's client (deployments/clients.py), not the model server: the wait for one of
    # the ingress's model slots (slot gate), and the model call's round trip, queue and batch included.
    admission_wait_ms: float = 0.0
    call_ms: float = 0.0

    def timing_headers(self) -> dict[str, str]:
        headers = {
            "X-Batch-Size": str(self.batch_size),
            "X-Queue-Wait-Ms": f"{self.queue_wait_ms:.2f}",
            "X-Batch-Ms": f"{self.batch_ms:.2f}",
            "X-Replica": self.replica,
            "X-Node": self.node,
        }
        if self.batch_id:
            headers["X-Batch-Id"] = self.batch_id
        if self.gathered:
            headers["X-Gathered"] = str(self.gathered)
        if self.link:
            headers["X-Link"] = self.link
        if self.call_ms:
            headers["X-Admission-Wait-Ms"] = f"{self.admission_wait_ms:.2f}"
            headers["X-Model-Call-Ms"] = f"{self.call_ms:.2f}"
        return headers
