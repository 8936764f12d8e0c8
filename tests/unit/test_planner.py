"""The planner picks each strategy for suitably sized specs, refuses what fits nowhere, obeys force."""

from pathlib import Path

import pytest

from app.config import ModelSpec
from app.models.generation_stages import layer_ranges
from app.planner import PlanError, balance_stages, chunks_for_bubble, plan_model
from app.planner_generate import generator_balance

MiB = 2**20


def _llama(layers=4, hidden=256, heads=8, inter=512, **parallel):
    return ModelSpec.model_validate({
        "name": "llama",
        "source": {"kind": "random_init", "architecture": "llama",
                   "config": {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
                              "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": 4000}},
        "task": "embed",
        "max_seq_len": 64,
        "parallel": parallel,
    })


def _budget(mib, per_node=4, nodes=1):
    return {"kind": "cpu", "per_node": per_node, "memory_gib": mib / 1024, "nodes": nodes, "usable_fraction": 1.0}


def test_replicated_when_it_fits():
    p = plan_model(_llama(devices=_budget(512)))
    assert p.strategy == "replicated" and p.tp == 1 and p.pp == 1
    assert 1 <= p.max_batch_size <= 32
    assert "fits one device" in p.explain()


def test_tensor_parallel_when_too_big_for_one_device():
    # ~14 MiB of fp32 parameters; 10 MiB devices.
    p = plan_model(_llama(devices=_budget(10)))
    assert p.strategy == "deepspeed_tp" and p.tp == 2
    assert "does not fit one device" in p.explain()
    assert p.per_device_param_bytes == p.param_bytes // 2


def test_tp_skips_sizes_that_do_not_divide_heads():
    # 5.5 MiB devices need more than 2 ranks; 3 does not divide 8 heads, so 4.
    p = plan_model(_llama(devices=_budget(5.5, per_node=4)))
    assert p.strategy == "deepspeed_tp" and p.tp == 4


def test_pipeline_for_deep_narrow_models():
    p = plan_model(_llama(layers=8, pipeline_min_layers=8, pipeline_max_hidden=256, devices=_budget(14)))
    assert p.strategy == "fairscale_pp" and p.pp >= 2
    assert sum(p.balance) == 8 + 2  # embeddings + 8 layers + final
    assert "deep" in p.explain()
    bubble = (p.pp - 1) / (p.chunks + p.pp - 1)
    assert bubble <= 0.25


def test_pipeline_when_tensor_parallel_inside_a_node_is_not_enough():
    # One device per node: TP impossible, a pipeline across nodes fits: stages as Ray actors
    # (fairscale's Pipe is one process on one node).
    p = plan_model(_llama(devices=_budget(10, per_node=1, nodes=4)))
    assert (p.strategy, p.tp) == ("tp_pp", 1) and p.pp >= 2 and p.devices == p.pp
    assert "across nodes" in p.explain() and "micro-batches in flight" in p.explain()
    # Two devices per node, one node: a pipeline inside the node stays fairscale's.
    p = plan_model(_llama(devices=_budget(10, per_node=4, nodes=1), strategy="fairscale_pp"))
    assert p.strategy == "fairscale_pp"


def test_an_encoder_past_one_node_gets_tp_stages_across_nodes():
    # ~14 MiB of parameters, 2 devices of 5 MiB per node, 4 nodes: a pipeline of one-device stages
    # would need 4+ stages over several nodes; tp=2 stages fill a node each.
    p = plan_model(_llama(devices=_budget(5, per_node=2, nodes=4)))
    assert (p.strategy, p.tp) == ("tp_pp", 2) and p.pp >= 2 and p.devices == p.tp * p.pp
    assert p.per_device_param_bytes <= 5 * MiB and p.chunks >= 1 and p.max_batch_size >= 1


def test_fits_nowhere_is_refused_with_sizes():
    with pytest.raises(PlanError) as e:
        plan_model(_llama(devices=_budget(2, per_node=2, nodes=1)))
    msg = str(e.value)
    assert "fits nowhere" in msg and "GiB of parameters" in msg and "usable" in msg


def test_forced_settings_are_obeyed():
    big = _budget(4096)
    assert plan_model(_llama(strategy="deepspeed_tp", tp=4, devices=big)).tp == 4
    p = plan_model(_llama(strategy="fairscale_pp", pp=3, chunks=5, devices=big))
    assert (p.strategy, p.pp, p.chunks, len(p.balance)) == ("fairscale_pp", 3, 5, 3)
    assert plan_model(_llama(strategy="replicated", devices=big)).strategy == "replicated"


