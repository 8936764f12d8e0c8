"""Traffic classes and versions in the config and at the edge: what is accepted, what is refused
with the field named, and how versions expand into deployments."""

import pytest

from app.config import ConfigError, parse_app_args
from app.errors import InvalidInput
from app.protocols.v1 import parse_v1_request
from app.traffic import header_class
from tests.helpers import tiny_bert_spec


def _args(**model):
    return {"models": [tiny_bert_spec(**model)]}


def test_versions_expand_into_deployments_with_their_own_settings():
    spec = parse_app_args(_args(versions=[
        {"name": "1", "weight": 90},
        {"name": "2", "weight": 10, "batching": {"max_batch_size": 4}, "source": {
            "kind": "random_init", "architecture": "bert", "seed": 3,
            "config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}}},
    ])).models[0]
    specs = spec.version_specs()
    assert spec.version_weights() == {"1": 90.0, "2": 10.0}
    assert specs["1"].batching.max_batch_size == spec.batching.max_batch_size
    assert specs["2"].batching.max_batch_size == 4 and specs["2"].source.seed == 3
    assert not specs["2"].versions and spec.deployment_name("2") == "tiny@2"


def test_a_model_without_versions_is_version_1_under_its_own_name():
    spec = parse_app_args(_args()).models[0]
    assert spec.version_names() == ["1"] and spec.deployment_name("1") == "tiny"
    assert spec.version_specs() == {"1": spec}


@pytest.mark.parametrize("versions,match", [
    ([{"name": "1"}, {"name": "1"}], "unique"),
    ([{"name": "1", "weight": 0}], "weight above 0"),
    ([{"name": "bad name"}], "versions"),
    ([{"name": "1", "batching": {"max_batch_szie": 4}}], "unknown field"),
])
def test_bad_versions_are_refused_naming_the_field(versions, match):
    with pytest.raises(ConfigError, match=match):
        parse_app_args(_args(versions=versions))


def test_versions_need_the_routed_ingress():
    with pytest.raises(ConfigError, match="versions"):
        parse_app_args({**_args(versions=[{"name": "1"}]), "ingress": {"mode": "fused"}})


def test_the_bulk_bound_must_leave_room_for_realtime():
    with pytest.raises(ConfigError, match="traffic.bulk.max_ongoing_requests"):
        parse_app_args(_args(deployment={"max_ongoing_requests": 64}, traffic={"bulk": {"max_ongoing_requests": 64}}))
    spec = parse_app_args(_args(deployment={"max_ongoing_requests": 64})).models[0]
    assert spec.bulk_max_ongoing_requests() == 32 and spec.bulk_batch_items() == spec.batching.max_batch_size


def test_the_class_comes_from_the_body_then_the_header_then_the_model():
    spec = parse_app_args(_args(task="embed")).models[0]
    assert header_class(None, "bulk") == "bulk"
    assert header_class(" Bulk ", "realtime") == "bulk"
    with pytest.raises(InvalidInput, match="X-Priority"):
        header_class("urgent", "realtime")
    assert parse_v1_request(b'{"instances": ["a"]}', spec, "bulk").traffic_class == "bulk"
    assert parse_v1_request(b'{"instances": ["a"], "priority": "realtime"}', spec, "bulk").traffic_class == "realtime"
    with pytest.raises(InvalidInput, match="priority"):
        parse_v1_request(b'{"instances": ["a"], "priority": 1}', spec)
