"""Hot-loading expert sets into two live LM replicas through `/v1/experts`.

Properties: no request fails while a set is loaded under load, each request is served by one
pool version (its text is that version's greedy text), every replica serves the committed
pool afterwards, a failed load changes nothing anywhere, identical concurrent loads are one
load, retiring everything gives back the base model's output, and a replica that starts
later (after the registry itself restarted) serves the committed pool; a set loaded again
counts its activations from zero.
"""

from __future__ import annotations

import copy
import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
import torch

from tests.integration.builders import save_random_set
from tests.integration.conftest import ADMIN_TOKEN, LM_NAME, wait_for

pytestmark = pytest.mark.integration
logger = logging.getLogger(__name__)

PROMPTS = ("the quick brown fox", "what is the capital of france?")
MAX_TOKENS = 160
STREAMS = 16


@dataclass
class Outcome:
    prompt: str
    started: float
    first_chunk: float | None = None
    ended: float | None = None
    text: str = ""
    version: int | None = None
    active_ranks: float | None = None
    error: str | None = None


@pytest.fixture(scope="module")
def base_texts(server) -> dict[str, str]:
    """Greedy texts of the base model (empty pool), recorded once for the module."""
    server.retire_all()
    server.wait_converged()
    yield {p: server.complete(p, MAX_TOKENS)["choices"][0]["text"] for p in PROMPTS}
    server.retire_all()
    server.wait_converged()


def committed(state: dict) -> list[tuple[str, int]]:
    return [(s["name"], s["version_added"]) for s in state["sets"]]


def greedy(server) -> dict[str, tuple[str, int]]:
    out = {}
    for prompt in PROMPTS:
        body = server.complete(prompt, MAX_TOKENS)
        out[prompt] = (body["choices"][0]["text"], body["mora"]["pool_version"])
    return out


def _nothing() -> None:
    pass


def stream_once(client, prompt: str, on_first_chunk=_nothing) -> Outcome:
    outcome = Outcome(prompt, time.monotonic())
    try:
        chunks = client.completions.create(
            model=LM_NAME,
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts = []
        for chunk in chunks:
            if outcome.first_chunk is None:
                outcome.first_chunk = time.monotonic()
                on_first_chunk()
            if chunk.choices:
                parts.append(chunk.choices[0].text)
            else:  # the usage chunk carries the `mora` block
                outcome.version = chunk.model_extra["mora"]["pool_version"]
                outcome.active_ranks = chunk.model_extra["mora"]["active_ranks_per_token"]
        outcome.text = "".join(parts)
    except Exception as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.ended = time.monotonic()
    return outcome


def test_hot_load_during_streams(server, base_texts, tiny_lm) -> None:
    v0 = server.wait_converged()["version"]
    old = greedy(server)
    assert {version for _, version in old.values()} == {v0}
    assert {p: text for p, (text, _) in old.items()} == base_texts
    save_random_set(tiny_lm.model, server.store_root / "hot-a", "hot-a", seed=1)

    outcomes: list[Outcome] = []
    lock = threading.Lock()
    streaming = threading.Semaphore(0)
    loaded = threading.Event()
    load_returned = [float("inf")]

    def client_loop(index: int) -> None:
        client = server.openai()
        prompt = PROMPTS[index % len(PROMPTS)]
        signal = streaming.release
        while True:
            outcome = stream_once(client, prompt, signal)
            signal = _nothing
            with lock:
                outcomes.append(outcome)
            if outcome.error or (loaded.is_set() and outcome.started > load_returned[0]):
                return

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(STREAMS)]
    for thread in threads:
        thread.start()
    try:
        # Load once every client has a stream in flight.
        for _ in range(STREAMS):
            assert streaming.acquire(timeout=120)
        load_started = time.monotonic()
        response = server.load("hot-a")
        load_returned[0] = time.monotonic()
    finally:
        loaded.set()
        for thread in threads:
            thread.join(timeout=300)
    assert response.status_code == 200, response.text
    v1 = response.json()["version"]
    assert v1 == v0 + 1
    logger.info(
        "load under %d streams: %.2f s, %d requests",
        STREAMS,
        load_returned[0] - load_started,
        len(outcomes),
    )

    assert [o.error for o in outcomes if o.error] == []
    assert {o.version for o in outcomes} <= {v0, v1}
    in_flight = [o for o in outcomes if o.first_chunk < load_started and o.ended > load_returned[0]]
    after = [o for o in outcomes if o.started > load_returned[0]]
    assert in_flight, "some streams should have spanned the load"
    assert {o.version for o in in_flight} == {v0}  # admitted before: the old pool throughout
    assert len(after) == STREAMS and {o.version for o in after} == {v1}

    state = server.wait_converged()
    assert state["version"] == v1
    assert len(state["replicas"]["causal_lm"]) == 2
    for replica in state["replicas"]["causal_lm"]:
        assert replica["pool_version"] == v1
        assert [s["name"] for s in replica["sets"]] == ["hot-a"]

    new = greedy(server)
    assert {version for _, version in new.values()} == {v1}
    assert any(new[p][0] != old[p][0] for p in PROMPTS), "the set should change greedy text"
    texts = {v0: {p: t for p, (t, _) in old.items()}, v1: {p: t for p, (t, _) in new.items()}}
    for outcome in outcomes:  # one version per request, for every one of its tokens
        assert outcome.text == texts[outcome.version][outcome.prompt]
    assert all(o.active_ranks > 0 for o in after)
    assert all(o.active_ranks == 0 for o in outcomes if o.version == v0)


