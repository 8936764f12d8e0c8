import pytest
import yaml

from app.config import ConfigError, GatherOptions, parse_app_args
from deployments.builder import build_app, model_deployment_options
from tests.helpers import ROOT, app_args, tiny_bert_spec


def test_repo_serve_config_is_valid():
    args = parse_app_args(app_args())
    names = [m.name for m in args.models]
    assert "minilm" in names
    minilm = args.model("minilm")
    assert minilm.task == "embed" and minilm.source.kind == "packaged"
    classifier = next(m for m in args.models if m.task == "classify")
    assert classifier.source.kind == "random_init" and classifier.source.architecture == "bert"


def _error(raw) -> str:
    with pytest.raises(ConfigError) as e:
        parse_app_args(raw)
    return str(e.value)


def test_unknown_field_is_named():
    raw = app_args()
    raw["models"][0]["batching"]["max_batch_szie"] = 8
    msg = _error(raw)
    assert "models[0].batching.max_batch_szie: unknown field" in msg


def test_bad_value_is_named():
    raw = app_args()
    raw["models"][1]["batching"]["batch_wait_timeout_s"] = -1
    assert "models[1].batching.batch_wait_timeout_s" in _error(raw)


def test_bad_source_kind_is_named():
    raw = {"models": [tiny_bert_spec(source={"kind": "hub", "repo": "x"})]}
    assert "models[0].source" in _error(raw)


def test_inconsistent_labels():
    raw = {"models": [tiny_bert_spec(labels=["a", "b"])]}
    msg = _error(raw)
    assert "labels" in msg and "num_labels is 3" in msg


def test_max_ongoing_below_batch_is_refused():
    raw = {"models": [tiny_bert_spec(batching={"max_batch_size": 16}, deployment={"max_ongoing_requests": 4})]}
    msg = _error(raw)
    assert "models[0].deployment.max_ongoing_requests" in msg and "16" in msg


def test_duplicate_names_refused():
    raw = {"models": [tiny_bert_spec(), tiny_bert_spec()]}
    assert "duplicate model name 'tiny'" in _error(raw)


def test_gather_needs_routed_mode_and_sane_bounds():
    fused = {"models": [tiny_bert_spec()], "ingress": {"mode": "fused", "gather": {}}}
    assert "ingress" in _error(fused) and "needs mode: routed" in _error(fused)
    bad = {"models": [tiny_bert_spec()], "ingress": {"gather": {"max_calls_in_flight": 0}}}
    assert "ingress.gather.max_calls_in_flight" in _error(bad)
    ok = parse_app_args({"models": [tiny_bert_spec()], "ingress": {"gather": {"max_items": 32}}})
    assert ok.ingress.gather.max_items == 32 and ok.ingress.gather.max_calls_in_flight == 1
    assert ok.ingress.gather.transport == "handle"
    assert "ingress.gather.transport" in _error({"models": [tiny_bert_spec()], "ingress": {"gather": {"transport": "zmq"}}})


def test_direct_transport_refuses_an_autoscaler_that_cannot_see_its_calls():
    def args(policy: str) -> dict:
        spec = {**tiny_bert_spec(), "autoscaling": {"enabled": True, "policy": policy}}
        return {"models": [spec], "ingress": {"gather": {"transport": "direct"}}}

    assert "models[0].autoscaling.policy" in _error(args("default"))
    assert parse_app_args(args("queue_depth")).ingress.gather.transport == "direct"


def test_calls_in_flight_default_to_what_measured_best_for_the_transport():
    def gather(**g) -> GatherOptions:
        return parse_app_args({"models": [tiny_bert_spec()], "ingress": {"gather": g}}).ingress.gather

    assert gather().max_calls_in_flight == 1
    assert gather(transport="direct").max_calls_in_flight == 2
    assert gather(transport="direct", max_calls_in_flight=1).max_calls_in_flight == 1
    assert gather(transport="handle", max_calls_in_flight=3).max_calls_in_flight == 3


def test_empty_models_refused():
    assert "models" in _error({"models": []})


def test_seq_len_beyond_positions_refused():
    spec = tiny_bert_spec()
    spec["source"]["config"]["max_position_embeddings"] = 16
    assert "max_seq_len" in _error({"models": [spec]})


def test_default_max_ongoing_lets_batches_fill():
    args = parse_app_args({"models": [tiny_bert_spec(batching={"max_batch_size": 48, "max_concurrent_batches": 2})]})
    from app.planner import plan_model
    opts = model_deployment_options(args.models[0], plan_model(args.models[0]))
    assert opts["max_ongoing_requests"] >= 48 * 2
    assert opts["user_config"]["max_batch_size"] == 48


