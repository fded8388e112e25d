"""How fast the server says no: overload bursts and oversized prompts, edge limits on vs off.

    .venv/bin/python benchmarks/overload.py [--burst 400] [--rate 20] [--seconds 15]
        [--rounds 2] [--out PATH]

Starts the default LM (CLIP off) twice per round, alternating: with the edge limits of the
default config (completions past replicas x (max_ongoing + max_queued) refused on arrival,
text prompts over the context x 32 characters refused before tokenising) and with both
lifted (the model replica's own Ray queue refuses the overload; the prompt is tokenised in
full before its length is judged). Each server gets:
- a burst of `--burst` concurrent 16-token completions: latency of the 503s and the 200s;
- while the burst is in flight, GET /health one call after another: the floor any answer
  pays on the way through Ray Serve's HTTP proxy to the ingress in that state;
- sustained overload: 64-token completions arriving open-loop at `--rate` per second for
  `--seconds` (several times what one replica finishes), so the server stays full and every
  further arrival is refused one at a time, not queued behind hundreds of others;
- a 20 MB body (413 before parsing, the same in both: a reference) and a 4 MB text prompt.
Prints the percentiles and the ratios off / on, writes `benchmarks/results/overload.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_common import HERE, write_report

RESULTS = HERE / "results" / "overload.md"
# benchmarks/ is sys.path[0] when run as a script, and its serving.py would shadow the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def burst(url: str, model: str, n: int) -> dict[str, list[float]]:
    """`n` completions at once; seconds per outcome ("200", "503 overloaded", ...)."""
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=0)
    body = {"model": model, "prompt": "Tell me about the sea.", "max_tokens": 16}
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one() -> tuple[str, float]:
            started = time.perf_counter()
            response = await client.post(f"{url}/v1/completions", json=body)
            return outcome(response), time.perf_counter() - started

        async def health() -> list[tuple[str, float]]:
            timed = []
            await asyncio.sleep(0.5)  # the burst is arriving
            for _ in range(10):
                started = time.perf_counter()
                response = await client.get(f"{url}/health")
                timed.append((f"health {response.status_code}", time.perf_counter() - started))
            return timed

        floor = asyncio.ensure_future(health())
        results = await asyncio.gather(*(one() for _ in range(n)))
        results += await floor
    by_outcome: dict[str, list[float]] = {}
    for key, seconds in results:
        by_outcome.setdefault(key, []).append(seconds)
    return by_outcome


async def saturated(url: str, model: str, rate: float, seconds: float) -> dict[str, list[float]]:
    """Completions arriving open-loop at `rate` per second for `seconds`; seconds per
    outcome."""
    n = int(rate * seconds)
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=0)
    body = {"model": model, "prompt": "Tell me about the sea.", "max_tokens": 64}
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one(delay: float) -> tuple[str, float]:
            await asyncio.sleep(delay)
            started = time.perf_counter()
            response = await client.post(f"{url}/v1/completions", json=body)
            return outcome(response), time.perf_counter() - started

        results = await asyncio.gather(*(one(i / rate) for i in range(n)))
    by_outcome: dict[str, list[float]] = {}
    for key, elapsed in results:
        by_outcome.setdefault(key, []).append(elapsed)
    return by_outcome


def outcome(response: httpx.Response) -> str:
    if response.status_code == 200:
        return "200"
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = "(no JSON body)"
    return f"{response.status_code} {code}"


def big(url: str, model: str, chars: int) -> tuple[int, float]:
    started = time.perf_counter()
    response = httpx.post(
        f"{url}/v1/completions",
        json={"model": model, "prompt": "word " * (chars // 5), "max_tokens": 1},
        timeout=600,
    )
    return response.status_code, time.perf_counter() - started


def measure(limits_on: bool, args: argparse.Namespace, root: Path) -> dict[str, tuple | list]:
    from serving.cluster import launcher
    from serving.config import ServerConfig

    http_port, metrics_port = launcher.free_ports(2)
    limits = (
        {}
        if limits_on
        else {
            "max_inflight_completions": 10**9,
            "max_prompt_chars_per_token": 10**6,
        }
    )
    cfg = ServerConfig.model_validate(
        {
            "port": http_port,
            "metrics_port": metrics_port,
            "expert_store": str(root / "store"),
            "clip": {"enabled": False},
            "limits": limits,
        }
    ).resolved()
    url = f"http://127.0.0.1:{http_port}"
    label = "limits on" if limits_on else "limits off"
    print(f"{label}: starting the server ...", flush=True)
    launcher.start(cfg)
    try:
        model = cfg.lm.served_name
        httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1})
        out: dict[str, tuple[int, float] | list] = {}
        measured = {f"burst {k}": v for k, v in asyncio.run(burst(url, model, args.burst)).items()}
        sustained = asyncio.run(saturated(url, model, args.rate, args.seconds))
        measured |= {f"saturated {k}": v for k, v in sustained.items()}
        for key, seconds in sorted(measured.items()):
            print(
                f"  {key}: {len(seconds)}, p50 {pct(seconds, 0.5):.3f} s, "
                f"p99 {pct(seconds, 0.99):.3f} s",
                flush=True,
            )
            out[key] = seconds
        for name, chars in (("20 MB body", 20 << 20), ("4 MB prompt", 4 << 20)):
            out[name] = big(url, model, chars)
            print(f"  {name}: {out[name][0]} in {out[name][1]:.3f} s", flush=True)
        return out
    finally:
        launcher.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=400)
    parser.add_argument("--rate", type=float, default=20.0, help="sustained arrivals per second")
    parser.add_argument("--seconds", type=float, default=15.0, help="sustained overload, s")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs: dict[bool, list[dict]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = (True, False) if round_ % 2 == 0 else (False, True)
            for limits_on in order:
                runs[limits_on].append(measure(limits_on, args, Path(tmp)))

    lines = [
        f"Burst of {args.burst} concurrent 16-token completions, then 64-token completions "
        f"arriving at {args.rate:g}/s for {args.seconds:g} s (saturated), against the default "
        f"LM (one replica, CLIP off), {args.rounds} rounds alternating limits on/off; seconds.",
        "",
        "| what | limits on | limits off | off / on |",
        "|---|---:|---:|---:|",
    ]

    def pooled(limits_on: bool, key: str) -> list[float]:
        return [s for run in runs[limits_on] for s in run.get(key, [])]

    timed = {k for r in runs[True] + runs[False] for k in r if k.startswith(("burst", "satur"))}
    for key in sorted(timed):
        on, off = pooled(True, key), pooled(False, key)
        for q in (0.5, 0.99):
            a, b = pct(on, q), pct(off, q)
            lines.append(
                f"| {key} ({len(on)} / {len(off)} requests) p{int(q * 100)} | {a:.3f} | "
                f"{b:.3f} | {b / a:.1f}x |"
            )
    for key in ("20 MB body", "4 MB prompt"):
        on = [r[key] for r in runs[True]]
        off = [r[key] for r in runs[False]]
        a = statistics.median(s for _, s in on)
        b = statistics.median(s for _, s in off)
        statuses = f"{on[0][0]} / {off[0][0]}"
        lines.append(f"| {key} ({statuses}) median | {a:.3f} | {b:.3f} | {b / a:.1f}x |")
    text = "\n".join(lines)
    write_report(args.out, "Overload and oversized requests", text + "\n")


if __name__ == "__main__":
    main()
