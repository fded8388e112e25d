"""Continuous batching engine: equals HF generate, batched == sequential, versions pinned."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mora_runtime.engine.core import Engine
from mora_runtime.engine.params import SamplingParams
from mora_runtime.engine.types import EngineConfig, EngineOverloaded, TokenEvent
from mora_runtime.experts.patching import patch_model
from mora_runtime.experts.slots import RoutingConfig

VOCAB = 128


def no_eos(model):
    # The engines under test run without an end token; so must the `generate` reference
    # (with an eos id, `min_new_tokens` would mask that token out and change its picks).
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    return model


# The shape of the tiny Llama-family models the engine tests run (tests/models reuses it).
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    # A peaked model: with the default 0.02 the logits are so flat that an off-by-one
    # position (RoPE) still picks the same tokens.
    initializer_range=0.2,
)


def tiny_llama():
    torch.manual_seed(0)
    return no_eos(LlamaForCausalLM(LlamaConfig(**TINY_SHAPE)).eval())


def tiny_qwen2():  # q/k/v with bias
    torch.manual_seed(0)
    return no_eos(Qwen2ForCausalLM(Qwen2Config(**TINY_SHAPE, use_sliding_window=False)).eval())


def tiny_mistral():
    torch.manual_seed(0)
    return no_eos(MistralForCausalLM(MistralConfig(**TINY_SHAPE, sliding_window=None)).eval())


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, initializer_range=0.2)
    return no_eos(GPT2LMHeadModel(cfg).eval())


# The Llama family runs the engine's compact forward (tests/models/test_llama_compact.py),
# GPT-2 HF's forward.
MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral, "gpt2": tiny_gpt2}


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(3 + 5 * i % 17),), generator=g).tolist() for i in range(n)]


def reference_scores(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """HF greedy tokens and the logits [n, V] each was picked from."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[0, len(prompt) :].tolist(), torch.cat(out.logits)


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    return reference_scores(model, prompt, n)[0]


def make_engine(model, pool=None, **config) -> Engine:
    engine = Engine(
        model, eos_token_ids=(), max_context=256, pool=pool, config=EngineConfig(**config)
    )
    engine.start()
    return engine


def tokens(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def run_concurrently(engine: Engine, items: list[tuple[list[int], SamplingParams]]):
    results: dict[int, list[TokenEvent]] = {i: [] for i in range(len(items))}
    done = threading.Semaphore(0)

    def callback(i):
        def on_event(event: TokenEvent) -> None:
            results[i].append(event)
            if event.finish_reason is not None:
                done.release()

        return on_event

    for i, (prompt, params) in enumerate(items):
        engine.submit(prompt, params, callback(i))
    for _ in items:
        assert done.acquire(timeout=120)
    return [results[i] for i in range(len(items))]


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_equals_hf_generate_alone_and_batched(name):
    model = MODELS[name]()
    engine = make_engine(model)
    try:
        greedy = SamplingParams(max_tokens=12, temperature=0.0)
        batch = prompts(6)
        want = [hf_greedy(model, p, 12) for p in batch]
        alone = [tokens(engine.generate(p, greedy)) for p in batch]
        together = [tokens(ev) for ev in run_concurrently(engine, [(p, greedy) for p in batch])]
    finally:
        engine.shutdown()
    assert alone == want
    assert together == want


def test_requests_join_a_running_batch_and_leave_early():
    model = tiny_llama()
    engine = make_engine(model, max_running=4)
    try:
        items = [
            (p, SamplingParams(max_tokens=3 + 4 * (i % 3), temperature=0.0))
            for i, p in enumerate(prompts(10, seed=1))
        ]
        got = run_concurrently(engine, items)
    finally:
        engine.shutdown()
    for (prompt, params), events in zip(items, got, strict=True):
        assert tokens(events) == hf_greedy(model, prompt, params.max_tokens)
        assert events[-1].finish_reason == "length"
        assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)


def test_seeded_sampling_is_reproducible_and_independent_of_batch():
    model = tiny_llama()
    engine = make_engine(model)
    try:
        params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7)
        prompt = prompts(1, seed=2)[0]
        first = tokens(engine.generate(prompt, params))
        second = tokens(engine.generate(prompt, params))
        other = SamplingParams(max_tokens=10, temperature=1.0, seed=8)
        batched = run_concurrently(engine, [(prompt, params), (prompt, other)])
    finally:
        engine.shutdown()
    assert first == second == tokens(batched[0])
    assert tokens(batched[1]) != first


