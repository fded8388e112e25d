"""The real default SmolLM2-135M-Instruct behind a started server, through the openai SDK.

Shares the integration tier's Ray instance (`ServeCluster`: one per pytest run) and deploys
the default model on it with its own expert store; CLIP is off. Uses the cache named by
MORA_CACHE (`make test` prepares it first).
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import ServeCluster

pytestmark = [pytest.mark.slow, pytest.mark.integration]

QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def default_server():
    cluster = ServeCluster.acquire()
    try:
        cluster.deploy(cluster.config(store="default-store", clip={"enabled": False}))
        yield cluster
    finally:
        cluster.release()


@pytest.fixture(scope="module")
def chat_prompt() -> str:
    from transformers import AutoTokenizer

    from mora_runtime.models.lm import prepare_default_lm

    tokenizer = AutoTokenizer.from_pretrained(prepare_default_lm(), local_files_only=True)
    messages = [{"role": "user", "content": QUESTION}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_default_model_answers_a_chat_question(default_server, chat_prompt) -> None:
    client = default_server.openai()
    model = default_server.cfg.lm.served_name
    assert model in {m.id for m in client.models.list()}
    out = client.completions.create(model=model, prompt=chat_prompt, max_tokens=32, temperature=0)
    text = out.choices[0].text
    assert "Paris" in text, text
    assert "<|im_end|>" not in text  # special tokens are not part of the text
    assert out.usage.completion_tokens <= 32


def test_default_model_streams_with_the_openai_client(default_server, chat_prompt) -> None:
    client = default_server.openai()
    model = default_server.cfg.lm.served_name
    done = client.completions.create(model=model, prompt=chat_prompt, max_tokens=24, temperature=0)
    chunks = list(
        client.completions.create(
            model=model,
            prompt=chat_prompt,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [chunk.choices[0].text for chunk in chunks if chunk.choices]
    assert len(pieces) > 1  # streamed token by token, not in one piece
    assert "".join(pieces) == done.choices[0].text
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == done.usage.completion_tokens
    assert chunks[-1].model_extra["mora"]["pool_version"] == 0
