"""Test doubles for the serving layer: a byte-level fake LM, a fake CLIP, a fake admin.

`SamplingParams` and `TokenEvent` mirror `mora_runtime.engine.core`'s field for field (a test in
test_protocol.py checks that against the real ones when the engine imports).

The fake tokenizer is byte level: a token is one UTF-8 byte, so a multi-byte character spans
several tokens and decoding a prefix can end in U+FFFD, as with real byte-level BPEs.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from PIL import Image

from mora_runtime.experts.stats import SequenceRouting
from serving.http.backend import ClassifyResult, MoraOverrides
from serving.http.errors import ExpertConflict, ExpertLoadFailed, NotFound, Overloaded

EOS = 256
VOCAB = 257


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    top_k: int | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token_id: int | None
    logprob: float | None
    top_logprobs: tuple[tuple[int, float], ...]
    finish_reason: str | None
    pool_version: int
    routing: SequenceRouting | None = None
    prompt_logprobs: tuple[tuple[float | None, tuple[tuple[int, float], ...]], ...] | None = None
    emitted_at: float = 0.0
    error: str | None = None


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids: list[int]) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


async def adecode(ids: list[int]) -> str:
    return decode(ids)


def token_logprob(step: int) -> float:
    return -0.25 * (step % 4 + 1)


def routing_for(tokens: int) -> SequenceRouting:
    return SequenceRouting(
        observations=2 * tokens,
        active_ranks=3 * tokens,
        set_activations={"arith": 4 * tokens, "poetry": 2 * tokens},
    )


class FakeLM:
    """Generates `script` (rotated by `seed` characters) byte by byte, cycling.

    Honours max_tokens ("length"), stop_token_ids ("stop"), logprobs and prompt_logprobs;
    with `eos=True` a final "stop" event without a token follows one pass of the script.
    Records every request, and which ones were cancelled or ran to the end.
    """

    model_name = "fake-lm"
    device_name = "cpu"  # what device() answers (/health)

    def __init__(
        self,
        script: str = "Hello, world! ",
        *,
        max_context: int = 256,
        eos: bool = False,
        token_delay_s: float = 0.0,
        fail_with: Exception | None = None,
        pool_version: int = 7,
    ) -> None:
        self.script = script
        self.max_context = max_context
        self.vocab_size = VOCAB
        self.eos = eos
        self.token_delay_s = token_delay_s
        self.fail_with = fail_with
        self.pool_version = pool_version
        self.requests: list[tuple[str, list[int], SamplingParams]] = []
        self.cancelled: set[str] = set()
        self.finished: set[str] = set()
        self.first_token_sent = threading.Event()
        self.streamed: list[bool] = []  # the `stream` flag of every generate call

    async def tokenize(self, text: str) -> list[int]:
        return encode(text)

    async def device(self) -> str:
        return self.device_name

    async def detokenize(self, ids: list[int]) -> str:
        return decode(ids)

    def output_ids(self, seed: int | None) -> list[int]:
        shift = (seed or 0) % len(self.script)
        return encode(self.script[shift:] + self.script[:shift])

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: Any, *, stream: bool
    ) -> AsyncIterator[TokenEvent]:
        self.requests.append((request_id, list(prompt_ids), params))
        self.streamed.append(stream)
        if self.fail_with is not None:
            raise self.fail_with
        out = self.output_ids(params.seed)
        prompt_lp = None
        if params.prompt_logprobs is not None:
            prompt_lp = tuple(
                (None, ()) if i == 0 else (-1.5, ((t, -1.5), (ord("?"), -2.5)))
                for i, t in enumerate(prompt_ids)
            )
        try:
            for step in range(params.max_tokens):
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                if self.eos and step == len(out):
                    yield self._event(request_id, None, step, params, "stop", prompt_lp)
                    break
                token = out[step % len(out)]
                reason = None
                if token in params.stop_token_ids:
                    reason = "stop"
                elif step == params.max_tokens - 1:
                    reason = "length"
                yield self._event(request_id, token, step, params, reason, prompt_lp)
                self.first_token_sent.set()
                prompt_lp = None
                if reason:
                    break
            self.finished.add(request_id)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.add(request_id)
            raise

    def _event(
        self,
        request_id: str,
        token: int | None,
        step: int,
        params: Any,
        reason: str | None,
        prompt_lp: Any,
    ) -> TokenEvent:
        logprob = top = None
        if params.logprobs is not None and token is not None:
            logprob = token_logprob(step)
            alternatives = [(token, logprob), (ord("~"), logprob - 1.0), (ord("#"), logprob - 2.0)]
            top = tuple(alternatives[: params.logprobs])
        return TokenEvent(
            request_id=request_id,
            token_id=token,
            logprob=logprob,
            top_logprobs=top or (),
            finish_reason=reason,
            pool_version=self.pool_version,
            routing=routing_for(step + 1) if reason else None,
            prompt_logprobs=prompt_lp,
            emitted_at=time.perf_counter(),
        )


class FakeClip:
    """Scores depend only on image size, so results are deterministic. `ready()` answers
    `is_ready` after `ready_delay_s` (so a slow answer can be tested)."""

    model_name = "fake-clip"
    default_labels = ("cat", "dog", "bird")

    def __init__(self, delay_s: float = 0.0, *, ready_delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.is_ready = True
        self.device_name = "cpu"
        self.ready_delay_s = ready_delay_s
        self.calls: list[tuple[list[tuple[int, int]], list[str] | None, MoraOverrides | None]]
        self.calls = []

    async def ready(self) -> bool:
        await asyncio.sleep(self.ready_delay_s)
        return self.is_ready

    async def device(self) -> str:
        await asyncio.sleep(self.ready_delay_s)
        return self.device_name

    async def classify(
        self, images: list[Image.Image], labels: list[str] | None, mora: MoraOverrides | None
    ) -> ClassifyResult:
        self.calls.append(([image.size for image in images], labels, mora))
        await asyncio.sleep(self.delay_s)
        names = tuple(labels) if labels is not None else self.default_labels
        rows = []
        for image in images:
            scores = [float((image.width + 3 * j) % 5 + 1) for j in range(len(names))]
            rows.append(tuple(score / sum(scores) for score in scores))
        return ClassifyResult(names, tuple(rows), pool_version=3, routing=routing_for(5))


class FakeAdmin:
    """Keeps expert sets in a dict; path "broken" fails validation, "busy" is overloaded."""

    def __init__(self) -> None:
        self.sets: dict[str, dict[str, Any]] = {}
        self.version = 0
        self.loads: list[tuple[str | None, bytes | None, str | None]] = []

    async def list_sets(self) -> dict[str, Any]:
        return {"object": "list", "pool_version": self.version, "data": list(self.sets.values())}

    async def load_set(self, path: str | None, upload: bytes | None, model: str | None) -> dict:
        self.loads.append((path, upload, model))
        name = path.rsplit("/", 1)[-1] if path else f"upload-{len(upload or b'')}"
        if name == "broken":
            raise ExpertLoadFailed("expert_set.json is missing", param="path")
        if name == "busy":
            raise Overloaded("another load is in flight", retry_after=2)
        if name in self.sets:
            raise ExpertConflict(f"an expert set named {name} is already loaded")
        self.version += 1
        self.sets[name] = {"name": name, "model": model, "version_added": self.version}
        return {"loaded": self.sets[name], "pool_version": self.version}

    async def retire_set(self, name: str) -> dict[str, Any]:
        if name not in self.sets:
            raise NotFound(f"no expert set named {name}", code="expert_set_not_found")
        del self.sets[name]
        self.version += 1
        return {"retired": name, "pool_version": self.version}


@dataclass
class RecordingMetrics:
    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))

    def request_finished(self, endpoint: str, code: int, seconds: float) -> None:
        self._record("request_finished", endpoint, code, seconds)

    def first_token(self, model: str, seconds: float) -> None:
        self._record("first_token", model, seconds)

    def inter_token(self, model: str, seconds: float) -> None:
        self._record("inter_token", model, seconds)

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        self._record("tokens", model, prompt, completion)

    def routing(self, model: str, routing: SequenceRouting) -> None:
        self._record("routing", model, routing)

    def expert_load(self, seconds: float, result: str) -> None:
        self._record("expert_load", seconds, result)

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [args for call, args in self.calls if call == name]


@contextlib.contextmanager
def running_server(app: Any) -> Iterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1 (a free port) in a thread; stops on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
