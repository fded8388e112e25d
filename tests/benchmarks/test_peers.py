"""benchmarks/peers.py and its helpers without building or starting llama-server: arguments,
the run schedule, the medians and ratios of the report, and the cached-build decision."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from loadtest.server_process import MoraCommandError
from mora_runtime.models.materialize import materialize

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SERVERS = ("llama", "mora")


def _load(name: str) -> ModuleType:
    """A benchmark script as a module: they import their siblings by name, as when run."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


peers = _load("peers")
report = _load("peers_report")
llama_server = _load("llama_server")


# --- arguments and schedule -------------------------------------------------------------------


def test_defaults_are_the_issue_s_benchmark() -> None:
    args = peers.parse_args([])
    assert (args.rounds, args.concurrency, args.sets) == (3, (1, 4, 16, 32), 10)
    assert args.requests_per_client == 4 and args.tokens == 64
    assert args.out == peers.RESULTS and args.threads >= 1


def test_quick_is_small_writes_elsewhere_and_explicit_flags_win() -> None:
    args = peers.parse_args(["--quick", "--concurrency", "8,2,2", "--threads", "3"])
    assert (args.rounds, args.sets, args.requests_per_client) == (1, 2, 1)
    assert args.concurrency == (2, 8)  # sorted, duplicates dropped
    assert args.threads == 3
    assert args.out != peers.RESULTS and args.out.name == "peers.md"


@pytest.mark.parametrize(
    "argv",
    [["--concurrency", "1,x"], ["--concurrency", "0,4"], ["--rounds", "0"], ["--sets", "0"]],
)
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        peers.parse_args(argv)


def test_schedule_alternates_pool_phases_and_server_order() -> None:
    plan = peers.schedule(2, (1, 4, 16))
    assert len(plan) == 2 * 2 * 3
    phases = [[pool for r, pool, _, _ in plan if r == round_] for round_ in (0, 1)]
    assert phases[0] == ["empty"] * 3 + ["loaded"] * 3
    assert phases[1] == ["loaded"] * 3 + ["empty"] * 3
    for pool in ("empty", "loaded"):
        for c in (1, 4, 16):
            orders = [order for _, p, cc, order in plan if (p, cc) == (pool, c)]
            assert sorted(orders) == [("llama", "mora"), ("mora", "llama")]


# --- report ------------------------------------------------------------------------------------


def _m(round_: int, pool: str, c: int, server: str, tps: float, prompt: float = 30.0):
    return report.Measurement(round_, pool, c, server, tps, 64.0, prompt)


def test_ratios_are_medians_of_paired_runs() -> None:
    llama = {0: 100.0, 1: 50.0, 2: 200.0}
    mora = {0: 120.0, 1: 100.0, 2: 300.0}  # pair ratios 1.2, 2.0, 1.5
    runs = [_m(r, "empty", 4, "llama", llama[r]) for r in llama]
    runs += [_m(r, "empty", 4, "mora", mora[r]) for r in mora]
    runs.append(_m(3, "empty", 4, "mora", 999.0))  # no llama run in round 3: no pair
    (row,) = report.summarise(runs)
    assert row.ratios == pytest.approx((1.2, 2.0, 1.5))
    assert row.ratio == pytest.approx(1.5)  # not the ratio of the medians, 120 / 100
    assert row.llama_tps == pytest.approx(100.0) and row.mora_tps == pytest.approx(120.0)


def test_rows_come_in_pool_then_concurrency_order_and_render() -> None:
    runs = []
    for pool in ("loaded", "empty"):
        for c in (16, 1):
            runs += [_m(0, pool, c, "llama", 100.0), _m(0, pool, c, "mora", 50.0 * c)]
    rows = report.summarise(runs)
    assert [(r.pool, r.concurrency) for r in rows] == [
        ("empty", 1),
        ("empty", 16),
        ("loaded", 1),
        ("loaded", 16),
    ]
    table = report.markdown_table(rows, {"loaded": "10 sets x 16 ranks"})
    assert "| 10 sets x 16 ranks | 16 | 100.0 | 800.0 | 8.00x |" in table
    assert "| empty | 1 | 100.0 | 50.0 | 0.50x |" in table


def test_prompt_length_mismatches_are_flagged() -> None:
    runs = [_m(0, "empty", 1, "llama", 1.0, 30.0), _m(0, "empty", 1, "mora", 1.0, 31.0)]
    runs += [_m(0, "empty", 4, "llama", 1.0, 30.0), _m(0, "empty", 4, "mora", 1.0, 30.0)]
    flagged = report.prompt_mismatches(report.summarise(runs))
    assert [r.concurrency for r in flagged] == [1]


def test_unknown_servers_are_refused() -> None:
    with pytest.raises(ValueError, match="vllm"):
        report.summarise([_m(0, "empty", 1, "vllm", 1.0)])


