"""`/v1/completions` through a real Ray Serve: the openai SDK, batching, errors, disconnects.

Runs on the main config (two LM replicas of the tiny Llama) with an empty pool.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from tests.integration.builders import LONG_CONTEXT
from tests.integration.conftest import LM_NAME, wait_for

pytestmark = pytest.mark.integration
logger = logging.getLogger(__name__)

PROMPTS = (
    "the quick brown fox",
    "what is the capital of france?",
    "hello world",
    "a frozen base model learns new tasks one after another",
    "every expert scores itself",
    "paris",
    "the lazy dog jumps over the quick brown fox again and again",
    "tests",
)


@pytest.fixture(scope="module", autouse=True)
def empty_pool(server):
    server.retire_all()
    server.wait_converged()


def test_openai_client_non_streaming_and_streaming(server) -> None:
    client = server.openai()
    assert LM_NAME in {model.id for model in client.models.list()}

    done = client.completions.create(model=LM_NAME, prompt=PROMPTS[0], max_tokens=24, temperature=0)
    choice = done.choices[0]
    assert choice.text and choice.finish_reason == "length"
    assert done.usage.completion_tokens == 24
    assert done.usage.total_tokens == done.usage.prompt_tokens + 24
    assert done.model_extra["mora"]["pool_version"] == server.experts()["version"]

    chunks = list(
        client.completions.create(
            model=LM_NAME,
            prompt=PROMPTS[0],
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert text == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump() == done.usage.model_dump()
    assert last.model_extra["mora"] == done.model_extra["mora"]


def test_concurrent_requests_equal_sequential(server) -> None:
    def run(prompt: str, stream: bool) -> str:
        client = server.openai()
        if not stream:
            out = client.completions.create(
                model=LM_NAME, prompt=prompt, max_tokens=40, temperature=0
            )
            return out.choices[0].text
        chunks = client.completions.create(
            model=LM_NAME, prompt=prompt, max_tokens=40, temperature=0, stream=True
        )
        return "".join(chunk.choices[0].text for chunk in chunks)

    sequential = [run(prompt, False) for prompt in PROMPTS]
    assert len(set(sequential)) > 1, "distinct prompts should give distinct continuations"
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        started = time.perf_counter()
        concurrent = list(pool.map(run, PROMPTS, [i % 2 == 1 for i in range(len(PROMPTS))]))
        logger.info("%d concurrent requests: %.2f s", len(PROMPTS), time.perf_counter() - started)
    assert concurrent == sequential


def test_empty_pool_matches_hf_generate(server, tiny_lm) -> None:
    """Greedy through HTTP, Ray and the engine == `model.generate` on the same ids."""
    tokenizer, model = tiny_lm.tokenizer, tiny_lm.model
    max_tokens = 32
    for prompt in PROMPTS[:3]:
        ids = tokenizer(prompt)["input_ids"]  # what the ingress does with a text prompt
        with torch.inference_mode():
            out = model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                repetition_penalty=1.0,
                eos_token_id=list(tiny_lm.eos_token_ids),
                pad_token_id=tokenizer.pad_token_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
        new = out.sequences[0, len(ids) :].tolist()  # [new]
        logits = torch.stack(out.logits, dim=1)[0]  # [new, V]
        expected_logprobs = logits.log_softmax(-1).gather(1, torch.tensor(new)[:, None])[:, 0]
        # The continuation as OpenAI defines it: prompt + text == the decoded whole.
        prompt_text = tokenizer.decode(ids, skip_special_tokens=True)
        whole = tokenizer.decode(ids + new, skip_special_tokens=True)
        assert whole.startswith(prompt_text)
        expected_text = whole[len(prompt_text) :]

        for sent in (prompt, ids):  # text prompt, and the same ids sent as token ids
            body = server.complete(sent, max_tokens, logprobs=1)
            choice = body["choices"][0]
            assert body["usage"]["prompt_tokens"] == len(ids)
            assert body["usage"]["completion_tokens"] == len(new)
            assert choice["text"] == expected_text
            got = torch.tensor(choice["logprobs"]["token_logprobs"])
            assert len(got) == len(new)
            torch.testing.assert_close(got, expected_logprobs, atol=1e-4, rtol=0)


def test_context_overflow_is_a_400_naming_both_numbers(server) -> None:
    client = server.openai()
    prompt = PROMPTS[0]
    prompt_tokens = server.complete(prompt, 1)["usage"]["prompt_tokens"]
    max_tokens = LONG_CONTEXT - prompt_tokens + 1
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=LM_NAME, prompt=prompt, max_tokens=max_tokens)
    error = caught.value.body
    assert error["message"] and error["type"]
    assert str(prompt_tokens) in error["message"] and str(max_tokens) in error["message"]
    # At the limit exactly it is accepted (admission only; the stream is closed at once).
    stream = client.completions.create(
        model=LM_NAME, prompt=prompt, max_tokens=max_tokens - 1, stream=True
    )
    stream.close()


def test_poison_token_ids_are_a_400_and_leave_concurrent_streams_intact(server) -> None:
    """Ids outside the vocabulary are refused at the edge (the replica reports its vocab)
    while 8 greedy streams run: those end with exactly their text of a quiet run."""

    def stream(prompt: str) -> str:
        chunks = server.openai().completions.create(
            model=LM_NAME, prompt=prompt, max_tokens=24, temperature=0, stream=True
        )
        return "".join(chunk.choices[0].text for chunk in chunks)

    quiet = [stream(prompt) for prompt in PROMPTS]
    client = server.openai(max_retries=0)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        streams = [pool.submit(stream, prompt) for prompt in PROMPTS]
        for poison in ([999999999], [5, 2**31 - 1], [-1]):
            started = time.perf_counter()
            with pytest.raises(openai.BadRequestError) as caught:
                client.completions.create(model=LM_NAME, prompt=poison, max_tokens=4)
            logger.info("poison %s refused in %.3f s", poison, time.perf_counter() - started)
            assert caught.value.status_code == 400
        assert [s.result() for s in streams] == quiet


def test_unknown_model_is_a_404(server) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        server.openai().completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert caught.value.status_code == 404
    assert "no-such-model" in caught.value.body["message"]


def test_client_disconnect_frees_the_engine_slot(server) -> None:
    """A stream that would run for minutes is dropped after its first chunk: the replica's
    engine must stop it (`mora_num_requests_running` back to 0), not finish it."""

    def running() -> float | None:
        return server.metric_sum("ray_mora_num_requests_running", model=LM_NAME)

    wait_for(lambda: running() == 0, "an idle engine before the test", 60)
    # Greedy: the tiny model's end token has logit 0, so sampling (the API's default
    # temperature 1) drew it within a few hundred tokens in some runs and the stream ended
    # before it could be seen running; greedy never picks it over a positive logit.
    stream = server.openai().completions.create(
        model=LM_NAME,
        prompt=PROMPTS[1],
        max_tokens=LONG_CONTEXT - 64,
        temperature=0.0,
        stream=True,
    )
    try:
        assert next(iter(stream)).choices[0].text is not None
        wait_for(lambda: (running() or 0) >= 1, "the stream to show as running", 60)
    finally:
        stream.close()
    closed = time.perf_counter()
    wait_for(lambda: running() == 0, "the engine slot to be freed after the disconnect", 60)
    logger.info("slot freed within %.1f s of the disconnect", time.perf_counter() - closed)
    assert server.complete(PROMPTS[2], 4)["usage"]["completion_tokens"] == 4
