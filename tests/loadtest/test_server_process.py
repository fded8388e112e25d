"""The load generator's use of the `mora` command: addresses read from a config file, the set
generator and `observe`'s server as subprocesses, stopped by process group.

A fake `mora` (tests/loadtest/fake_mora.py) stands in for the server; one test runs the real
`mora experts random` on a tiny Llama.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from loadtest.hotload import generate_sets
from loadtest.server_process import (
    MoraCommandError,
    ServerAddresses,
    ServerProcess,
    find_mora,
    read_addresses,
)

REPO = Path(__file__).resolve().parents[2]
FAKE = Path(__file__).with_name("fake_mora.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_mora(tmp_path: Path) -> str:
    script = tmp_path / "bin" / "mora"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    script.chmod(0o755)
    return str(script)


def serve_config(path: Path, port: int, metrics_port: int) -> Path:
    config = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": "mora", "args": {"metrics_port": metrics_port}}],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def gone(pid: int, timeout_s: float = 10.0) -> bool:
    """The process has exited (a zombie no init reaps counts as exited)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


# --- addresses ---------------------------------------------------------------------------------


def test_addresses_of_the_deploy_config_and_the_defaults() -> None:
    expected = ServerAddresses("127.0.0.1", 8000, 8080)
    assert read_addresses(REPO / "deploy" / "serve.yaml") == expected
    assert read_addresses(None) == expected
    assert expected.base_url == "http://127.0.0.1:8000"
    assert expected.metrics_url == "http://127.0.0.1:8080/metrics"


def test_addresses_from_serve_style_and_bare_configs(tmp_path: Path) -> None:
    serve = serve_config(tmp_path / "serve.yaml", 9001, 9002)
    assert read_addresses(serve) == ServerAddresses("127.0.0.1", 9001, 9002)
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump({"host": "0.0.0.0", "port": 9100, "metrics_port": 9101}))
    addresses = read_addresses(bare)
    assert addresses == ServerAddresses("0.0.0.0", 9100, 9101)
    assert addresses.base_url == "http://127.0.0.1:9100"  # a wildcard bind is reached on loopback
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump({"applications": [{"name": "mora"}, {"name": "mora"}]}))
    with pytest.raises(ValueError, match="exactly one application"):
        read_addresses(two)


# --- finding mora ------------------------------------------------------------------------------


def test_find_mora_prefers_an_explicit_one_then_the_one_beside_python(
    fake_mora: str, tmp_path: Path
) -> None:
    assert find_mora(fake_mora) == fake_mora
    not_executable = tmp_path / "mora-text"
    not_executable.write_text("")
    with pytest.raises(MoraCommandError, match="not an executable"):
        find_mora(not_executable)
    beside = Path(sys.executable).parent / "mora"
    if beside.is_file():  # the project installed into this environment
        assert find_mora() == str(beside)


# --- generating sets ---------------------------------------------------------------------------


def test_generate_sets_runs_the_real_mora_command(tiny_llama_dir: Path, tmp_path: Path) -> None:
    if not (Path(sys.executable).parent / "mora").is_file():
        pytest.skip("the project's `mora` command is not installed beside this Python")
    store = tmp_path / "store"
    names = generate_sets(store, 2, model_dir=str(tiny_llama_dir), rank=2, seed=1, prefix="lt")
    assert names == ["lt-0", "lt-1"]
    for name in names:
        assert sorted(p.name for p in (store / name).iterdir()) == [
            "expert_set.json",
            "expert_set.safetensors",
        ]
        meta = yaml.safe_load((store / name / "expert_set.json").read_text())  # JSON is YAML
        assert meta["name"] == name and meta["rank"] == 2


