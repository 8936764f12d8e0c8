"""Wire-format parsing and encoding, including bodies built by the real tritonclient library."""

import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.http._utils import _get_inference_request

from app.config import ModelSpec
from app.errors import InvalidInput, PayloadTooLarge
from app.protocols.v1 import parse_v1_request, v1_predictions
from app.protocols.v2 import encode_v2_response, parse_v2_request
from app.requests import InferenceResult, ModelInput
from tests.helpers import tiny_bert_spec

EMBED = ModelSpec.model_validate(
    {"name": "e", "source": {"kind": "packaged"}, "task": "embed", "max_seq_len": 16,
     "limits": {"max_items_per_request": 4, "max_text_chars": 20}}
)
CLS = ModelSpec.model_validate(tiny_bert_spec(labels=["a", "b", "c"]))


def _triton_body(inputs, outputs=None):
    body, header_len = _get_inference_request(inputs, "rid-1", outputs, 0, False, False, 0, None, None)
    return body, header_len


def _text_input(texts, binary=True, shape=None):
    t = triton.InferInput("text", shape or [len(texts)], "BYTES")
    t.set_data_from_numpy(np.array(texts, dtype=object).reshape(shape or [len(texts)]), binary_data=binary)
    return t


@pytest.mark.parametrize("binary", [True, False])
def test_v2_texts_from_tritonclient(binary):
    body, hlen = _triton_body([_text_input(["héllo", "wörld ✓"], binary=binary)])
    req = parse_v2_request(body, hlen, EMBED)
    assert req.inputs.texts == ["héllo", "wörld ✓"]
    assert req.request_id == "rid-1"
    # No outputs named: tritonclient asks for all outputs in binary.
    assert req.outputs == {"embedding": True}


def test_v2_texts_shape_n_by_1():
    body, hlen = _triton_body([_text_input(["a", "b"], shape=[2, 1])])
    assert parse_v2_request(body, hlen, EMBED).inputs.texts == ["a", "b"]


def test_v2_int64_ids_with_mask_strip_padding():
    ids = triton.InferInput("input_ids", [2, 3], "INT64")
    ids.set_data_from_numpy(np.array([[101, 5, 102], [101, 102, 0]], dtype=np.int64))
    mask = triton.InferInput("attention_mask", [2, 3], "INT64")
    mask.set_data_from_numpy(np.array([[1, 1, 1], [1, 1, 0]], dtype=np.int64), binary_data=False)
    body, hlen = _triton_body([ids, mask], [triton.InferRequestedOutput("logits", binary_data=False)])
    req = parse_v2_request(body, hlen, CLS)
    assert req.inputs.token_ids == [[101, 5, 102], [101, 102]]
    assert req.outputs == {"logits": False}


def _v2(doc, spec=EMBED):
    return parse_v2_request(orjson.dumps(doc), None, spec)


def _text_doc(data, shape=None, datatype="BYTES"):
    return {"inputs": [{"name": "text", "datatype": datatype, "shape": shape or [len(data)], "data": data}]}


@pytest.mark.parametrize(
    "doc, fragment",
    [
        ([1, 2], "JSON object"),
        ({"inputs": []}, "non-empty list"),
        ({"inputs": [{"name": "text"}]}, "datatype None"),
        (_text_doc(["a"], datatype="FP32"), "datatype 'FP32' is not accepted"),
        (_text_doc(["a", "b"], shape=[3]), "needs 3 elements but 2"),
        (_text_doc(["a"], shape=[-1]), "negative dimension"),
        (_text_doc([1, 2]), "must be a string"),
        (_text_doc(["a", "b"], shape=[1, 2, 1]), "shape [N] or [N, 1]"),
        ({**_text_doc(["a"]), "outputs": [{"name": "nope"}]}, "unknown output 'nope'"),
        ({**_text_doc(["a"]), "extra": 1}, "unknown field"),
        ({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [1, -5]}]}, "negative token id"),
        ({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [2], "data": [1, 5]}]}, "shape [N, L]"),
        ({"inputs": [{"name": "ids", "datatype": "INT64", "shape": [1, 1], "data": [1]}]}, "named 'input_ids'"),
        (_text_doc([]), "no items"),
    ],
)
def test_v2_bad_requests_are_400_with_reason(doc, fragment):
    with pytest.raises(InvalidInput) as e:
        _v2(doc)
    assert fragment in str(e.value)