def test_failed_loads_change_nothing(server, base_texts, tiny_lm) -> None:
    before = server.wait_converged()
    reference = greedy(server)
    store = server.store_root

    broken = save_random_set(tiny_lm.model, store / "broken", "broken", seed=4)
    tensors = broken / "expert_set.safetensors"
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])

    alien_model = copy.deepcopy(tiny_lm.model)  # another base model, same shapes
    with torch.no_grad():
        alien_model.model.layers[0].self_attn.q_proj.weight.add_(0.01)
    save_random_set(alien_model, store / "alien", "alien", seed=5)

    outside = store.parent / "outside"
    shutil.copytree(store / "alien", outside, dirs_exist_ok=True)

    for path in ("broken", "alien", "missing", "../outside", "/etc"):
        response = server.load(path)
        assert 400 <= response.status_code < 500, (path, response.status_code, response.text)
        error = response.json()["error"]
        assert error["message"] and "Traceback" not in error["message"], path
        logger.info("load %s -> %d: %s", path, response.status_code, error["message"])

    after = server.experts()
    assert after["version"] == before["version"]
    assert committed(after) == committed(before)
    for replica in after["replicas"]["causal_lm"]:
        assert replica["pool_version"] == before["version"]
        assert replica["sets"] == before["replicas"]["causal_lm"][0]["sets"]
    assert greedy(server) == reference


def test_identical_concurrent_loads_are_one_load(server, tiny_lm) -> None:
    version = server.wait_converged()["version"]
    save_random_set(tiny_lm.model, server.store_root / "hot-b", "hot-b", seed=2)

    def load(_: int) -> httpx.Response:
        return httpx.post(
            f"{server.base_url}/v1/experts",
            json={"path": "hot-b"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=120,
        )

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(load, range(6)))
    codes = [r.status_code for r in responses]
    logger.info("6 identical concurrent loads -> %s", codes)
    assert set(codes) <= {200, 409} and 200 in codes
    assert {r.json()["version"] for r in responses if r.status_code == 200} == {version + 1}
    state = server.wait_converged()
    assert state["version"] == version + 1
    assert [s["name"] for s in state["sets"]].count("hot-b") == 1


def test_retire(server, base_texts, tiny_lm) -> None:
    save_random_set(tiny_lm.model, server.store_root / "ret-a", "ret-a", seed=6)
    assert server.load("ret-a").status_code == 200
    state = server.wait_converged()
    first, *rest = [s["name"] for s in state["sets"]]
    response = server.admin("DELETE", f"/v1/experts/{first}")
    assert response.status_code == 200, response.text
    assert response.json()["version"] == state["version"] + 1
    assert server.admin("DELETE", f"/v1/experts/{first}").status_code == 404
    for name in rest:
        response = server.admin("DELETE", "/v1/experts", params={"name": name})
        assert response.status_code == 200, response.text

    state = server.wait_converged()
    assert state["sets"] == []
    assert all(r["sets"] == [] for r in state["replicas"]["causal_lm"])
    after = greedy(server)  # nothing loaded any more: the base model's output again
    assert {p: text for p, (text, _) in after.items()} == base_texts
    assert {version for _, version in after.values()} == {state["version"]}


def test_a_set_loaded_again_counts_its_activations_from_zero(server, tiny_lm) -> None:
    save_random_set(tiny_lm.model, server.store_root / "cnt-a", "cnt-a", seed=7)

    def count() -> int:
        return next(s["activations"] for s in server.experts()["sets"] if s["name"] == "cnt-a")

    assert server.load("cnt-a").status_code == 200
    server.wait_converged()
    body = server.complete(PROMPTS[0], 16)
    assert "cnt-a" in [e["name"] for e in body["mora"]["expert_sets"]], body["mora"]
    assert count() > 0
    assert server.admin("DELETE", "/v1/experts/cnt-a").status_code == 200
    server.wait_converged()
    assert server.load("cnt-a").status_code == 200
    server.wait_converged()
    assert count() == 0  # the counts of the set's earlier load are gone
    server.complete(PROMPTS[1], 16)
    assert count() > 0
    assert server.admin("DELETE", "/v1/experts/cnt-a").status_code == 200
    server.wait_converged()


def test_late_replica_serves_the_committed_pool(server, tiny_lm) -> None:
    """Restart the registry actor (it reloads registry.json), then kill one LM replica: the
    replica Serve starts in its place must come up with the committed pool."""
    import ray

    from serving.cluster.registry import ACTOR_NAME, NAMESPACE

    save_random_set(tiny_lm.model, server.store_root / "hot-c", "hot-c", seed=3)
    response = server.load("hot-c")
    assert response.status_code == 200, response.text
    version = response.json()["version"]
    state = server.wait_converged()
    old_ids = {r["replica"] for r in state["replicas"]["causal_lm"]}
    expected = greedy(server)
    assert {v for _, v in expected.values()} == {version}

    ray.kill(ray.get_actor(ACTOR_NAME, namespace=NAMESPACE), no_restart=False)
    replicas = [
        actor
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if "LMServer" in actor["name"]
    ]
    assert len(replicas) == 2, replicas
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]))

    def replaced() -> dict | None:
        response = server.admin("GET")
        if response.status_code != 200:  # e.g. while the registry actor restarts
            logger.info("GET /v1/experts -> %d", response.status_code)
            return None
        state = response.json()
        ids = {r["replica"] for r in state["replicas"]["causal_lm"]}
        return state if len(ids) == 2 and ids - old_ids else None

    state = wait_for(replaced, "a replacement LM replica", 120)
    assert state["version"] == version
    for replica in state["replicas"]["causal_lm"]:
        assert replica["pool_version"] == version
        assert [s["name"] for s in replica["sets"]] == ["hot-c"]
    with ThreadPoolExecutor(8) as pool:  # enough to reach both replicas
        results = list(pool.map(lambda _: greedy(server), range(8)))
    assert all(result == expected for result in results)
