"""The `mora` command as a subprocess: find it, start `mora serve`, wait for /health, stop it.

The load generator is a client of any OpenAI-compatible server and imports neither torch nor
the MoRA runtime; where it needs the server side (`observe` starts a server, the hot-load
scenario writes random expert sets) it runs the `mora` command instead. The addresses are
read from the server's config file itself, with the defaults that serving/config.py documents.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

logger = logging.getLogger(__name__)

APP_NAME = "mora"  # the Serve application serving/config.py reads its `args` from
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_METRICS_PORT = 8080
# A server bound to every interface is reached on loopback from this machine.
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


class MoraCommandError(RuntimeError):
    """No `mora` command, or it failed or exited before the server was healthy."""


def find_mora(explicit: str | os.PathLike[str] | None = None) -> str:
    """The `mora` executable: `explicit` if given, else the one installed beside this Python
    (the same environment), else the first on PATH."""
    if explicit is not None:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise MoraCommandError(f"{path} is not an executable `mora` command")
        return str(path)
    beside = Path(sys.executable).parent / "mora"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("mora")
    if found is None:
        raise MoraCommandError(
            "no `mora` command beside this Python or on PATH (install the project, e.g. "
            "`make setup`, or pass --mora)"
        )
    return found


@dataclass(frozen=True)
class ServerAddresses:
    host: str
    port: int
    metrics_port: int

    @property
    def base_url(self) -> str:
        host = DEFAULT_HOST if self.host in WILDCARD_HOSTS else self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


def read_addresses(config_path: Path | None) -> ServerAddresses:
    """Host, port and metrics port from a Serve-style config (`http_options` and the `mora`
    application's `args`) or a bare MoRA mapping; None: the defaults."""
    data: Any = {} if config_path is None else yaml.safe_load(Path(config_path).read_text())
    data = data or {}
    if not isinstance(data, dict):
        raise ValueError(f"{config_path} is not a YAML mapping")
    if "applications" in data:
        apps = [a for a in data["applications"] or [] if a.get("name", APP_NAME) == APP_NAME]
        if len(apps) != 1:
            raise ValueError(f"{config_path}: expected exactly one application named {APP_NAME!r}")
        args = apps[0].get("args") or {}
        http = data.get("http_options") or {}
    else:
        args, http = data, {}
    return ServerAddresses(
        host=str(args.get("host", http.get("host", DEFAULT_HOST))),
        port=int(args.get("port", http.get("port", DEFAULT_PORT))),
        metrics_port=int(args.get("metrics_port", DEFAULT_METRICS_PORT)),
    )


class ServerProcess:
    """`mora serve --config CONFIG` in its own process group, stopped as Ctrl-C would."""

    def __init__(self, mora: str, config_path: Path | None, addresses: ServerAddresses) -> None:
        self.command = [mora, "serve"] + (
            [] if config_path is None else ["--config", str(config_path)]
        )
        self.addresses = addresses
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # Its own session: a Ctrl-C meant for `observe` reaches us, and we stop the server
        # in order (SIGTERM: Serve and Ray shut down) rather than racing it.
        self.process = subprocess.Popen(self.command, start_new_session=True)
        logger.info("started %s (pid %d)", " ".join(self.command), self.process.pid)

    def wait_healthy(self, timeout_s: float, cancel: threading.Event | None = None) -> bool:
        """True once GET /health answers 200; False if `cancel` is set first. Raises
        `MoraCommandError` if the server exits or is not healthy within `timeout_s`."""
        if self.process is None:
            raise MoraCommandError("the server was not started")
        url = f"{self.addresses.base_url}/health"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise MoraCommandError(f"`{' '.join(self.command)}` exited with code {code}")
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            if cancel is not None and cancel.wait(0.5):
                return False
            if cancel is None:
                time.sleep(0.5)
        raise MoraCommandError(f"{url} did not answer 200 within {timeout_s:g} s")

    def stop(self, grace_s: float = 120.0) -> int | None:
        """SIGTERM to the server (a clean shutdown), then SIGKILL to its whole process group
        if it has not exited after `grace_s`; returns its exit code."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("the server did not stop in %g s: killing its group", grace_s)
        self._kill_group(process.pid)
        return process.wait(timeout=30)

    @staticmethod
    def _kill_group(pgid: int) -> None:
        # Whatever the server left in its group (it leads the group: start_new_session).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def run_mora(mora: str, *argv: str) -> list[str]:
    """Run `mora ARGV...`; its stdout's non-empty lines (stderr goes to the console)."""
    command = [mora, "--log-level", "WARNING", *argv]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise MoraCommandError(
            f"`{' '.join(command)}` failed with code {done.returncode} (its error is above)"
        )
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]
