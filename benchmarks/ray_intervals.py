"""Ray Serve's background intervals against one stream's speed and a lost replica's return.

    .venv/bin/python benchmarks/ray_intervals.py [--rounds 3] [--requests 16] [--out PATH]

On two cores, every bit of CPU Ray and Serve spend in the background can stall a decode
step (its two torch threads wait for each other). Serve's controller runs its control loop
every 0.1 s and each replica exports its metrics every 0.1 s by default. This starts
`mora serve` (one LM replica, CLIP off) alternately with Serve's defaults and with
`TUNED` (the same variables in the server's environment), in alternating order by round,
and measures on each:
  idle CPU       the share of one core the server's processes use while idle;
  tokens/s       one client, 64-token greedy completions of chat-templated questions;
  back after     seconds from SIGKILL of the LM replica's process to the next completion
                 answered (the controller notices, starts a replica, it loads the model).
Prints medians and the ratios tuned / default; writes `benchmarks/results/ray_intervals.md`.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import httpx
from bench_common import HERE, load_engine_benchmark, write_report
from peers import chat_prompts, measure, mora_config
from serving_gap import START_TIMEOUT_S, TOKENS, process_cpu
from transformers import AutoTokenizer

from loadtest.server_process import ServerProcess, find_mora, read_addresses
from mora_runtime.paths import default_lm_dir
from serving.config import ServerConfig

TUNED = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
}
VARIANTS = ("default", "tuned")


def replica_pid(server: ServerProcess) -> int:
    """The LM replica's process among those of this server's session (it runs in its own)."""
    assert server.process is not None
    session = os.getsid(server.process.pid)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            if "ServeReplica:mora:LMServer" in cmd and os.getsid(int(pid)) == session:
                return int(pid)
        except OSError:
            continue
    raise RuntimeError("no LM replica process in the server's session")


def back_after_kill(server: ServerProcess, model: str) -> float:
    """Seconds from SIGKILL of the LM replica to the next completion answered 200."""
    body = {"model": model, "prompt": "Hello", "max_tokens": 1}
    url = f"{server.addresses.base_url}/v1/completions"
    killed = time.perf_counter()
    os.kill(replica_pid(server), signal.SIGKILL)
    while time.perf_counter() - killed < 300:
        try:
            if httpx.post(url, json=body, timeout=60).status_code == 200:
                return time.perf_counter() - killed
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the LM replica did not come back within 300 s")


def run_variant(name: str, root: Path, texts: list[str]) -> dict[str, float]:
    (root / "store").mkdir(parents=True)
    config = mora_config(root, root / "store", secrets.token_hex(8), os.cpu_count() or 1)
    server = ServerProcess(find_mora(), config, read_addresses(config))
    with mock.patch.dict(os.environ, TUNED if name == "tuned" else {}):
        server.start()  # the server's processes inherit this environment
    try:
        server.wait_healthy(START_TIMEOUT_S)
        base_url = server.addresses.base_url
        measure(base_url, texts, 1, 1)  # warm, prefixes cached
        time.sleep(5.0)
        row = {"idle CPU %": 100 * sum(process_cpu(10.0).values())}
        row["tokens/s"] = measure(base_url, texts, TOKENS, 1)[0]
        row["back after s"] = back_after_kill(server, ServerConfig().lm.served_name)
        print(f"{name}: {row}", flush=True)
        return row
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "ray_intervals.md")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(default_lm_dir(), local_files_only=True)
    questions = chat_prompts(tokenizer, load_engine_benchmark().QUESTIONS)
    texts = [questions[i % len(questions)] for i in range(args.requests)]
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="mora-intervals-") as tmp:
        for r in range(args.rounds):
            for name in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                rows[name].append(run_variant(name, Path(tmp) / f"{r}-{name}", texts))
    columns = ["idle CPU %", "tokens/s", "back after s"]
    settings = ", ".join(f"`{k}={v}`" for k, v in TUNED.items())
    lines = [
        f"One LM replica (CLIP off), {os.cpu_count()} cores, {args.rounds} rounds alternating "
        f"Serve's defaults with {settings}; concurrency 1, {args.requests} requests of "
        f"{TOKENS}-token greedy completions per run; medians (every round in brackets).",
        "",
        "| what | default | tuned | tuned / default |",
        "|---|---:|---:|---:|",
    ]
    for column in columns:
        a, b = (statistics.median(run[column] for run in rows[n]) for n in VARIANTS)
        every = [" / ".join(f"{run[column]:.1f}" for run in rows[n]) for n in VARIANTS]
        lines.append(f"| {column} | {a:.1f} ({every[0]}) | {b:.1f} ({every[1]}) | {b / a:.2f}x |")
    write_report(args.out, "Ray Serve's background intervals", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
