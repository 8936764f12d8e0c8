"""Schema-driven fuzzing: schemathesis reads the app's OpenAPI document and sends valid and invalid
requests to every route; none may get a 5xx. `SCHEMATHESIS_EXAMPLES` sets examples per route."""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "60"))
SEEN: dict[int, int] = {}


@pytest.fixture(scope="module")
def api_schema(base_url):
    config = SchemathesisConfig.from_dict({
        "generation": {"mode": "all", "max-examples": EXAMPLES, "deterministic": True},
        # Aim the path parameter at a served model so bodies reach the real parser and model.
        "parameters": {"name": "bert-classifier"},
    })
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=config)
    schema.config.update(base_url=base_url)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_no_route_answers_5xx(case, base_url):
    response = case.call(base_url=base_url, timeout=30)
    SEEN[response.status_code] = SEEN.get(response.status_code, 0) + 1
    assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text[:300])
    if response.status_code >= 400:
        body = response.json()  # every error is JSON with a message naming the problem
        assert body.get("error") or body.get("detail"), body


def test_service_answers_after_schema_fuzzing(base_url):
    print(f"\nschemathesis statuses so far: {dict(sorted(SEEN.items()))}")
    r = httpx.post(f"{base_url}/v1/models/bert-classifier:predict", json={"instances": ["still fine"]}, timeout=30)
    assert r.status_code == 200 and r.json()["predictions"][0]["label"]