def test_plot_writes_a_png(tmp_path: Path) -> None:
    runs = [_m(0, p, c, s, 10.0 * c) for p in ("empty", "loaded") for c in (1, 4) for s in SERVERS]
    path = report.plot(report.summarise(runs), {}, tmp_path / "peers.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_are_written_as_markdown_with_the_plot_beside(tmp_path: Path) -> None:
    argv = ["--rounds", "1", "--concurrency", "2", "--sets", "3", "--out", str(tmp_path / "p.md")]
    args = peers.parse_args(argv)
    runs = [_m(0, pool, 2, server, 10.0) for pool in ("empty", "loaded") for server in SERVERS]
    peers.write_results(args, runs, peers.method_text(args, 2, "version: 1"), argv)
    text = (tmp_path / "p.md").read_text()
    assert text.startswith("# llama-server against mora serve")
    assert "| 3 sets x 16 ranks | 2 | 10.0 | 10.0 | 1.00x |" in text
    assert "`benchmarks/peers.py --rounds 1" in text and "![plot](p.png)" in text
    assert (tmp_path / "p.png").stat().st_size > 0


# --- the cached build -------------------------------------------------------------------------


def _fake_build(version: str):
    def build(staging: Path) -> dict:
        binary = staging / llama_server.BINARY
        binary.parent.mkdir(parents=True)
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
        return llama_server.expected_marker(version)

    return build


def test_a_build_is_reused_only_with_the_same_version_and_options(tmp_path: Path) -> None:
    target = tmp_path / "llama.cpp"
    expected = llama_server.expected_marker()
    assert not llama_server.is_built(target, expected)
    materialize(target, lambda t: False, _fake_build(llama_server.VERSION))
    assert llama_server.is_built(target, expected)
    assert not llama_server.is_built(target, llama_server.expected_marker("0.0.1"))
    other = llama_server.expected_marker(options=("-DGGML_NATIVE=OFF",))
    assert not llama_server.is_built(target, other)
    (target / llama_server.BINARY).unlink()
    assert not llama_server.is_built(target, expected)


def test_ensure_built_builds_once_into_the_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MORA_CACHE", str(tmp_path))
    builds = []

    def build(staging: Path, jobs: int) -> dict:
        builds.append(jobs)
        _fake_build(llama_server.VERSION)(staging)
        return {"server_version": "version: 1 (fake)"}

    monkeypatch.setattr(llama_server, "_build", build)
    first = llama_server.ensure_built(jobs=2)
    assert first == tmp_path / "llama.cpp" / "bin" / "llama-server"
    assert llama_server.ensure_built() == first
    assert builds == [2]  # the second call found the marker
    llama_server.ensure_built(force=True, jobs=1)
    assert builds == [2, 1]


def test_build_steps_log_everything_and_echo_progress(tmp_path: Path, capsys) -> None:
    script = "print('[1/206] Building ggml.c'); print('warning: noise')"
    with open(tmp_path / "build.log", "w") as log:
        llama_server._run([sys.executable, "-c", script], log, {}, progress=True)
    assert "warning: noise" in (tmp_path / "build.log").read_text()
    shown = capsys.readouterr().out
    assert "[1/206] Building ggml.c" in shown and "noise" not in shown
    assert llama_server.PROGRESS.match("[ 12%] Building CXX object")


def test_a_failed_build_step_shows_its_output_and_raises(tmp_path: Path, capsys) -> None:
    script = "print('error: no compiler'); raise SystemExit(2)"
    with (
        open(tmp_path / "build.log", "w") as log,
        pytest.raises(subprocess.CalledProcessError),
    ):
        llama_server._run([sys.executable, "-c", script], log, {})
    assert "error: no compiler" in capsys.readouterr().out


def test_server_command_keeps_a_context_per_slot_on_loopback() -> None:
    command = llama_server.server_command(
        Path("llama-server"), Path("m.gguf"), port=9, threads=2, slots=32, ctx_per_slot=1024
    )
    pairs = dict(zip(command[1::2], command[2::2], strict=True))
    assert pairs["--host"] == "127.0.0.1" and pairs["--port"] == "9"
    assert pairs["--parallel"] == "32" and pairs["--ctx-size"] == str(32 * 1024)
    assert pairs["--threads"] == pairs["--threads-batch"] == "2"


# --- the process: a stand-in answering /health -------------------------------------------------

HEALTH_SERVER = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
print("listening", flush=True)
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_running_waits_for_health_and_stops_the_server(tmp_path: Path) -> None:
    from serving.cluster.launcher import free_ports

    (port,) = free_ports(1)
    log = tmp_path / "server.log"
    command = [sys.executable, "-c", HEALTH_SERVER, str(port)]
    with llama_server.running(command, port, log, timeout_s=60) as server:
        assert server.process.poll() is None
    assert server.process.poll() is not None
    assert "listening" in log.read_text()


def test_ctrl_c_inside_the_block_still_stops_the_server(tmp_path: Path) -> None:
    from serving.cluster.launcher import free_ports

    (port,) = free_ports(1)
    command = [sys.executable, "-c", HEALTH_SERVER, str(port)]
    with (
        pytest.raises(KeyboardInterrupt),
        llama_server.running(command, port, tmp_path / "server.log", timeout_s=60) as server,
    ):
        raise KeyboardInterrupt
    assert server.process.poll() is not None


def test_a_server_that_exits_is_an_error_with_its_log(tmp_path: Path, capsys) -> None:
    command = [sys.executable, "-c", "print('bad model file'); raise SystemExit(1)"]
    with pytest.raises(MoraCommandError), llama_server.running(command, 9, tmp_path / "l.log"):
        pass
    assert "bad model file" in capsys.readouterr().out