def test_stop_tokens_logprobs_and_penalties():
    model = tiny_llama()
    engine = make_engine(model)
    try:
        prompt = prompts(1, seed=3)[0]
        free = tokens(engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0)))
        stop_at = free[3]
        stopped = engine.generate(
            prompt, SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(stop_at,))
        )
        scored = engine.generate(
            prompt, SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, prompt_logprobs=2)
        )
        long_free = tokens(engine.generate(prompt, SamplingParams(max_tokens=48, temperature=0)))
        penalised = tokens(
            engine.generate(
                prompt, SamplingParams(max_tokens=48, temperature=0.0, presence_penalty=100.0)
            )
        )
    finally:
        engine.shutdown()
    first_stop = free.index(stop_at)
    assert tokens(stopped) == free[:first_stop]
    assert stopped[-1].finish_reason == "stop" and stopped[-1].token_id is None
    for event in scored:
        assert event.logprob is not None and event.logprob <= 0
        assert len(event.top_logprobs) == 3
        assert event.top_logprobs[0][0] == event.token_id  # greedy picks the top token
    prompt_lp = scored[0].prompt_logprobs
    assert prompt_lp is not None and len(prompt_lp) == len(prompt) and prompt_lp[0][0] is None
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    torch.testing.assert_close(prompt_lp[1][0], float(logits[0, prompt[1]]), rtol=1e-4, atol=1e-4)
    assert len(set(long_free)) < 48  # a greedy loop on a 128-token vocabulary repeats ...
    assert len(set(penalised)) == 48  # ... and a large presence penalty forbids it


def test_free_running_slots_count_as_waiting_room():
    # A burst that arrives before the engine thread has admitted anything is held up to
    # max_running + max_waiting, the bound the server's edge assumes; past it, refused.
    engine = Engine(
        tiny_llama(),
        eos_token_ids=(),
        max_context=256,
        config=EngineConfig(max_running=3, max_waiting=2),
    )
    seen: list[TokenEvent] = []
    params = SamplingParams(max_tokens=4, temperature=0.0)
    for i in range(5):
        engine.submit([1, 2, 3], params, seen.append, f"r{i}")
    with pytest.raises(EngineOverloaded):
        engine.submit([1, 2, 3], params, seen.append, "over")
    engine.step()  # three admitted: the running slots are taken, two still wait
    assert engine.num_running == 3
    with pytest.raises(EngineOverloaded):
        engine.submit([1, 2, 3], params, seen.append, "still over")
    for _ in range(12):  # 4 tokens each, three then two at a time
        engine.step()
    assert sorted(e.request_id for e in seen if e.finish_reason) == [f"r{i}" for i in range(5)]


def test_abort_frees_the_slot_and_overload_is_refused():
    model = tiny_llama()
    engine = Engine(
        model, eos_token_ids=(), max_context=256, config=EngineConfig(max_running=1, max_waiting=1)
    )
    seen: list[TokenEvent] = []
    engine.submit(prompts(1)[0], SamplingParams(max_tokens=50, temperature=0.0), seen.append, "a")
    engine.step()  # prefill "a": the one running slot is taken
    engine.submit([1, 2], SamplingParams(), seen.append, "b")  # the one waiting place
    with pytest.raises(EngineOverloaded, match="1 requests are already waiting"):
        engine.submit([1, 2], SamplingParams(), seen.append, "c")
    engine.step()  # one decode
    assert engine.num_running == 1
    engine.abort("a")
    engine.abort("b")
    engine.step()
    assert engine.num_running == 0
    assert sorted((e.request_id, e.finish_reason) for e in seen if e.finish_reason) == [
        ("a", "abort"),
        ("b", "abort"),
    ]
    with pytest.raises(ValueError, match="context length"):
        engine.submit([1] * 250, SamplingParams(max_tokens=10), seen.append)