def test_generate_sets_checks_what_mora_printed(
    fake_mora: str, tmp_path: Path, monkeypatch
) -> None:
    assert generate_sets(tmp_path, 3, prefix="p", mora=fake_mora) == ["p-0", "p-1", "p-2"]
    monkeypatch.setenv("FAKE_MORA_MODE", "wrong")
    with pytest.raises(MoraCommandError, match="expected"):
        generate_sets(tmp_path, 2, prefix="p", mora=fake_mora)
    monkeypatch.setenv("FAKE_MORA_MODE", "exit")
    with pytest.raises(MoraCommandError, match="code 2"):
        generate_sets(tmp_path, 2, prefix="p", mora=fake_mora)


def test_loadtest_cli_reports_a_failed_generation_in_one_line(
    fake_mora: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    from loadtest import cli

    monkeypatch.setenv("FAKE_MORA_MODE", "exit")
    argv = ["run", "--scenario", "hotload", "--admin-token", "x", "--metrics-url", "none"]
    argv += ["--hotload-store", str(tmp_path), "--mora", fake_mora, "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "failed with code 2" in capsys.readouterr().err


# --- the server process ------------------------------------------------------------------------


def test_server_starts_healthy_and_stops_cleanly(
    fake_mora: str, tmp_path: Path, monkeypatch
) -> None:
    marker = tmp_path / "marker"
    monkeypatch.setenv("FAKE_MORA_MARKER", str(marker))
    config = serve_config(tmp_path / "serve.yaml", free_port(), free_port())
    server = ServerProcess(fake_mora, config, read_addresses(config))
    server.start()
    try:
        assert server.wait_healthy(30)
    finally:
        code = server.stop(grace_s=20)
    assert code == 0
    assert marker.read_text() == "term"  # SIGTERM, the server's clean shutdown


def test_a_server_ignoring_sigterm_is_killed_with_its_group(
    fake_mora: str, tmp_path: Path, monkeypatch
) -> None:
    marker = tmp_path / "marker"
    monkeypatch.setenv("FAKE_MORA_MARKER", str(marker))
    monkeypatch.setenv("FAKE_MORA_MODE", "stubborn")
    config = serve_config(tmp_path / "serve.yaml", free_port(), free_port())
    server = ServerProcess(fake_mora, config, read_addresses(config))
    server.start()
    try:
        assert server.wait_healthy(30)
        child = int(marker.read_text())
        assert not gone(child, timeout_s=0.2)
    finally:
        code = server.stop(grace_s=1)
    assert code == -signal.SIGKILL
    assert gone(child)


def test_a_server_that_exits_early_is_an_error(fake_mora: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_MORA_MODE", "exit")
    config = serve_config(tmp_path / "serve.yaml", free_port(), free_port())
    server = ServerProcess(fake_mora, config, read_addresses(config))
    server.start()
    with pytest.raises(MoraCommandError, match="exited with code 3"):
        server.wait_healthy(30)
    assert server.stop() == 3


# --- observe -----------------------------------------------------------------------------------


def test_observe_runs_server_and_prometheus_until_ctrl_c(fake_mora: str, tmp_path: Path) -> None:
    import shutil

    import httpx

    if shutil.which("prometheus") is None:
        pytest.skip("Debian's prometheus package is not installed")
    marker = tmp_path / "marker"
    port, metrics_port, prometheus_port = free_port(), free_port(), free_port()
    config = serve_config(tmp_path / "serve.yaml", port, metrics_port)
    env = {**os.environ, "FAKE_MORA_MARKER": str(marker), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "loadtest", "observe", "--config", str(config)]
    argv += ["--prometheus-port", str(prometheus_port), "--no-install", "--mora", fake_mora]
    observe = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        assert observe.stdout is not None
        for line in observe.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C stops"):
                break
        printed = "".join(lines)
        assert f"http://127.0.0.1:{port}/v1/completions" in printed, printed
        assert f"http://127.0.0.1:{metrics_port}/metrics" in printed
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{prometheus_port}/-/ready").status_code == 200
        observe.send_signal(signal.SIGINT)
        assert observe.wait(timeout=60) == 0
    finally:
        if observe.poll() is None:
            observe.kill()
            observe.wait()
    assert marker.read_text() == "term"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{prometheus_port}/-/ready", timeout=2)
