"""Fuzz the live server from its own /openapi.json with schemathesis: no 5xx, and every answer (status code, content
type, body) conforms to the schema the server publishes.

A tiny-model server boots in seconds and generates in milliseconds, so each operation gets FUZZ_EXAMPLES generated
requests within about a minute in all.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.live_server import LiveServer

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))


@pytest.fixture(scope="module")
def live(
    tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"
    path.write_text(
        f"model: {{path: '{tiny_base}', id: tiny-llama, dtype: float32}}\n"
        f"adapters: [{{name: alpha, path: '{tiny_adapters['alpha']}'}}]\n"
        "limits: {max_input_tokens: 64, max_total_tokens: 128, max_new_tokens: 8, max_concurrent_requests: 64}\n"
    )
    with LiveServer(path, boot_timeout=120) as server:
        yield server


OPERATIONS = ["GET /health", "GET /info", "GET /metrics", "POST /generate", "POST /generate_stream", "POST /",
              "GET /v1/models", "POST /v1/completions", "POST /v1/chat/completions"]  # fmt: skip


@pytest.fixture(scope="module")
def api_schema(live: LiveServer) -> Any:
    return schemathesis.openapi.from_url(f"{live.url}/openapi.json")


def test_schema_lists_every_route(api_schema: Any) -> None:
    found = {f"{op.method.upper()} {op.path}" for op in (r.ok() for r in api_schema.get_all_operations())}
    assert found == set(OPERATIONS)


# What the issue asks: no 5xx, and answers that match the schema. Not positive_data_acceptance: a schema cannot
# say that `inputs` plus `max_new_tokens` must fit max_total_tokens, so some schema-valid requests are rightly 422.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]  # fmt: skip
CASES = [(op, GenerationMode.POSITIVE) for op in OPERATIONS] + [
    (op, GenerationMode.NEGATIVE)
    for op in OPERATIONS
    if op.startswith("POST")  # GETs take no input to break
]


# Driven through hypothesis directly: schemathesis' pytest plugin (schema.parametrize) does not run on pytest 9.
@pytest.mark.parametrize(("operation", "mode"), CASES)
def test_api_conforms_to_its_schema(api_schema: Any, operation: str, mode: GenerationMode) -> None:
    method, path = operation.split(" ")
    op = api_schema[path][method]

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case: Any) -> None:
        case.call_and_validate(timeout=30, checks=CHECKS)

    check()


def test_server_survived(live: LiveServer) -> None:
    assert httpx.get(f"{live.url}/health", timeout=10).status_code == 200
    text = httpx.get(f"{live.url}/metrics", timeout=10).text
    assert "mergeserve_requests_in_flight" in text
