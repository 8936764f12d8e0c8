import pytest

from app.config import ConfigError, GatherOptions, parse_app_args
from deployments.builder import build_app, model_deployment_options
from tests.helpers import app_args, tiny_bert_spec


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


def test_build_app_refuses_bad_args_naming_the_field():
    with pytest.raises(ConfigError, match=r"models\[0\]\.task"):
        build_app({"models": [tiny_bert_spec(task="translate")]})
