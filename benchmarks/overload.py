"""How fast the server says no: overload bursts and oversized prompts, edge limits on vs off.

    .venv/bin/python benchmarks/overload.py [--burst 400] [--rate 20] [--seconds 15]
        [--rounds 3] [--out PATH]

Starts the default LM (CLIP off) three times per round, in rotated order: with the edge
limits of the default config (completions past replicas x (max_ongoing + max_queued)
refused on arrival, in Ray Serve's HTTP proxy and at the ingress; text prompts over the
context x 32 characters refused before tokenising), the same without the proxy's gate
(refused at the ingress replica only), and with every limit lifted (the model replica's own
Ray queue refuses the overload; the prompt is tokenised in full before its length is
judged). Each server gets:
- a burst of `--burst` concurrent 16-token completions: latency of the 503s and the 200s;
- while the burst is in flight, GET /health one call after another: the floor any answer
  pays on the way through Ray Serve's HTTP proxy to the ingress in that state;
- sustained overload: 64-token completions arriving open-loop at `--rate` per second for
  `--seconds` (several times what one replica finishes), so the server stays full and every
  further arrival is refused one at a time, not queued behind hundreds of others;
- a 20 MB body (413 before parsing, the same in both: a reference) and a 4 MB text prompt.
Each round first sends the same burst to a bare ASGI app (uvicorn, no Ray, no model) that
refuses everything: the floor this machine and this client set for the burst's refusals.
Requests are written on bare sockets, one connection each (`request`), so the client's own
cost stays out of the figures.
Prints the percentiles and the ratios to the defaults, writes `benchmarks/results/overload.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
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


async def request(port: int, method: str, path: str, body: dict | None = None) -> tuple[str, float]:
    """One HTTP/1.1 request on its own connection, by hand: (outcome, seconds). A burst of
    hundreds through httpx costs the client itself most of a second on a small machine,
    which would be charged to the server; a bare socket costs the client almost nothing."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode() if body is not None else b""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    writer.write(head.encode() + data)
    await writer.drain()
    response = await reader.read()  # Connection: close: the server ends the response
    writer.close()
    elapsed = time.perf_counter() - started
    status_line, _, rest = response.partition(b"\r\n")
    status = int(status_line.split()[1])
    return outcome(status, rest.partition(b"\r\n\r\n")[2]), elapsed


async def burst(port: int, model: str, n: int) -> dict[str, list[float]]:
    """`n` completions at once, with GET /health one call after another meanwhile; seconds
    per outcome ("200", "503 overloaded", "health 200", ...)."""
    body = {"model": model, "prompt": "Tell me about the sea.", "max_tokens": 16}

    async def health() -> list[tuple[str, float]]:
        await asyncio.sleep(0.5)  # the burst is arriving
        timed = []
        for _ in range(10):
            status, seconds = await request(port, "GET", "/health")
            timed.append((f"health {status.split()[0]}", seconds))
        return timed

    floor = asyncio.ensure_future(health())
    results = await asyncio.gather(
        *(request(port, "POST", "/v1/completions", body) for _ in range(n))
    )
    results += await floor
    return by_outcome(results)


