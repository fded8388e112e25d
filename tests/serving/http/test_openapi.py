"""The OpenAPI document describes request bodies and OpenAI-shaped error responses."""

from __future__ import annotations

from tests.serving.conftest import make_app


def _document(lm, clip, admin) -> dict:
    return make_app(lm, clip, admin, admin_token="t").openapi()


def test_completions_documents_its_body_and_errors(lm, clip, admin) -> None:
    doc = _document(lm, clip, admin)
    operation = doc["paths"]["/v1/completions"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CompletionRequest"}
    request = doc["components"]["schemas"]["CompletionRequest"]
    assert {"model", "prompt"} <= set(request["required"])
    assert "MoraOptions" in doc["components"]["schemas"]  # the $defs resolve
    for status in ("400", "401", "404", "413", "415", "503", "504"):
        schema = operation["responses"][status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, status
    error = doc["components"]["schemas"]["ErrorDetail"]
    assert set(error["properties"]) == {"message", "type", "param", "code"}


def test_every_route_documents_errors_and_no_fastapi_422(lm, clip, admin) -> None:
    doc = _document(lm, clip, admin)
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "500" in responses and "413" in responses, (method, path)
            if "422" in responses:  # only our own OpenAI-shaped 422, not FastAPI's
                schema = responses["422"]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path)
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path in ("/classify", "/v1/experts"):
        assert "requestBody" in doc["paths"][path]["post"], path
