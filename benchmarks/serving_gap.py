"""Where one stream's tokens/s goes between the engine and the HTTP server.

    .venv/bin/python benchmarks/serving_gap.py [--rounds 2] [--requests 8] [--out PATH]

One client (concurrency 1) sends the peers benchmark's requests (64-token greedy completions
of chat-templated questions, default int4 SmolLM2) three ways, each round:
  engine alone       the engine in this process, nothing else running;
  engine + idle      the same engine while `mora serve` (one LM replica, CLIP off) idles
  server                 beside it: what Ray and Serve's own background work costs a step;
  HTTP               the same requests through that server's /v1/completions.
The two with the server alternate their order by round. Each row gives tokens/s, ms per
request, and the mean decode and prefill step: in-process from the engine's own step timings,
for HTTP from the server's `mora_engine_step_seconds` histogram. Then the CPU each
process of the idle server used (share of one core), read from /proc.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from bench_common import HERE, load_engine_benchmark, write_report
from peers import chat_prompts, measure, mora_config

from loadtest.server_process import ServerProcess, find_mora, read_addresses
from mora_runtime.cpu.openmp import in_fresh_thread
from mora_runtime.engine.params import SamplingParams
from mora_runtime.models.lm import load_causal_lm

TOKENS = 64
START_TIMEOUT_S = 900.0
TICK = os.sysconf("SC_CLK_TCK")
PROCESS_NAMES = (
    "LMServer", "MoraIngress", "ProxyActor", "ServeController", "Registry", "DashboardAgent",
    "raylet", "gcs_server", "mora serve",
)  # fmt: skip


class InProcess:
    """The engine in this process, with its steps timed."""

    def __init__(self) -> None:
        self.lm = in_fresh_thread(load_causal_lm, weights="int4")
        self.steps: dict[str, list[float]] = {"decode": [], "prefill": []}
        bench = load_engine_benchmark()
        self.engine = bench.lm_engine(self.lm, max_running=32, on_step=self._on_step)
        self.engine.start()

    def _on_step(self, timing, _per_token) -> None:
        self.steps["prefill" if timing.prefill_tokens else "decode"].append(timing.seconds)

    def run(self, texts: list[str]) -> dict[str, float]:
        tok = self.lm.tokenizer
        prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        for prompt in {tuple(p): p for p in prompts}.values():  # cached prefixes, as HTTP
            self.engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0.0))
        for steps in self.steps.values():
            steps.clear()
        started, produced = time.perf_counter(), 0
        for prompt in prompts:
            events = self.engine.generate(
                prompt, SamplingParams(max_tokens=TOKENS, temperature=0.0)
            )
            produced += sum(e.token_id is not None for e in events)
        elapsed = time.perf_counter() - started
        return {
            "tokens/s": produced / elapsed,
            "ms/request": elapsed / len(prompts) * 1e3,
            "decode step ms": statistics.mean(self.steps["decode"]) * 1e3,
            "prefill step ms": statistics.mean(self.steps["prefill"]) * 1e3,
        }


def step_totals(metrics_url: str) -> dict[str, tuple[float, float]]:
    return parse_step_totals(httpx.get(metrics_url, timeout=10.0).text)


def parse_step_totals(text: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of `mora_engine_step_seconds` per phase in Prometheus text, summed over
    replicas."""
    out: dict[str, list[float]] = {}
    pattern = r'^ray_mora_engine_step_seconds_(sum|count)\{[^}]*phase="(\w+)"[^}]*\} (\S+)$'
    for kind, phase, value in re.findall(pattern, text, flags=re.M):
        totals = out.setdefault(phase, [0.0, 0.0])
        totals[kind == "count"] += float(value)
    return {phase: (s, c) for phase, (s, c) in out.items()}