def refuse_all(port: int) -> None:
    """The floor a burst's refusals can reach on this machine: a bare ASGI app (uvicorn,
    no Ray, no model) that answers every completion with the same 503 body."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def refuse(request: Request) -> JSONResponse:
        await request.body()
        error = {"message": "at capacity", "type": "server_error", "code": "overloaded"}
        return JSONResponse({"error": error}, status_code=503, headers={"Retry-After": "1"})

    async def healthy(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    routes = [Route("/v1/completions", refuse, methods=["POST"]), Route("/health", healthy)]
    uvicorn.run(Starlette(routes=routes), host="127.0.0.1", port=port, log_level="warning")


def measure_floor(args: argparse.Namespace) -> dict[str, list[float]]:
    from serving.cluster import launcher

    (port,) = launcher.free_ports(1)
    server = subprocess.Popen([sys.executable, __file__, "--refuse-all", str(port)])
    try:
        for _ in range(100):  # up within a few seconds
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        print("floor (a bare ASGI app refusing everything):", flush=True)
        measured = {f"burst {k}": v for k, v in asyncio.run(burst(port, "m", args.burst)).items()}
        report(measured)
        return measured
    finally:
        server.terminate()
        server.wait(timeout=30)


def report(measured: dict[str, list[float]]) -> None:
    for key, seconds in sorted(measured.items()):
        print(
            f"  {key}: {len(seconds)}, p50 {pct(seconds, 0.5):.3f} s, "
            f"p99 {pct(seconds, 0.99):.3f} s",
            flush=True,
        )


async def saturated(port: int, model: str, rate: float, seconds: float) -> dict[str, list[float]]:
    """Completions arriving open-loop at `rate` per second for `seconds`; seconds per
    outcome."""
    body = {"model": model, "prompt": "Tell me about the sea.", "max_tokens": 64}

    async def one(delay: float) -> tuple[str, float]:
        await asyncio.sleep(delay)
        return await request(port, "POST", "/v1/completions", body)

    results = await asyncio.gather(*(one(i / rate) for i in range(int(rate * seconds))))
    return by_outcome(results)


def by_outcome(results: list[tuple[str, float]]) -> dict[str, list[float]]:
    """Seconds of each request, grouped by outcome ("200", "503 overloaded", ...)."""
    grouped: dict[str, list[float]] = {}
    for key, seconds in results:
        grouped.setdefault(key, []).append(seconds)
    return grouped


def outcome(status: int, body: bytes) -> str:
    if status == 200:
        return "200"
    try:  # the JSON error object, whether the body came whole or in chunks
        code = json.loads(body[body.find(b"{") : body.rfind(b"}") + 1])["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = "(no JSON body)"
    return f"{status} {code}"


def big(url: str, model: str, chars: int) -> tuple[int, float]:
    started = time.perf_counter()
    response = httpx.post(
        f"{url}/v1/completions",
        json={"model": model, "prompt": "word " * (chars // 5), "max_tokens": 1},
        timeout=600,
    )
    return response.status_code, time.perf_counter() - started


# The servers compared, by the `limits` of their config: the defaults; the same without the
# proxy's gate (completions refused at the ingress replica only); and every edge limit lifted.
VARIANTS: dict[str, dict[str, object]] = {
    "limits on": {},
    "no proxy gate": {"refuse_at_proxy": False},
    "limits off": {
        "refuse_at_proxy": False,
        "max_inflight_completions": 10**9,
        "max_prompt_chars_per_token": 10**6,
    },
}


def measure(label: str, args: argparse.Namespace, root: Path) -> dict[str, tuple | list]:
    from serving.cluster import launcher
    from serving.config import ServerConfig

    http_port, metrics_port = launcher.free_ports(2)
    limits = VARIANTS[label]
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
    print(f"{label}: starting the server ...", flush=True)
    launcher.start(cfg)
    try:
        model = cfg.lm.served_name
        httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1})
        out: dict[str, tuple[int, float] | list] = {}
        measured = {
            f"burst {k}": v for k, v in asyncio.run(burst(http_port, model, args.burst)).items()
        }
        sustained = asyncio.run(saturated(http_port, model, args.rate, args.seconds))
        measured |= {f"saturated {k}": v for k, v in sustained.items()}
        report(measured)
        out |= measured
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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--refuse-all", type=int, help=argparse.SUPPRESS)  # the floor's server
    args = parser.parse_args()
    if args.refuse_all:
        refuse_all(args.refuse_all)
        return
    runs: dict[str, list[dict]] = {label: [] for label in VARIANTS}
    floors: list[dict[str, list[float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            floors.append(measure_floor(args))
            labels = list(VARIANTS)
            for label in labels[round_ % 3 :] + labels[: round_ % 3]:  # rotated each round
                runs[label].append(measure(label, args, Path(tmp)))

    names = list(VARIANTS)
    lines = [
        f"Burst of {args.burst} concurrent 16-token completions, then 64-token completions "
        f"arriving at {args.rate:g}/s for {args.seconds:g} s (saturated), against the default "
        f"LM (one replica, CLIP off), {args.rounds} rounds, the servers in rotated order; "
        "seconds; in brackets, requests per server.",
        "",
        "| what | " + " | ".join(names) + " | " + " | ".join(f"{n} / on" for n in names[1:]) + " |",
        "|---|" + "---:|" * (2 * len(names) - 1),
    ]

    def pooled(label: str, key: str) -> list[float]:
        return [s for run in runs[label] for s in run.get(key, [])]

    timed = {k for rs in runs.values() for r in rs for k in r if k.startswith(("burst", "satur"))}
    for key in sorted(timed):
        counts = " / ".join(str(len(pooled(n, key))) for n in names)
        for q in (0.5, 0.99):
            values = [pct(pooled(n, key), q) for n in names]
            cells = [f"{v:.3f}" for v in values] + [f"{v / values[0]:.1f}x" for v in values[1:]]
            lines.append(f"| {key} ({counts}) p{int(q * 100)} | " + " | ".join(cells) + " |")
    floor = [s for run in floors for s in run.get("burst 503 overloaded", [])]
    for q in (0.5, 0.99):
        lines.append(
            f"| floor: the same burst against a bare ASGI app refusing all ({len(floor)}) "
            f"p{int(q * 100)} | {pct(floor, q):.3f} |" + " |" * (2 * len(names) - 2)
        )
    for key in ("20 MB body", "4 MB prompt"):
        statuses = " / ".join(str(runs[n][0][key][0]) for n in names)
        values = [statistics.median(r[key][1] for r in runs[n]) for n in names]
        cells = [f"{v:.3f}" for v in values] + [f"{v / values[0]:.1f}x" for v in values[1:]]
        lines.append(f"| {key} ({statuses}) median | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    write_report(args.out, "Overload and oversized requests", text + "\n")


if __name__ == "__main__":
    main()
