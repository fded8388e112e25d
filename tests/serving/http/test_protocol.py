"""Request models: validation table, the sampling-params converter, response helpers."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from mora_runtime.experts.stats import SequenceRouting
from serving.http.errors import BadRequest, ContextLengthExceeded, validation_error
from serving.http.protocol import (
    ClassifyRequest,
    CompletionRequest,
    ExpertLoadRequest,
    Limits,
    parse_request,
)
from serving.http.responses import (
    CompletionChunk,
    MoraInfo,
)
from tests.serving import fakes

LIMITS = Limits(max_n=4, max_top_k=16, max_prompts=3)


def parse(body: dict | str, cls=CompletionRequest, limits: Limits = LIMITS):
    raw = body if isinstance(body, str) else json.dumps(body)
    return parse_request(cls, raw.encode(), limits)


def completion(**fields):
    return {"model": "m", "prompt": "hi", **fields}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 5}, "n"),
        ({"n": True}, "n"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),  # allowed only with echo
        ({"logprobs": 6}, "logprobs"),
        ({"presence_penalty": 2.1}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "x"}, "suffix"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"mora": {"top_k": 17}}, "mora.top_k"),
        ({"mora": {"top_k": 0}}, "mora.top_k"),
        ({"mora": {"threshold": 1.5}}, "mora.threshold"),
        ({"mora": {"tau": 0.1}}, "mora.tau"),
        ({"mora": "fast"}, "mora"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [-1, 2]}, "prompt"),
        ({"prompt": ["a", "b", "c", "d"]}, "prompt"),
        ({"seed": 2**64}, "seed"),
        ({"model": None}, "model"),
        ({"echo": "yes"}, "echo"),
    ],
)
def test_bad_fields_are_400_naming_the_param(fields, param):
    with pytest.raises(BadRequest) as info:
        parse(completion(**fields))
    assert info.value.status == 400
    assert info.value.param == param
    body = info.value.body()["error"]
    assert body["type"] == "invalid_request_error"
    assert param.split(".")[0] in body["message"]


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"prompt": ["a", "b"]},
        {"prompt": [1, 2, 3]},
        {"prompt": [[1, 2], [3]]},
        {"temperature": 0, "top_p": 1, "n": 4, "best_of": 4, "logprobs": 0},
        {"temperature": None, "top_p": None, "max_tokens": None, "stop": None},
        {"echo": True, "max_tokens": 0, "logprobs": 1},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"logit_bias": {}, "suffix": None, "user": "u1"},
        {"mora": {"top_k": 16, "threshold": 0.0}},
        {"seed": -(2**63)},
    ],
)
def test_good_requests_parse(fields):
    parse(completion(**fields))


def test_missing_required_and_malformed_json():
    with pytest.raises(BadRequest) as info:
        parse({"prompt": "hi"})
    assert info.value.param == "model"
    for raw in ("{", "", "[1, 2]", '{"model": "m", "prompt": "x",}'):
        with pytest.raises(BadRequest):
            parse(raw)
    with pytest.raises(BadRequest) as info:
        parse("{not json")
    assert info.value.code == "invalid_json"


def test_unknown_fields_are_accepted_and_logged_once(caplog):
    with caplog.at_level(logging.WARNING, logger="serving.http.protocol"):
        for _ in range(3):
            req = parse(completion(zz_frobnicate=1, zz_guided_json={"a": 1}))
    assert req.model_extra == {"zz_frobnicate": 1, "zz_guided_json": {"a": 1}}
    lines = [r.getMessage() for r in caplog.records if "zz_frobnicate" in r.getMessage()]
    assert len(lines) == 1
    assert "zz_guided_json" in lines[0]


def test_to_sampling_params_maps_every_field():
    req = parse(
        completion(
            max_tokens=9,
            temperature=0.5,
            top_p=0.9,
            n=3,
            seed=10,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            logprobs=2,
            echo=True,
            mora={"top_k": 4, "threshold": 0.3},
        )
    )
    params = req.to_sampling_params(fakes.SamplingParams, index=2)
    assert params == fakes.SamplingParams(
        max_tokens=9,
        temperature=0.5,
        top_p=0.9,
        seed=12,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logprobs=2,
        prompt_logprobs=2,
        top_k=4,
        threshold=0.3,
    )


def test_to_sampling_params_defaults_match_openai():
    params = parse(completion()).to_sampling_params(fakes.SamplingParams)
    assert params == fakes.SamplingParams(max_tokens=16)
    nulls = completion(temperature=None, top_p=None, max_tokens=None, seed=None)
    assert parse(nulls).to_sampling_params(fakes.SamplingParams) == params
    # echo only: the engine still runs one step; logprobs without echo: no prompt logprobs
    echo_only = parse(completion(echo=True, max_tokens=0)).to_sampling_params(fakes.SamplingParams)
    assert echo_only.max_tokens == 1
    assert parse(completion(logprobs=1)).to_sampling_params(dict)["prompt_logprobs"] is None


def test_fake_engine_types_match_the_real_ones():
    engine = pytest.importorskip("mora_runtime.engine.core")

    def fields(cls):
        return [(f.name, f.default) for f in dataclasses.fields(cls)]

    assert fields(engine.SamplingParams) == fields(fakes.SamplingParams)
    assert [f.name for f in dataclasses.fields(engine.TokenEvent)] == [
        f.name for f in dataclasses.fields(fakes.TokenEvent)
    ]
    # the converter's output is accepted by the real class
    req = parse(completion(echo=True, logprobs=1, mora={"top_k": 2}, seed=1))
    assert req.to_sampling_params(engine.SamplingParams, index=1).seed == 2


def test_prompts_normalise_to_a_list():
    assert parse(completion(prompt="x")).prompts() == ["x"]
    assert parse(completion(prompt=[1, 2])).prompts() == [[1, 2]]
    assert parse(completion(prompt=[[1], [2]])).prompts() == [[1], [2]]
    assert parse(completion(prompt=["a", "b"])).prompts() == ["a", "b"]


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside", "a/../../b", "~root", "C:\\x"])
def test_expert_paths_must_stay_inside_the_store(path):
    with pytest.raises(BadRequest) as info:
        parse({"path": path}, ExpertLoadRequest)
    assert info.value.param == "path"


def test_expert_paths_are_normalised_and_extra_fields_refused():
    assert parse({"path": "sets/./math/"}, ExpertLoadRequest).path == "sets/math"
    with pytest.raises(BadRequest):
        parse({"path": "a", "force": True}, ExpertLoadRequest)


def test_classify_request_validation():
    assert parse({"images": ["aGk="]}, ClassifyRequest).labels is None
    for bad, param in [
        ({"images": []}, "images"),
        ({"images": "aGk="}, "images"),
        ({"images": ["x"], "labels": "cat"}, "labels"),
        ({"images": ["x"], "top_k": 0}, "top_k"),
        ({"images": ["x"], "mora": {"top_k": 99}}, "mora.top_k"),
    ]:
        with pytest.raises(BadRequest) as info:
            parse(bad, ClassifyRequest)
        assert info.value.param == param


def test_context_length_message_names_both_numbers():
    error = ContextLengthExceeded(prompt_tokens=100, max_tokens=60, max_context=128)
    body = error.body()["error"]
    assert error.status == 400 and body["code"] == "context_length_exceeded"
    for number in ("128", "160", "100", "60"):
        assert number in body["message"]


def test_validation_error_param_paths():
    error = validation_error(
        [{"loc": ("body", "prompt", 0), "msg": "bad", "type": "x"}], located=True
    )
    assert error.param == "prompt[0]"
    assert validation_error([{"loc": ("path",), "msg": "bad", "type": "x"}]).param == "path"
    assert validation_error([]).status == 400


def test_mora_info_from_routing_sorts_shares():
    routing = SequenceRouting(observations=4, active_ranks=10, set_activations={"a": 1, "b": 3})
    info = MoraInfo.from_routing(5, routing)
    assert info.active_ranks_per_token == 2.5
    assert [(s.name, s.share) for s in info.expert_sets] == [("b", 0.75), ("a", 0.25)]
    empty = MoraInfo.from_routing(0, None)
    assert (empty.active_ranks_per_token, empty.expert_sets) == (0.0, [])


def test_chunk_sse_framing_keeps_null_finish_reason():
    chunk = CompletionChunk(id="cmpl-1", created=1, model="m", choices=[])
    line = chunk.sse()
    assert line.startswith("data: ") and line.endswith("\n\n")
    payload = json.loads(line[len("data: ") :])
    assert "usage" not in payload and "mora" not in payload
