"""llama.cpp's `llama-server` against `mora serve` on the same GGUF, alternating runs.

    .venv/bin/python benchmarks/peers.py [--rounds 3] [--concurrency 1,4,16,32] [--sets 10]
        [--requests-per-client 4] [--threads N] [--quick] [--out PATH]

`make bench-peers` runs it. First it builds `llama-server` once into the cache
(benchmarks/llama_server.py). Both servers load the bundled SmolLM2-135M-Instruct Q4_1 GGUF
(mora serves its default int4 weights, on the GGUF's grid) with the same number of threads,
and stay up for the whole run: llama-server with one slot per client of the highest
concurrency (continuous batching), mora with CLIP off. Every request is a greedy
`--tokens`-token completion of a chat-templated question (the model's own chat template,
applied here, so both servers get identical text) through `/v1/completions`; tokens/s count
`usage.completion_tokens` (a request may end early at EOS, on either server: mora has no
`ignore_eos`), from closed-loop clients, `--requests-per-client` requests per client and run.
Every run first sends each of its distinct prompts once (1 token): both servers reuse cached
prompt prefixes, and the steady state is what is measured.

A round measures each concurrency in two pool phases: mora's pool empty, and `--sets` random
expert sets x 16 ranks on q/k/v/o hot-loaded through POST /v1/experts (retired again through
DELETE); alternate rounds take the phases in the other order. In each phase and at each
concurrency the two servers run back to back, alternate pairs in the other order, and
the ratio of a pair is mora / llama. The table gives medians over rounds (ratios: of the
pairs' ratios); the plot shows tokens/s against concurrency. While one server is measured
the other idles (llama-server waits on its queue; Ray keeps a little background work).

`--quick` is a smoke run (1 round, concurrency 1 and 4, 2 sets, 1 request per client) that
writes its report into a temporary directory unless `--out` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import llama_server
import yaml
from bench_common import HERE, load_engine_benchmark, write_report
from peers_report import (
    LLAMA,
    MORA,
    POOLS,
    Measurement,
    markdown_table,
    plot,
    prompt_mismatches,
    summarise,
)

from loadtest.client import LoadClient
from loadtest.hotload import generate_sets
from loadtest.server_process import ServerProcess, find_mora, read_addresses
from loadtest.workload import RequestSpec
from mora_runtime.models.lm import default_gguf_path, prepare_default_lm
from mora_runtime.models.materialize import read_marker

RANK = 16
RESULTS = HERE / "results" / "peers.md"
CTX_PER_SLOT = 1024  # tokens of context each llama-server slot keeps (prompt + completion)
START_TIMEOUT_S = 600.0  # mora serve starts Ray and loads the model; a busy machine is slow
DEFAULTS = {"rounds": 3, "concurrency": (1, 4, 16, 32), "sets": 10, "requests_per_client": 4}
QUICK = {"rounds": 1, "concurrency": (1, 4), "sets": 2, "requests_per_client": 1}


def parse_concurrency(text: str) -> tuple[int, ...]:
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text}"
        ) from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"concurrencies must be >= 1: {text}")
    return tuple(values)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags left out take `QUICK`'s values under --quick, else `DEFAULTS`'."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=positive)
    parser.add_argument("--concurrency", type=parse_concurrency, help="e.g. 1,4,16,32")
    parser.add_argument("--sets", type=int, help="random expert sets in the loaded phase")
    parser.add_argument("--requests-per-client", type=positive)
    parser.add_argument("--tokens", type=positive, default=64)
    parser.add_argument(
        "--threads", type=positive, default=None, help="per server (default: all cores)"
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--rebuild", action="store_true", help="build llama-server again")
    parser.add_argument("--out", type=Path, help="report path (the plot goes beside it)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.sets < 1:
        parser.error("--sets must be >= 1 (the loaded phase needs a pool)")
    if args.threads is None:
        args.threads = os.cpu_count() or 1
    if args.out is None:
        quick_dir = Path(tempfile.mkdtemp(prefix="mora-peers-")) if args.quick else None
        args.out = (quick_dir / "peers.md") if quick_dir else RESULTS
    return args


def schedule(rounds: int, concurrency: tuple[int, ...]) -> list[tuple[int, str, int, tuple]]:
    """(round, pool phase, concurrency, server order) in run order: alternate rounds take the
    pool phases in the other order, and a (phase, concurrency) pair's server order alternates
    from round to round, so neither order nor phase is always first."""
    plan = []
    for round_ in range(rounds):
        for pool in POOLS if round_ % 2 == 0 else POOLS[::-1]:
            for j, c in enumerate(concurrency):
                order = (LLAMA, MORA) if (round_ + j) % 2 == 0 else (MORA, LLAMA)
                plan.append((round_, pool, c, order))
    return plan


def chat_prompts(tokenizer, questions: list[str]) -> list[str]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in questions
    ]


async def closed_loop(
    client: LoadClient, model: str | None, prompts: list[str], tokens: int, concurrency: int
) -> tuple[float, float, float]:
    """`concurrency` clients take the next prompt when their request ends; returns completion
    tokens/s, completion tokens and prompt tokens per request. Raises on any failed request."""
    queue = deque(
        RequestSpec(id=i, kind="completions", at=None, prompt=p, max_tokens=tokens)
        for i, p in enumerate(prompts)
    )
    records = []

    async def user() -> None:
        while queue:
            records.append(await client.send(queue.popleft(), model, 0.0))

    started = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    failed = [r for r in records if not r.ok]
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {len(records)} requests failed, first: "
            f"{failed[0].error} {failed[0].error_message}"
        )
    produced = sum(r.output_tokens for r in records)
    prompt_tokens = sum(r.prompt_tokens for r in records)
    return produced / elapsed, produced / len(records), prompt_tokens / len(records)


def measure(
    base_url: str, prompts: list[str], tokens: int, concurrency: int
) -> tuple[float, float, float]:
    async def run() -> tuple[float, float, float]:
        async with LoadClient(base_url, temperature=0.0, timeout_s=600.0) as client:
            model = await client.first_model()
            distinct = list(dict.fromkeys(prompts))
            await closed_loop(client, model, distinct, 1, min(concurrency, len(distinct)))
            return await closed_loop(client, model, prompts, tokens, concurrency)

    return asyncio.run(run())


def set_pool(base_url: str, token: str, names: list[str], loaded: bool) -> None:
    async def run() -> None:
        async with LoadClient(base_url, admin_token=token, timeout_s=300.0) as client:
            for name in names:
                call = client.load_set if loaded else client.retire_set
                status, body = await call(name)
                if status != 200:
                    raise RuntimeError(f"{'load' if loaded else 'retire'} {name}: {status} {body}")

    asyncio.run(run())


def mora_config(root: Path, store: Path, token: str, threads: int) -> Path:
    from serving.cluster.launcher import free_ports

    port, metrics_port = free_ports(2)
    config = {
        "port": port,
        "metrics_port": metrics_port,
        "expert_store": str(store),
        "admin_token": token,
        "lm": {"torch_threads": threads},
        "clip": {"enabled": False},
    }
    path = root / "mora.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def method_text(args: argparse.Namespace, slots: int, version: str) -> str:
    return (
        f"{args.tokens}-token greedy completions of chat-templated questions on "
        f"SmolLM2-135M-Instruct Q4_1 (the bundled GGUF), CPU, {args.threads} threads per "
        f"server. llama-server: {version}, from the llama-cpp-python {llama_server.VERSION} "
        f"sdist, `--parallel {slots} --ctx-size {slots * CTX_PER_SLOT}`. mora serve: 1 LM "
        "replica, default (int4) weights, CLIP off. Closed-loop clients, "
        f"{args.requests_per_client} request(s) per client and run (at least 8 a run), each "
        f"run after its prompts were sent once; {args.rounds} round(s), each with mora's pool "
        f"empty and with {args.sets} random sets x {RANK} ranks on q/k/v/o, the two servers "
        "measured back to back at each concurrency (alternating which goes first). tokens/s "
        "count `usage.completion_tokens` (either server may stop at EOS before the limit: "
        "tokens/request shows how often); medians over rounds; mora / llama: the median of "
        "the per-round ratios. Equal prompt tokens mean both servers saw the same tokens."
    )


def busy_warning() -> float:
    """The 1-minute load average, with a warning when other work competes for the cores:
    both servers spread each step over all their threads, and a step waits for the slowest,
    so a busy machine's figures say more about the machine than about the servers."""
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    if load > cores / 2:
        print(
            f"warning: the machine is busy (load average {load:.1f} on {cores} cores); "
            "measure on a quiet machine",
            flush=True,
        )
    return load