def test_each_sequence_keeps_its_admission_version():
    model = tiny_llama()
    pool = patch_model(model, routing=RoutingConfig(top_k=4, tau=0.1, threshold=0.05))
    g = torch.Generator().manual_seed(0)

    def expert_set():
        return {
            p: (
                torch.randn(8, lay.in_features, generator=g),
                torch.randn(8, lay.out_features) * 0.5,
            )
            for p, lay in pool.layers.items()
        }

    pool.add_set("a", expert_set())
    engine = Engine(model, eos_token_ids=(), max_context=256, pool=pool)
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    prompt = prompts(1, seed=4)[0]

    def run_alone() -> list[TokenEvent]:
        out: list[TokenEvent] = []
        engine.submit(prompt, greedy, out.append)
        while not out or out[-1].finish_reason is None:
            engine.step()
        return out

    at_v1 = run_alone()
    old: list[TokenEvent] = []
    engine.submit(prompt, greedy, old.append)
    engine.step()
    engine.step()  # the request is mid-flight at version 1 ...
    engine.run_exclusive(lambda: pool.add_set("b", expert_set()))  # ... when "b" arrives
    new: list[TokenEvent] = []
    engine.submit(prompt, greedy, new.append)
    while old[-1].finish_reason is None or not new or new[-1].finish_reason is None:
        engine.step()
    at_v2 = run_alone()
    assert tokens(old) == tokens(at_v1) and {e.pool_version for e in old} == {1}
    assert tokens(new) == tokens(at_v2) and {e.pool_version for e in new} == {2}
    assert tokens(at_v1) != tokens(at_v2)  # the versions really differ
    routing = old[-1].routing
    assert routing is not None and routing.observations > 0
    assert set(routing.set_activations) <= {"a"}
    assert pool.live_versions() == {}  # every snapshot was released


def test_a_request_finishing_on_its_first_token_leaves_the_others_running():
    # The new rows of a prefill follow the running ones; retiring one of them must not hit
    # a running sequence (it used to abort the wrong request).
    model = tiny_llama()
    engine = Engine(model, eos_token_ids=(), max_context=256)
    long_prompt, short_prompt = prompts(2, seed=5)
    long_events: list[TokenEvent] = []
    short_events: list[TokenEvent] = []
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    engine.submit(long_prompt, greedy, long_events.append)
    engine.step()
    engine.step()
    engine.submit(short_prompt, SamplingParams(max_tokens=1, temperature=0.0), short_events.append)
    for _ in range(20):  # bounded: a wrongly retired row would never finish
        if long_events and long_events[-1].finish_reason is not None:
            break
        engine.step()
    assert [e.finish_reason for e in short_events] == ["length"]
    assert long_events[-1].finish_reason == "length"
    assert tokens(long_events) == hf_greedy(model, long_prompt, 12)
    assert engine.num_running == 0


def test_run_exclusive_runs_on_the_engine_thread_between_steps_and_reports_errors():
    # Pool mutations are torch work: on a running engine they must run on its own thread,
    # the only long-lived one allowed a torch thread pool (mora_runtime/cpu/openmp.py).
    model = tiny_llama()
    engine = Engine(model, eos_token_ids=(), max_context=256)
    caller = threading.current_thread()
    # not started: a short-lived thread, not the caller's
    assert engine.run_exclusive(lambda: threading.current_thread()) is not caller
    engine.start()
    try:
        engine.submit(prompts(1)[0], SamplingParams(max_tokens=40, temperature=0.0), lambda e: None)
        assert engine.run_exclusive(lambda: threading.current_thread().name) == "mora-engine"
        # a job that itself asks for exclusivity (it already has it) must not wait on itself
        nested: list[int] = []
        caller_thread = threading.Thread(
            target=lambda: nested.append(engine.run_exclusive(lambda: engine.run_exclusive(int))),
            daemon=True,  # a deadlock fails the assertion below instead of hanging pytest
        )
        caller_thread.start()
        caller_thread.join(30)
        assert nested == [0]

        def broken() -> None:
            raise ValueError("bad set")

        with pytest.raises(ValueError, match="bad set"):
            engine.run_exclusive(broken)
        done = threading.Event()
        engine.submit(
            prompts(1)[0], SamplingParams(max_tokens=3), lambda e: e.finish_reason and done.set()
        )
        assert done.wait(30)  # the engine kept serving after the failed job
    finally:
        engine.shutdown()
    # stopped: short-lived threads again
    assert engine.run_exclusive(lambda: threading.current_thread().name) != "mora-engine"