def test_queue_depth_policy_counts_a_replica_full_before_its_slots_are():
    """The policy's items per replica: one batch while the replica holds two (the default), 3/4 of
    its slots when they hold only its batch, or it would never look fuller than one replica's worth
    while the rest waits at the ingress."""
    from app.autoscaling import decide, QueueSignal
    from app.planner import plan_model

    def items(max_ongoing=None) -> float:
        deployment = {} if max_ongoing is None else {"max_ongoing_requests": max_ongoing}
        spec = parse_app_args({"models": [tiny_bert_spec(
            batching={"max_batch_size": 8}, deployment=deployment,
            autoscaling={"enabled": True, "policy": "queue_depth", "max_replicas": 2})]}).models[0]
        opts = model_deployment_options(spec, plan_model(spec))
        return opts["autoscaling_config"]["policy"]["policy_kwargs"]["items_per_replica"]

    assert items() == 8.0 and items(max_ongoing=32) == 8.0
    assert items(max_ongoing=8) == 6.0
    # One replica whose 8 slots stay full asks for a second.
    assert decide(QueueSignal(1, [8.0], [0.0]), items(max_ongoing=8), 100.0)[0] == 2
    assert decide(QueueSignal(1, [8.0], [0.0]), 8.0, 100.0)[0] == 1  # what counting one batch did


def test_build_app_refuses_bad_args_naming_the_field():
    with pytest.raises(ConfigError, match=r"models\[0\]\.task"):
        build_app({"models": [tiny_bert_spec(task="translate")]})


def test_derived_admission_bounds_take_a_burst_of_idle_capacity_and_turn_away_the_rest():
    """Serve counts a request as queued until it picks a replica, so the handle bound must take a
    burst as large as a replica holds; the ingress bound leaves room for requests being turned away."""
    args = parse_app_args(app_args())
    minilm = args.model("minilm")
    per_replica = minilm.effective_max_ongoing_requests()
    assert per_replica == 2 * minilm.batching.max_batch_size * minilm.batching.max_concurrent_batches
    assert minilm.effective_max_queued_requests() == per_replica
    held = sum(m.effective_max_ongoing_requests() * m.max_replicas() + m.effective_max_queued_requests()
               for m in args.models)
    assert args.ingress_max_ongoing_requests() == max(64, 2 * held)
    explicit = parse_app_args({"models": [tiny_bert_spec(autoscaling={"max_queued_requests": 3})]})
    assert explicit.models[0].effective_max_queued_requests() == 3
    unbounded = parse_app_args({"models": [tiny_bert_spec(autoscaling={"max_queued_requests": -1})]})
    assert unbounded.ingress_max_ongoing_requests() == 1000


def test_the_handle_queue_is_split_between_ingress_replicas_down_to_one_batch():
    """Serve bounds the queue at each caller: three ingress replicas hold one replica's worth in
    all, not three, and each still holds a full batch."""
    spec = tiny_bert_spec(batching={"max_batch_size": 4}, autoscaling={})  # the derived bounds
    one = parse_app_args({"models": [spec]}).models[0]
    assert one.effective_max_queued_requests() == 8
    assert one.effective_max_queued_requests(2) == 4
    assert one.effective_max_queued_requests(3) == 4  # ceil(8/3) = 3 < one batch
    from app.planner import plan_model
    assert model_deployment_options(one, plan_model(one), callers=2)["max_queued_requests"] == 4
    two = parse_app_args({"models": [spec], "ingress": {"num_replicas": 2}})
    held = one.effective_max_ongoing_requests() * one.max_replicas() + 4
    assert two.ingress_max_ongoing_requests() == max(64, 2 * held)


def test_generation_config_is_valid_and_bad_generators_are_named():
    gen = yaml.safe_load((ROOT / "serve_config.generate.yaml").read_text())["applications"][0]["args"]
    spec = parse_app_args(gen).models[0]
    assert spec.task == "generate" and spec.autoscaling.enabled
    assert spec.prompt_token_limit() == spec.max_seq_len - spec.generation.max_new_tokens
    assert spec.effective_max_ongoing_requests() == 2 * spec.generation.max_running_sequences
    base = gen["models"][0]
    assert "not a causal LM" in _error({"models": [{**base, "source": {"kind": "random_init", "architecture": "bert"}}]})
    assert "leaves no room" in _error({"models": [{**base, "generation": {"max_new_tokens": 256}}]})
    assert "default_max_tokens" in _error({"models": [{**base, "generation": {"default_max_tokens": 200}}]})
    assert spec.generation.stream_interval_ms == 50.0  # Ray Serve LLM's stream_batching_interval_ms
    assert spec.generation.engine_process  # the decoding loop in its own process by default
    assert "stream_interval_ms" in _error({"models": [{**base, "generation": {"stream_interval_ms": -1}}]})
    assert "routed" in _error({"models": [base], "ingress": {"mode": "fused"}})