def test_v2_malformed_json():
    with pytest.raises(InvalidInput, match="malformed JSON"):
        parse_v2_request(b"{not json", None, EMBED)


def test_v2_header_length_past_body():
    with pytest.raises(InvalidInput, match="Inference-Header-Content-Length"):
        parse_v2_request(b"{}", 99, EMBED)


def test_v2_truncated_binary_bytes():
    body, hlen = _triton_body([_text_input(["hello"])])
    with pytest.raises(InvalidInput):
        parse_v2_request(body[:-2], hlen, EMBED)


@pytest.mark.parametrize(
    "doc, fragment",
    [
        (_text_doc(["a"] * 5), "5 items"),
        (_text_doc(["x" * 21]), "21 characters"),
        ({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 17], "data": [1] * 17}]}, "17 tokens"),
        (_text_doc(["a"], shape=[10**9]), "1000000000 items"),
    ],
)
def test_v2_limits_are_413(doc, fragment):
    with pytest.raises(PayloadTooLarge) as e:
        _v2(doc)
    assert fragment in str(e.value)


def test_v1_parse_and_errors():
    assert parse_v1_request(b'{"instances": ["a", "b"]}', EMBED).texts == ["a", "b"]
    for body, fragment in [
        (b'{"instance": ["a"]}', "unknown field"),
        (b'{"instances": "a"}', "list of texts"),
        (b'{"instances": [1]}', "must be a string"),
        (b"[]", "JSON object"),
        (b"{}", "missing field 'instances'"),
    ]:
        with pytest.raises(InvalidInput) as e:
            parse_v1_request(body, EMBED)
        assert fragment in str(e.value)
    with pytest.raises(PayloadTooLarge):
        parse_v1_request(orjson.dumps({"instances": ["a"] * 5}), EMBED)


def test_v2_response_binary_roundtrip_through_tritonclient():
    body, hlen = _triton_body([_text_input(["a", "b"])])
    req = parse_v2_request(body, hlen, EMBED)
    out = np.random.default_rng(0).standard_normal((2, 384)).astype(np.float32)
    payload, json_len = encode_v2_response(EMBED, req, InferenceResult(out, 2, 0.0))
    assert json_len is not None
    result = triton.InferResult.from_response_body(payload, header_length=json_len)
    np.testing.assert_array_equal(result.as_numpy("embedding"), out)
    assert result.get_response()["id"] == "rid-1"


def test_v2_response_json_for_classifier():
    req = _v2(
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}], "outputs": [{"name": "probabilities"}]},
        CLS,
    )
    logits = np.array([[0.0, 1.0, 2.0]], dtype=np.float32)
    payload, json_len = encode_v2_response(CLS, req, InferenceResult(logits, 1, 0.0))
    assert json_len is None
    doc = orjson.loads(payload)
    (out,) = doc["outputs"]
    assert out["name"] == "probabilities" and out["shape"] == [1, 3]
    assert abs(sum(out["data"]) - 1.0) < 1e-6 and out["data"][2] > out["data"][1] > out["data"][0]


def test_v1_classifier_predictions_have_labels():
    preds = v1_predictions(CLS, np.array([[0.0, 3.0, 1.0]], dtype=np.float32))
    assert preds[0]["label"] == "b" and 0.5 < preds[0]["score"] < 1


def test_model_input_split_keeps_order():
    x = ModelInput(texts=[str(i) for i in range(7)])
    parts = x.split(3)
    assert [p.texts for p in parts] == [["0", "1", "2"], ["3", "4", "5"], ["6"]]
    assert ModelInput(token_ids=[[1], [2]]).split(5)[0].token_ids == [[1], [2]]
