"""Schemathesis fuzzes every operation of the OpenAPI document against the app it describes.

A bounded, derandomized run (pinned schemathesis, fake backends, no Ray): schema-valid and
schema-invalid requests alike must never get a server error, every answer must be documented
(status, content type, body schema, headers), an unsupported method gets a 405 whose `Allow`
lists the path's methods, and a schema-valid request is accepted wherever the schema can say
what the handler accepts.
"""

from __future__ import annotations

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
from tests.serving.conftest import ADMIN_TOKEN, make_app

MAX_EXAMPLES = 25
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
        max_images=4,
        max_labels=8,
        max_image_pixels=256 * 256,
        max_body_bytes=1 << 20,
    )


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_api_conforms_to_its_openapi_document(case: schemathesis.Case) -> None:
    checks = list(CHECKS)
    if (case.method.upper(), case.path) not in NO_ACCEPTANCE_CHECK:
        checks.append(positive_data_acceptance)
    case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, checks=checks)
