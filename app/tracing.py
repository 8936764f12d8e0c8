"""W3C trace context through the batch, with OpenTelemetry (README "Traces").

The ingress honours a request's `traceparent` (or starts a trace), opens one server span per
request and answers with that span's `traceparent`; the request carries it to the model server,
where each device batch opens a span *linked* to every request it served (OpenTelemetry's pattern
for work done for many traces at once) and writes one log line naming each request's id, trace
id and class beside the batch id.

Spans are exported only where an exporter is configured: `OTEL_EXPORTER_OTLP_ENDPOINT` set and
the `opentelemetry-exporter-otlp` package installed. Without one the ids still travel, and land in
headers and logs. Each process holds its own TracerProvider (none is installed globally), so
Serve's own tracing, if a user turns it on, is left alone.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

logger = logging.getLogger("ray.serve")

_PROPAGATOR = TraceContextTextMapPropagator()


def _provider() -> TracerProvider:
    provider = TracerProvider()
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            logger.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but opentelemetry-exporter-otlp is not "
                           "installed: trace ids travel, spans are not exported")
        else:
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def trace_id_of(traceparent: str) -> str:
    """The 32-hex trace id of a `traceparent` value ("" when it is not one)."""
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


class Tracer:
    def __init__(self, component: str):
        self._tracer = _provider().get_tracer(f"batchserve.{component}")

    def request_span(self, name: str, headers, attributes: dict) -> trace.Span:
        """A server span for one HTTP request, child of its `traceparent` when it has a valid one."""
        carrier = {"traceparent": headers.get("traceparent", "")}
        if headers.get("tracestate"):
            carrier["tracestate"] = headers["tracestate"]
        parent = _PROPAGATOR.extract(carrier)
        return self._tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)

    @staticmethod
    def traceparent(span: trace.Span) -> str:
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        return carrier.get("traceparent", "")

    def batch_span(self, name: str, traceparents: Sequence[str], attributes: dict,
                   start_time: Optional[int] = None) -> trace.Span:
        """A span for one device batch, linked to the span of every request it served."""
        links = []
        for tp in traceparents:
            ctx = trace.get_current_span(_PROPAGATOR.extract({"traceparent": tp})).get_span_context() if tp else None
            if ctx is not None and ctx.is_valid:
                links.append(Link(ctx))
        return self._tracer.start_span(name, kind=SpanKind.INTERNAL, links=links, attributes=attributes,
                                       start_time=start_time)


def request_id() -> Optional[str]:
    """Serve's id of the request being served (it echoes it as X-Request-ID). Serve keeps it in
    its request context, which has no public getter in 2.60."""
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or None
    except Exception:  # noqa: BLE001 - outside a Serve request: no id
        return None
