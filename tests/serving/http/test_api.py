"""`/v1/completions`, `/v1/models`, `/health`, auth and error bodies over a fake LM."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from serving.http.api import ApiSettings, create_app
from serving.http.errors import Overloaded
from tests.serving import fakes
from tests.serving.conftest import assert_openai_error, make_app, sse_events

SCRIPT = "Hello, world! "


def complete(client: TestClient, **fields):
    body = {"model": "fake-lm", "prompt": "Say hi", **fields}
    return client.post("/v1/completions", json=body)


def stream(client: TestClient, **fields) -> list:
    response = complete(client, stream=True, **fields)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return sse_events(response.text)


def test_completion_text_usage_and_mora_block(client, lm):
    response = complete(client, max_tokens=5, temperature=0)
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == "fake-lm"
    assert body["choices"] == [
        {"index": 0, "text": SCRIPT[:5], "logprobs": None, "finish_reason": "length"}
    ]
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11}
    mora = body["mora"]
    assert mora["pool_version"] == lm.pool_version
    assert mora["active_ranks_per_token"] == pytest.approx(1.5)
    assert mora["expert_sets"] == [
        {"name": "arith", "share": pytest.approx(2 / 3)},
        {"name": "poetry", "share": pytest.approx(1 / 3)},
    ]
    assert lm.finished == {f"{body['id']}-0"} and not lm.cancelled


def test_eos_finishes_with_stop():
    with TestClient(make_app(fakes.FakeLM("ab", eos=True))) as client:
        body = complete(client, max_tokens=10).json()
    assert body["choices"][0]["text"] == "ab"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_framing(client, include_usage):
    fields = {"max_tokens": 6, "n": 2, "seed": 1}
    events = stream(client, stream_options={"include_usage": include_usage}, **fields)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    if include_usage:
        last = chunks.pop()
        assert last["choices"] == []
        assert last["usage"] == {"prompt_tokens": 6, "completion_tokens": 12, "total_tokens": 18}
        assert last["mora"]["pool_version"] == 7
    assert all("usage" not in chunk for chunk in chunks)
    full = complete(client, **fields).json()
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert all(choice["finish_reason"] is None for choice in mine[:-1])
        assert mine[-1]["finish_reason"] == "length"
        assert "".join(c["text"] for c in mine) == full["choices"][index]["text"]


@pytest.mark.parametrize("stop", ["world", ["xyz", "o, w"], "!"])
@pytest.mark.parametrize("streaming", [False, True])
def test_stop_strings_are_excluded_and_abort_generation(client, lm, stop, streaming):
    stops = [stop] if isinstance(stop, str) else stop
    expected = SCRIPT[: min(SCRIPT.find(s) for s in stops if s in SCRIPT)]
    if streaming:
        chunks = stream(client, max_tokens=40, stop=stop)[:-1]
        choices = [c["choices"][0] for c in chunks]
        text, reason = "".join(c["text"] for c in choices), choices[-1]["finish_reason"]
    else:
        body = complete(client, max_tokens=40, stop=stop).json()
        text, reason = body["choices"][0]["text"], body["choices"][0]["finish_reason"]
        assert body["usage"]["completion_tokens"] < 40
    assert (text, reason) == (expected, "stop")
    assert len(lm.cancelled) == 1, "the engine request was aborted at the stop string"


def test_stop_string_split_across_multibyte_tokens():
    lm = fakes.FakeLM("tea ☕ then cake ")
    with TestClient(make_app(lm)) as client:
        body = complete(client, max_tokens=30, stop="☕ t").json()
    assert body["choices"][0]["text"] == "tea "


def test_multibyte_text_streams_without_replacement_characters():
    lm = fakes.FakeLM("snow ☃ and 🎉 ")
    with TestClient(make_app(lm)) as client:
        chunks = stream(client, max_tokens=len(fakes.encode("snow ☃ and 🎉")))[:-1]
    texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == "snow ☃ and 🎉"
    assert not any("\ufffd" in text for text in texts)


def test_echo_prepends_prompt_and_logprobs_cover_prompt_and_completion(client):
    body = complete(client, prompt="Hi é", max_tokens=3, echo=True, logprobs=2).json()
    choice = body["choices"][0]
    assert choice["text"] == "Hi é" + SCRIPT[:3]
    lp = choice["logprobs"]
    n_prompt = len(fakes.encode("Hi é"))
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
    assert len(lp["tokens"]) == len(lp["text_offset"]) == n_prompt + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"][:n_prompt] == [0, 1, 2, 3, 3]
    assert lp["text_offset"][n_prompt:] == [4, 5, 6]
    assert lp["tokens"][n_prompt:] == list(SCRIPT[:3])
    assert all(len(top) <= 3 for top in lp["top_logprobs"][1:])
    assert body["usage"]["completion_tokens"] == 3
    assert body["usage"]["prompt_tokens"] == n_prompt


def test_echo_only_scores_the_prompt(client):
    body = complete(client, prompt="abc", max_tokens=0, echo=True, logprobs=0).json()
    choice = body["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("abc", "length")
    assert choice["logprobs"]["token_logprobs"] == [None, -1.5, -1.5]
    assert body["usage"]["completion_tokens"] == 0


def test_stream_echo_comes_first(client):
    chunks = stream(client, prompt="Q:", max_tokens=2, echo=True)[:-1]
    assert chunks[0]["choices"][0]["text"] == "Q:"
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Q:" + SCRIPT[:2]


def test_logprobs_shape(client):
    body = complete(client, max_tokens=4, logprobs=2).json()
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == list(SCRIPT[:4])
    assert lp["token_logprobs"] == [fakes.token_logprob(i) for i in range(4)]
    assert lp["text_offset"] == [0, 1, 2, 3]
    assert all(
        set(top) == {tok, "~"} for top, tok in zip(lp["top_logprobs"], lp["tokens"], strict=True)
    )
    streamed = stream(client, max_tokens=4, logprobs=2)[:-1]
    tokens = [t for c in streamed for t in c["choices"][0]["logprobs"]["tokens"]]
    assert tokens == lp["tokens"]


def test_n_choices_use_consecutive_seeds(client, lm):
    body = complete(client, max_tokens=4, n=3, seed=5).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [params.seed for _, _, params in lm.requests] == [5, 6, 7]
    expected = [fakes.decode(lm.output_ids(5 + i)[:4]) for i in range(3)]
    assert [c["text"] for c in body["choices"]] == expected
    assert len(set(expected)) == 3
    assert body["usage"]["completion_tokens"] == 12


def test_several_prompts_times_n(client, lm):
    body = complete(client, prompt=[[72, 105], [66]], max_tokens=2, n=2).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [ids for _, ids, _ in lm.requests] == [[72, 105], [72, 105], [66], [66]]
    assert body["usage"]["prompt_tokens"] == 3  # each prompt counted once


def test_unknown_fields_are_accepted(client):
    response = complete(client, max_tokens=1, frobnicate=True, guided_json={"a": 1})
    assert response.status_code == 200


def test_mora_overrides_reach_the_engine(client, lm):
    complete(client, max_tokens=1, mora={"top_k": 3, "threshold": 0.25})
    assert (lm.requests[0][2].top_k, lm.requests[0][2].threshold) == (3, 0.25)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"n": 9}, "n"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"suffix": "end"}, "suffix"),
        ({"mora": {"top_k": 1000}}, "mora.top_k"),
        ({"mora": {"threshold": -1}}, "mora.threshold"),
        ({"prompt": {"text": "hi"}}, "prompt"),
        ({"prompt": [300]}, "prompt"),  # outside the vocabulary
        ({"prompt": ""}, "prompt"),
    ],
)
def test_bad_parameters_are_400(client, fields, param):
    assert_openai_error(complete(client, **fields), 400, param)


def test_malformed_json_and_wrong_media_type(client):
    error = assert_openai_error(
        client.post(
            "/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"}
        ),
        400,
    )
    assert error["type"] == "invalid_request_error"
    assert_openai_error(client.post("/v1/completions", content=b"[]"), 400)
    response = client.post(
        "/v1/completions", content=b"model=x", headers={"content-type": "text/plain"}
    )
    assert_openai_error(response, 415)


def test_unknown_model_is_404(client):
    error = assert_openai_error(complete(client, model="gpt-4"), 404, "model")
    assert error["code"] == "model_not_found"


def test_context_length_is_400_with_both_numbers(client, lm):
    error = assert_openai_error(complete(client, prompt="x" * 250, max_tokens=10), 400)
    assert error["code"] == "context_length_exceeded"
    assert str(lm.max_context) in error["message"] and "260" in error["message"]
    assert "250" in error["message"] and "10" in error["message"]
    assert not lm.requests


def test_body_too_large_is_413(client):
    response = complete(client, prompt="x" * (2 << 20))
    assert_openai_error(response, 413)


def test_overloaded_backend_is_503_with_retry_after():
    lm = fakes.FakeLM(fail_with=Overloaded(retry_after=3))
    with TestClient(make_app(lm)) as client:
        response = complete(client)
        assert_openai_error(response, 503)
        assert response.headers["retry-after"] == "3"
        assert_openai_error(complete(client, stream=True), 503)


def test_unexpected_backend_error_is_a_generic_500(caplog):
    lm = fakes.FakeLM(fail_with=RuntimeError("secret internal detail"))
    app = make_app(lm)
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.ERROR):
        response = complete(client)
    error = assert_openai_error(response, 500)
    assert "secret" not in response.text and error["type"] == "server_error"
    assert any("secret internal detail" in r.getMessage() or r.exc_info for r in caplog.records)


def test_timeout_is_504_or_an_error_event():
    lm = fakes.FakeLM(token_delay_s=0.2)
    with TestClient(make_app(lm, request_timeout_s=0.5)) as client:
        error = assert_openai_error(complete(client, max_tokens=50), 504)
        assert error["code"] == "request_timeout"
        events = stream(client, max_tokens=50)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "request_timeout"
    assert len(lm.cancelled) == 2


def test_unknown_route_and_method_use_the_error_body(client):
    assert_openai_error(client.get("/v1/nothing"), 404)
    assert_openai_error(client.get("/v1/completions"), 405)


def test_models_and_health(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["fake-lm", "fake-clip"]
    assert all(m["object"] == "model" for m in models["data"])
    assert client.get("/health").json()["status"] == "ok"


def test_served_model_names_are_aliases():
    app = make_app(fakes.FakeLM(), served_model_names=("public", "alias"))
    with TestClient(app) as client:
        assert complete(client, model="alias", max_tokens=1).json()["model"] == "alias"
        assert complete(client, model="fake-lm").status_code == 404
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["public", "alias"]


def test_api_token_guards_inference_routes():
    with TestClient(make_app(fakes.FakeLM(), api_token="k1")) as client:
        assert_openai_error(complete(client, max_tokens=1), 401)
        assert_openai_error(client.get("/v1/models", headers={"Authorization": "Bearer k2"}), 401)
        ok = {"Authorization": "Bearer k1"}
        body = {"model": "fake-lm", "prompt": "x", "max_tokens": 1}
        assert client.post("/v1/completions", json=body, headers=ok).status_code == 200
        assert client.get("/v1/models", headers=ok).status_code == 200
        assert client.get("/health").status_code == 200


def test_no_lm_means_404_for_completions(clip):
    with TestClient(make_app(None, clip)) as client:
        assert_openai_error(complete(client), 404)


def test_metrics_hook_sees_requests_tokens_and_routing(client, metrics):
    complete(client, max_tokens=4)
    complete(client, model="nope")
    finished = metrics.named("request_finished")
    assert [(e, c) for e, c, _ in finished] == [("/v1/completions", 200), ("/v1/completions", 404)]
    assert len(metrics.named("first_token")) == 1
    assert len(metrics.named("inter_token")) == 3
    assert metrics.named("tokens") == [("fake-lm", 6, 4)]
    [(_, routing)] = metrics.named("routing")
    assert routing.observations == 8


def test_the_backend_learns_whether_the_client_streams(client, lm):
    """Non-streaming requests let the backend batch events (fewer messages across Ray)."""
    complete(client, max_tokens=2, n=2)
    stream(client, max_tokens=2)
    assert lm.streamed == [False, False, True]


def test_the_app_imports_neither_ray_nor_torch():
    code = (
        "import sys, serving.http.api, serving.http.routes_completions, "
        "serving.http.routes_classify; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'torch')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_default_params_are_the_engines_sampling_params():
    engine = pytest.importorskip("mora_runtime.engine.core")
    lm = fakes.FakeLM()
    with TestClient(create_app(lm, None, None, ApiSettings())) as client:
        body = complete(client, prompt="abc", max_tokens=0, echo=True, logprobs=1).json()
        assert body["choices"][0]["text"] == "abc"
        assert complete(client, max_tokens=3, n=2, seed=0, mora={"top_k": 2}).status_code == 200
    assert all(isinstance(params, engine.SamplingParams) for _, _, params in lm.requests)