def test_forced_tp_that_cannot_divide_heads_is_refused():
    with pytest.raises(PlanError, match="must divide attention heads"):
        plan_model(_llama(heads=6, hidden=384, strategy="deepspeed_tp", tp=4, devices=_budget(4096)))


def test_forced_replicated_that_does_not_fit_is_refused():
    with pytest.raises(PlanError, match="replicated needs"):
        plan_model(_llama(strategy="replicated", devices=_budget(8)))


def test_balance_is_contiguous_and_minimises_the_largest_stage():
    assert balance_stages([10, 1, 1, 1, 1, 10], 3) == (1, 4, 1)
    even = balance_stages([1] * 10, 4)
    assert sum(even) == 10 and len(even) == 4 and max(even) == 3
    assert balance_stages([5, 5], 2) == (1, 1)


def test_chunks_keep_bubble_small():
    for p in (2, 4, 8):
        for b in (0.1, 0.25, 0.5):
            m = chunks_for_bubble(p, b)
            assert (p - 1) / (m + p - 1) <= b + 1e-9
            assert m == 1 or (p - 1) / (m - 1 + p - 1) > b


def test_real_minilm_is_replicated():
    spec = ModelSpec.model_validate({"name": "m", "source": {"kind": "packaged"}, "task": "embed"})
    p = plan_model(spec)
    assert p.strategy == "replicated" and 20 * MiB < p.param_bytes < 200 * MiB


def _generator(mib, max_tokens=None):
    raw = _llama(devices=_budget(mib)).model_dump()
    raw.update(task="generate", max_seq_len=256,
               generation={"max_new_tokens": 64, "kv_cache_max_tokens": max_tokens, "max_running_sequences": 8})
    return ModelSpec.model_validate(raw)


def test_a_generator_plan_counts_its_kv_cache():
    p = plan_model(_generator(512))
    kv_per_token = 2 * 4 * 8 * 32 * 4  # K and V x 4 layers x 8 kv heads x head_dim 32 x fp32
    assert p.strategy == "replicated" and p.max_batch_size == 8
    assert p.kv_cache_tokens == int((512 * MiB - p.param_bytes) * 0.8) // kv_per_token
    assert "KV cache" in p.explain() and "full-length sequences" in p.explain()
    assert plan_model(_generator(512, max_tokens=1024)).kv_cache_tokens == 1024


def _generator_on(mib, per_node, nodes=1, **parallel):
    raw = _generator(mib).model_dump()
    raw["parallel"] = {**raw["parallel"], "devices": _budget(mib, per_node=per_node, nodes=nodes), **parallel}
    return ModelSpec.model_validate(raw)


def test_a_generator_too_big_for_one_device_gets_a_tp_gang_with_its_kv_cache_per_rank():
    # ~14 MiB of parameters on 14.5 MiB devices: no room for a sequence's KV cache on one device.
    p = plan_model(_generator_on(14.5, per_node=4))
    kv_per_rank = 2 * 4 * 8 * 32 * 4 // p.tp
    assert p.strategy == "deepspeed_tp" and p.tp == 2 and p.per_device_param_bytes == p.param_bytes // 2
    assert p.kv_cache_tokens == int((14.5 * MiB - p.param_bytes / 2) * 0.8) // kv_per_rank
    assert p.kv_cache_tokens >= 256 and "per rank of tp=2" in p.explain()
    forced = plan_model(_generator_on(512, per_node=4, strategy="deepspeed_tp", tp=4))
    assert forced.strategy == "deepspeed_tp" and forced.tp == 4 and forced.kv_cache_tokens > p.kv_cache_tokens


def test_a_generator_that_fits_no_device_nor_gang_is_refused():
    with pytest.raises(PlanError, match="one full-length sequence's KV cache"):
        plan_model(_generator_on(14.5, per_node=1))
    with pytest.raises(PlanError, match="KV cache of .* tokens"):
        plan_model(_generator_on(14.5, per_node=1, strategy="replicated"))


def test_a_generator_past_one_node_gets_a_pipeline_of_layer_stages_with_their_kv_cache():
    raw = _generator(14.5).model_dump()
    raw["parallel"] = {**raw["parallel"], "devices": _budget(14.5, per_node=1, nodes=4)}
    p = plan_model(ModelSpec.model_validate(raw))
    assert p.strategy == "fairscale_pp" and p.pp >= 2 and p.chunks == 1
    assert p.kv_cache_tokens >= 256 and "lockstep" in p.explain()
    ranges = layer_ranges(p.balance, 4)
    assert ranges[0][0] == 0 and ranges[-1][1] == 4 and all(b > a for a, b in ranges)


