"""`/v1/experts` admin routes: bearer-token checks first, then the admin's answers."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from tests.serving import fakes
from tests.serving.conftest import ADMIN_TOKEN, assert_openai_error, make_app

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def every_admin_call(client: TestClient, headers: dict[str, str]) -> list:
    return [
        client.get("/v1/experts", headers=headers),
        client.post("/v1/experts", json={"path": "sets/math"}, headers=headers),
        client.delete("/v1/experts/math", headers=headers),
        client.delete("/v1/experts?name=math", headers=headers),
    ]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_TOKEN}, {"X-Token": "x"}],
)
def test_missing_or_wrong_token_is_401(client, admin, headers):
    for response in every_admin_call(client, headers):
        error = assert_openai_error(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
        assert error["code"] == "invalid_api_key"
    assert not admin.loads


def test_no_admin_token_configured_refuses_everything_and_says_why(admin, caplog):
    app = make_app(fakes.FakeLM(), admin=admin)
    with TestClient(app) as client, caplog.at_level(logging.WARNING, logger="serving.http.api"):
        responses = every_admin_call(client, AUTH)
    for response in responses:
        assert "no admin token" in assert_openai_error(response, 401)["message"]
    assert sum("no admin token is configured" in r.getMessage() for r in caplog.records) == 4
    assert not admin.loads


def test_load_list_retire(client, admin):
    response = client.post("/v1/experts", json={"path": "sets/./math"}, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["pool_version"] == 1
    assert admin.loads == [("sets/math", None, None)]
    listed = client.get("/v1/experts", headers=AUTH).json()
    assert [s["name"] for s in listed["data"]] == ["math"]
    assert client.delete("/v1/experts/math", headers=AUTH).json()["retired"] == "math"
    assert client.get("/v1/experts", headers=AUTH).json()["data"] == []


def test_upload_and_model_choice(client, admin):
    files = {"file": ("set.tar", b"archive-bytes", "application/x-tar")}
    response = client.post("/v1/experts", files=files, data={"model": "fake-lm"}, headers=AUTH)
    assert response.status_code == 200, response.text
    assert admin.loads == [(None, b"archive-bytes", "fake-lm")]
    files = {"other": ("x", b"")}
    response = client.post("/v1/experts", data={"model": "fake-lm"}, files=files, headers=AUTH)
    assert_openai_error(response, 400, "file")


def test_load_failures_map_to_statuses(client):
    def load(**body):
        return client.post("/v1/experts", json=body, headers=AUTH)

    assert_openai_error(load(path="sets/broken"), 422, "path")
    busy = load(path="busy")
    assert_openai_error(busy, 503)
    assert busy.headers["retry-after"] == "2"
    assert load(path="a/math").status_code == 200
    assert_openai_error(load(path="b/math"), 409)
    assert_openai_error(load(path="../../etc"), 400, "path")
    assert_openai_error(load(path="x", model="gpt-4"), 404, "model")
    assert_openai_error(load(path="x", force=True), 400)
    assert_openai_error(client.delete("/v1/experts/nope", headers=AUTH), 404)
    assert_openai_error(client.delete("/v1/experts", headers=AUTH), 400, "name")


@pytest.mark.parametrize(
    "path", ["set-a/../set-b", "set-a/..", "a/b/../../c", "..", "set-a\\..\\set-b", "./../x"]
)
def test_any_dotdot_component_is_refused(client, admin, path):
    """The store refuses every `..` (even one that lands back inside): so does the API, before
    any normalising could turn `set-a/../set-b` into `set-b`."""
    error = assert_openai_error(
        client.post("/v1/experts", json={"path": path}, headers=AUTH), 400, "path"
    )
    assert ".." in error["message"]
    assert admin.loads == []


def test_no_admin_backend_is_404_after_auth():
    with TestClient(make_app(fakes.FakeLM(), admin_token="t")) as client:
        assert_openai_error(client.get("/v1/experts"), 401)
        assert_openai_error(client.get("/v1/experts", headers={"Authorization": "Bearer t"}), 404)