def run_rounds(
    args: argparse.Namespace, urls: dict[str, str], token: str, sets: list[str], questions
) -> list[Measurement]:
    """Every run of `schedule`, loading or retiring mora's sets between pool phases."""
    measurements = []
    loaded = False
    for round_, pool, c, order in schedule(args.rounds, args.concurrency):
        if (pool == "loaded") != loaded:
            loaded = pool == "loaded"
            print(f"{'loading' if loaded else 'retiring'} the sets ...", flush=True)
            set_pool(urls[MORA], token, sets, loaded)
        n = max(args.requests_per_client * c, 8)
        prompts = [questions[i % len(questions)] for i in range(n)]
        for server in order:
            t0 = time.monotonic()
            tps, tpr, ptr = measure(urls[server], prompts, args.tokens, c)
            measurements.append(Measurement(round_, pool, c, server, tps, tpr, ptr))
            print(
                f"round {round_ + 1}/{args.rounds}, pool {pool}, concurrency {c}, "
                f"{server}: {tps:.1f} tokens/s ({time.monotonic() - t0:.0f} s)",
                flush=True,
            )
    return measurements


def write_results(
    args: argparse.Namespace, measurements: list[Measurement], header: str, argv: list[str]
) -> None:
    rows = summarise(measurements)
    labels = {"empty": "empty", "loaded": f"{args.sets} sets x {RANK} ranks"}
    png = plot(rows, labels, args.out.with_suffix(".png"))
    for row in prompt_mismatches(rows):
        print(
            f"warning: prompt lengths differ at {row.pool}/{row.concurrency}: llama "
            f"{row.llama_prompt_tokens:.1f}, mora {row.mora_prompt_tokens:.1f} tokens",
            flush=True,
        )
    command = " ".join(["benchmarks/peers.py", *argv])
    table = markdown_table(rows, labels)
    text = f"{header}\n\nCommand: `{command}` (`make bench-peers`).\n\n{table}\n"
    write_report(args.out, "llama-server against mora serve", text + f"![plot]({png.name})\n")
    print(f"plot: {png}", flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.monotonic()
    load_before = busy_warning()
    binary = llama_server.ensure_built(force=args.rebuild)
    version = str((read_marker(llama_server.install_dir()) or {}).get("server_version"))

    from transformers import AutoTokenizer

    from serving.cluster.launcher import free_ports

    tokenizer = AutoTokenizer.from_pretrained(prepare_default_lm(), local_files_only=True)
    questions = chat_prompts(tokenizer, load_engine_benchmark().QUESTIONS)
    slots = max(args.concurrency)
    with tempfile.TemporaryDirectory(prefix="mora-peers-run-") as tmp:
        root = Path(tmp)
        mora = find_mora()
        print(f"writing {args.sets} random expert sets ...", flush=True)
        sets = generate_sets(root / "store", args.sets, rank=RANK, prefix="peers", mora=mora)
        token = secrets.token_hex(8)
        config = mora_config(root, root / "store", token, args.threads)
        mora_server = ServerProcess(mora, config, read_addresses(config))
        (llama_port,) = free_ports(1)
        command = llama_server.server_command(
            binary,
            default_gguf_path(),
            port=llama_port,
            threads=args.threads,
            slots=slots,
            ctx_per_slot=CTX_PER_SLOT,
        )
        print("starting llama-server and mora serve ...", flush=True)
        with llama_server.running(command, llama_port, root / "llama-server.log") as llama:
            mora_server.start()
            try:
                mora_server.wait_healthy(START_TIMEOUT_S)
                urls = {LLAMA: llama.addresses.base_url, MORA: mora_server.addresses.base_url}
                measurements = run_rounds(args, urls, token, sets, questions)
            finally:
                mora_server.stop()
    minutes = (time.monotonic() - started) / 60
    header = method_text(args, slots, version) + (
        f" The whole run took {minutes:.0f} min; the machine's 1-minute load average was "
        f"{load_before:.1f} before it and {os.getloadavg()[0]:.1f} after ({os.cpu_count()} "
        "cores)."
    )
    write_results(args, measurements, header, argv)


if __name__ == "__main__":
    main()