def test_layer_ranges_of_a_balance_and_a_stage_without_layers():
    assert layer_ranges([2, 2], 2) == [(0, 1), (1, 2)]
    assert layer_ranges([3, 1, 2], 4) == [(0, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="holds no decoder layer"):
        layer_ranges([1, 3, 2], 4)
    with pytest.raises(ValueError, match="does not cover"):
        layer_ranges([2, 2], 4)


def test_generator_stages_each_hold_a_layer_even_beside_a_heavy_embedding():
    units = [1000, 10, 10, 10, 10, 1000]  # embeddings, 4 layers, head: bytes alone would give [1, 4, 1]
    assert balance_stages(units, 3) == (1, 4, 1)
    b = generator_balance(units, 3)
    assert sum(b) == 6 and all(b > a for a, b in layer_ranges(b, 4))
    with pytest.raises(PlanError, match="only 4 decoder layers"):
        generator_balance(units, 5)


def test_a_generator_past_one_node_with_splittable_heads_gets_tp_stages_across_nodes():
    # ~14 MiB of parameters; 2 devices of 5 MiB per node, 4 nodes: no node holds it with tp=2,
    # so each stage is a tp=2 group filling a node and the stages go across nodes.
    raw = _generator(5).model_dump()
    raw["parallel"] = {**raw["parallel"], "devices": _budget(5, per_node=2, nodes=4)}
    p = plan_model(ModelSpec.model_validate(raw))
    assert (p.strategy, p.tp) == ("tp_pp", 2) and p.pp >= 2 and p.devices == p.tp * p.pp
    assert p.kv_cache_tokens >= 256 and "per rank of tp=2" in p.explain() and "across nodes" in p.explain()
    # Each rank holds 1/tp of its stage: the fullest stage's bytes per rank fit a 5 MiB device.
    assert p.per_device_param_bytes <= 5 * MiB < p.param_bytes // p.pp


def test_tp_pp_forced_and_its_bad_settings():
    p = plan_model(_generator_on(512, per_node=2, nodes=2, strategy="tp_pp", tp=2, pp=2))
    assert (p.strategy, p.tp, p.pp, p.devices) == ("tp_pp", 2, 2, 4)
    enc = plan_model(_llama(strategy="tp_pp", tp=2, pp=2, devices=_budget(512, per_node=2, nodes=2)))
    assert (enc.strategy, enc.tp, enc.pp, enc.devices) == ("tp_pp", 2, 2, 4) and sum(enc.balance) == 4 + 2  # layers + embeddings + head
    with pytest.raises(ValueError, match="tp x pp = 8 exceeds the 4 devices"):
        _generator_on(512, per_node=2, nodes=2, strategy="tp_pp", tp=2, pp=4)
    with pytest.raises(ValueError, match="tp: 2 set but strategy is 'fairscale_pp'"):
        _generator_on(512, per_node=2, nodes=2, strategy="fairscale_pp", tp=2, pp=2)


@pytest.mark.parametrize("budget, expected", [
    ((1, 80, 1), {"llama-8b": ("replicated", 1, 1), "llama-70b": None, "llama-405b": None}),
    ((8, 80, 1), {"llama-8b": ("replicated", 1, 1), "llama-70b": ("deepspeed_tp", 2, 1), "llama-405b": None}),
    ((4, 24, 4), {"llama-8b": ("replicated", 1, 1), "llama-70b": ("tp_pp", 4, 2), "llama-405b": None}),
    ((8, 80, 2), {"llama-8b": ("replicated", 1, 1), "llama-70b": ("deepspeed_tp", 2, 1), "llama-405b": ("tp_pp", 8, 2)}),
])
def test_the_readme_table_of_llama_shapes(budget, expected):
    """README "Size-aware parallelism": what cluster/llama_shapes.yaml plans on each cluster."""
    import yaml

    per_node, gib, nodes = budget
    shapes = Path(__file__).resolve().parents[2] / "cluster" / "llama_shapes.yaml"
    models = yaml.safe_load(shapes.read_text())["applications"][0]["args"]["models"]
    for raw in models:
        raw["parallel"]["devices"] = {"kind": "gpu", "per_node": per_node, "memory_gib": gib, "nodes": nodes}
        want = expected[raw["name"]]
        if want is None:
            with pytest.raises(PlanError):
                plan_model(ModelSpec.model_validate(raw))
            continue
        p = plan_model(ModelSpec.model_validate(raw))
        assert (p.strategy, p.tp, p.pp) == want, raw["name"]