def through_http(server: ServerProcess, texts: list[str]) -> dict[str, float]:
    metrics_url = server.addresses.metrics_url
    base_url = server.addresses.base_url
    measure(base_url, texts[:1], 1, 1)  # the metrics exist before the "before" reading
    time.sleep(12.0)  # Ray exports metrics every few seconds
    before = step_totals(metrics_url)
    tps, per_request, _ = measure(base_url, texts, TOKENS, 1)  # per_request: tokens
    # every generated token after a request's first is one decode step
    expected = before.get("decode", (0.0, 0.0))[1] + len(texts) * (per_request - 1) - 1
    deadline = time.monotonic() + 60.0
    after = step_totals(metrics_url)
    while after.get("decode", (0.0, 0.0))[1] < expected and time.monotonic() < deadline:
        time.sleep(2.0)
        after = step_totals(metrics_url)
    row = {"tokens/s": tps, "ms/request": per_request / tps * 1e3}
    for phase in ("decode", "prefill"):
        s0, c0 = before.get(phase, (0.0, 0.0))
        s1, c1 = after.get(phase, (0.0, 0.0))
        row[f"{phase} step ms"] = (s1 - s0) / max(c1 - c0, 1) * 1e3
    return row


def process_cpu(seconds: float) -> dict[str, float]:
    """Share of one core each named process used over `seconds` (summed by name)."""

    def read() -> dict[str, tuple[str, float]]:
        out = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            name = next((n for n in PROCESS_NAMES if n in cmd), None)
            if name is not None:
                out[pid] = (name, (int(fields[11]) + int(fields[12])) / TICK)
        return out

    first = read()
    time.sleep(seconds)
    shares: dict[str, float] = {}
    for pid, (name, cpu) in read().items():
        if pid in first:
            shares[name] = shares.get(name, 0.0) + (cpu - first[pid][1]) / seconds
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serving_gap.md")
    args = parser.parse_args()
    engine = InProcess()
    questions = chat_prompts(engine.lm.tokenizer, load_engine_benchmark().QUESTIONS)
    texts = [questions[i % len(questions)] for i in range(args.requests)]
    rows: dict[str, list[dict[str, float]]] = {}
    idle: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="mora-gap-") as tmp:
        for r in range(args.rounds):
            rows.setdefault("engine alone", []).append(engine.run(texts))
            root = Path(tmp) / f"round{r}"
            (root / "store").mkdir(parents=True)
            config = mora_config(root, root / "store", secrets.token_hex(8), os.cpu_count() or 1)
            server = ServerProcess(find_mora(), config, read_addresses(config))
            server.start()
            try:
                server.wait_healthy(START_TIMEOUT_S)
                measure(server.addresses.base_url, texts, 1, 1)  # warm and cache prefixes
                time.sleep(5.0)
                idle.append(process_cpu(10.0))
                order = ("engine + idle server", "HTTP")
                for name in order if r % 2 == 0 else order[::-1]:
                    row = engine.run(texts) if name != "HTTP" else through_http(server, texts)
                    rows.setdefault(name, []).append(row)
                    print(f"round {r + 1} {name}: {row}", flush=True)
            finally:
                server.stop()
    engine.engine.shutdown()
    columns = ["tokens/s", "ms/request", "decode step ms", "prefill step ms"]
    lines = [
        f"Concurrency 1, {args.requests} requests of {TOKENS}-token greedy completions per run, "
        f"int4 SmolLM2, {os.cpu_count()} cores, medians of {args.rounds} rounds.",
        "",
        "| run | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, runs in rows.items():
        cells = [f"{statistics.median(run[c] for run in runs):.1f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "CPU of the idle server's processes (share of one core, median of rounds):", ""]
    lines += ["| process | CPU |", "|---|---:|"]
    names = sorted({n for sample in idle for n in sample}, key=lambda n: -idle[0].get(n, 0.0))
    for name in names:
        lines.append(f"| {name} | {statistics.median(s.get(name, 0.0) for s in idle):.1%} |")
    total = statistics.median(sum(s.values()) for s in idle)
    lines.append(f"| all | {total:.1%} |")
    write_report(args.out, "One stream: engine against server", "\n".join(lines))


if __name__ == "__main__":
    main()
