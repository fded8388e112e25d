"""Schemathesis fuzzes every operation of the OpenAPI document against the app it describes.

A bounded, derandomized run (pinned schemathesis, fake backends, no Ray): schema-valid and
schema-invalid requests alike must never get a server error, every answer must be documented
(status, content type, body schema, headers), an unsupported method gets a 405 whose `Allow`
lists the path's methods, and a schema-valid request is accepted wherever the schema can say
what the handler accepts.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from tests.serving import fakes
from tests.serving.conftest import ADMIN_TOKEN, assert_openai_error, make_app

MAX_EXAMPLES = 25
API_TOKEN = "api-secret"
CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    unsupported_method,
    allow_header_conformance,
]
# Image bytes cannot be described by a schema (a schema-valid base64 string is rarely a PNG),
# so a schema-valid /classify request may still be refused with a 400.
NO_ACCEPTANCE_CHECK = {("POST", "/classify")}


def _app() -> Any:
    return make_app(
        fakes.FakeLM(),
        fakes.FakeClip(),
        fakes.FakeAdmin(),
        admin_token=ADMIN_TOKEN,
        api_token=API_TOKEN,
        max_images=4,
        max_labels=8,
        max_image_pixels=256 * 256,
        max_body_bytes=1 << 20,
    )


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


def _drawn(case: schemathesis.Case, ways: int) -> int:
    """A choice among `ways` that depends on the request only (so a failure replays)."""
    request = (case.method, case.path, case.path_parameters, case.query, case.body)
    return zlib.crc32(json.dumps(request, sort_keys=True, default=str).encode()) % ways


def _credentials(case: schemathesis.Case) -> dict[str, str]:
    """The route's token, but a quarter of the requests go without one: their 401s are
    checked against the document too (status, body, the WWW-Authenticate header)."""
    if _drawn(case, 4) == 0:
        return {}
    token = ADMIN_TOKEN if case.path.startswith("/v1/experts") else API_TOKEN
    return {"Authorization": f"Bearer {token}"}


def _serve_some(case: schemathesis.Case) -> bool:
    """Half the schema-valid completions name the served model (a drawn name never does), so
    that answers past parsing are checked too, streamed or not. Those may still be refused
    for their length (prompt tokens + max_tokens over the context: no schema can say it)."""
    body = case.body
    if case.path != "/v1/completions" or not isinstance(body, dict) or "model" not in body:
        return False
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return False
    if _drawn(case, 2):
        return False
    body["model"] = fakes.FakeLM.model_name
    return True


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_api_conforms_to_its_openapi_document(case: schemathesis.Case) -> None:
    checks = list(CHECKS)
    served = _serve_some(case)
    if not served and (case.method.upper(), case.path) not in NO_ACCEPTANCE_CHECK:
        checks.append(positive_data_acceptance)
    case.call_and_validate(headers=_credentials(case), checks=checks)


# What the run found, pinned as plain tests (a changed schema reshuffles the drawn examples).


def test_405_allow_names_every_method_of_the_path(client) -> None:
    for method in ("PUT", "OPTIONS"):
        response = client.request(method, "/v1/experts")
        assert_openai_error(response, 405)
        assert response.headers["allow"] == "DELETE, GET, POST"
    head = client.head("/v1/experts")  # FastAPI serves no HEAD for a GET route
    assert (head.status_code, head.headers["allow"]) == (405, "DELETE, GET, POST")
    assert client.put("/v1/experts/some-set").headers["allow"] == "DELETE"


def test_whole_numbers_are_integers_and_nothing_else_is(client) -> None:
    ok = client.post(
        "/v1/completions",
        json={"model": "fake-lm", "prompt": [72.0, 105], "n": 2.0, "max_tokens": 3.0},
    )
    assert ok.status_code == 200, ok.text
    assert [choice["text"] for choice in ok.json()["choices"]] == ["Hel", "Hel"]
    for bad in ({"n": 1.5}, {"n": "2"}, {"n": True}, {"max_tokens": 2.5}, {"prompt": [1.5]}):
        body = {"model": "fake-lm", "prompt": "Hi", **bad}
        assert_openai_error(client.post("/v1/completions", json=body), 400, next(iter(bad)))


def test_the_document_carries_this_servers_limits() -> None:
    def limits(**settings: Any) -> tuple[Any, ...]:
        app = make_app(fakes.FakeLM(max_context=100), fakes.FakeClip(), None, **settings)
        schemas = app.openapi()["components"]["schemas"]
        completion, classify = schemas["CompletionRequest"], schemas["ClassifyRequest"]
        prompt = completion["properties"]["prompt"]["anyOf"]
        top_k = schemas["MoraOptions"]["properties"]["top_k"]["anyOf"][0]
        labels = classify["properties"]["labels"]["anyOf"][0]
        return (
            completion["properties"]["n"]["maximum"],
            [branch.get("maxItems") for branch in prompt],
            prompt[0]["maxLength"],
            top_k["maximum"],
            classify["properties"]["images"]["maxItems"],
            (labels["maxItems"], labels["items"]["maxLength"]),
        )

    assert limits() == (8, [None, 16, None, 16], 3200, 64, 16, (512, 200))  # config defaults
    small = {"max_n": 2, "max_prompts": 3, "max_top_k": 4, "max_images": 5, "max_labels": 6}
    assert limits(**small, max_label_chars=7, max_prompt_chars_per_token=2) == (
        2,
        [None, 3, None, 3],
        200,
        4,
        5,
        (6, 7),
    )
