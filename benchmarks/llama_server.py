"""llama.cpp's `llama-server` as a benchmark peer: built once into the cache, run on loopback.

The source is the llama.cpp that the `llama-cpp-python` sdist vendors (pinned below), fetched
with `pip download` (the package registry is the only network this needs) and built with
cmake: the `llama-server` target only, Release, CPU only, llama.cpp's own libraries linked
statically so the binary survives being moved out of its build tree. The build goes through
`mora_runtime.models.materialize` like the default models: into a staging directory renamed
to `<cache>/llama.cpp` under a file lock, with a marker recording the version and options,
so a second run (or two runs at once) reuses it and a changed pin or option rebuilds it.

The server runs as a subprocess in its own process group (loadtest's `ServerProcess`: wait
for /health, SIGTERM, then SIGKILL to the group), its log in a file rather than the console.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from loadtest.server_process import DEFAULT_HOST, ServerAddresses, ServerProcess
from mora_runtime.models.materialize import materialize, read_marker
from mora_runtime.paths import cache_dir

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
MARKER_FORMAT = 1
BINARY = Path("bin") / "llama-server"
PROGRESS = re.compile(r"^\[\s*\d+(/\d+|%)\]")  # ninja's "[12/206]", make's "[ 12%]"
PROGRESS_EVERY_S = 20.0
# Path-free configure options (they go into the marker: changing one rebuilds). No GPU
# backends, no network at build time (no curl/openssl, no prebuilt web UI download), static.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DGGML_CCACHE=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_VULKAN=OFF",
    "-DGGML_METAL=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)


def install_dir() -> Path:
    """Where the built server lives: `<cache>/llama.cpp` (read from the environment per call)."""
    return cache_dir() / "llama.cpp"


def expected_marker(version: str = VERSION, options: Sequence[str] = CMAKE_OPTIONS) -> dict:
    """What a finished build's marker must say for this run to reuse it."""
    return {
        "format": MARKER_FORMAT,
        "package": PACKAGE,
        "version": version,
        "cmake_options": list(options),
        "machine": platform.machine(),  # GGML_NATIVE: tuned for this kind of CPU
    }


def is_built(target: Path, expected: dict[str, Any]) -> bool:
    """A finished build of the expected version and options, its binary executable."""
    marker = read_marker(target)
    if marker is None or any(marker.get(key) != value for key, value in expected.items()):
        return False
    binary = target / BINARY
    return binary.is_file() and os.access(binary, os.X_OK)


def cmake_configure_command(source: Path, build: Path) -> list[str]:
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    return ["cmake", "-S", str(source), "-B", str(build), *generator, *CMAKE_OPTIONS]


def cmake_build_command(build: Path, jobs: int) -> list[str]:
    return ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)]


def ensure_built(*, force: bool = False, jobs: int | None = None) -> Path:
    """The `llama-server` binary, built first if the cache has no matching build."""
    target, expected = install_dir(), expected_marker()

    def build(staging: Path) -> dict[str, Any]:
        return {**expected, **_build(staging, jobs or os.cpu_count() or 1)}

    if materialize(target, lambda t: is_built(t, expected), build, force=force):
        print(f"llama-server built into {target}", flush=True)
    return target / BINARY


def _build(staging: Path, jobs: int) -> dict[str, Any]:
    """Download, unpack, configure and build in `staging`; keep the binary, licence and log."""
    work = staging / "work"
    work.mkdir()
    started = time.monotonic()
    # The sources sit inside whatever repository holds the cache (this checkout, usually):
    # git must stop at `work`, or llama.cpp would stamp that repository's commit on its build.
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(work)}
    with open(staging / "build.log", "w") as log:
        _step(f"downloading the {PACKAGE}=={VERSION} sdist with pip")
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        _run([*pip, f"{PACKAGE}=={VERSION}", "-d", str(work)], log, env)
        (sdist,) = work.glob("*.tar.gz")
        _step(f"unpacking {sdist.name}")
        with tarfile.open(sdist) as archive:
            archive.extractall(work / "src", filter="data")
        (source,) = (work / "src").glob("*/vendor/llama.cpp")
        build_tree = work / "build"
        _step("configuring llama.cpp with cmake")
        _run(cmake_configure_command(source, build_tree), log, env)
        _step(f"building llama-server with {jobs} jobs (many minutes on few cores)")
        _run(cmake_build_command(build_tree, jobs), log, env, progress=True)
    (staging / BINARY.parent).mkdir()
    shutil.copy2(build_tree / BINARY, staging / BINARY)
    shutil.copy2(source / "LICENSE", staging / "LICENSE")
    shutil.rmtree(work)
    seconds = time.monotonic() - started
    _step(f"done in {seconds / 60:.1f} min")
    return {"build_seconds": round(seconds, 1), "server_version": binary_version(staging)}


def _run(command: list[str], log: IO[str], env: dict[str, str], *, progress: bool = False) -> None:
    """Run `command` with its output in `log`; with `progress`, echo the build tool's
    "[n/total]" line every few seconds. On failure, show the log's last lines and raise."""
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    tail: list[str] = []
    shown = 0.0
    assert process.stdout is not None
    for line in process.stdout:
        log.write(line)
        tail = [*tail[-39:], line.rstrip()]
        if progress and PROGRESS.match(line) and time.monotonic() - shown > PROGRESS_EVERY_S:
            shown = time.monotonic()
            print(f"  {line.strip()[:100]}", flush=True)
    if process.wait() != 0:
        print("\n".join(tail), flush=True)
        raise subprocess.CalledProcessError(process.returncode, command)


def binary_version(root: Path) -> str:
    """`llama-server --version` (build number and commit), or "unknown"."""
    try:
        done = subprocess.run(
            [str(root / BINARY), "--version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "version" in line]
    return lines[0].strip() if lines else "unknown"


def _step(message: str) -> None:
    print(f"[llama.cpp build] {message}", flush=True)


def server_command(
    binary: Path, gguf: Path, *, port: int, threads: int, slots: int, ctx_per_slot: int
) -> list[str]:
    """llama-server on loopback: `slots` parallel sequences (continuous batching), each with
    `ctx_per_slot` tokens of context (-c is the total, split among the slots)."""
    return [
        str(binary),
        "--model",
        str(gguf),
        "--host",
        DEFAULT_HOST,
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--threads-batch",
        str(threads),
        "--parallel",
        str(slots),
        "--ctx-size",
        str(slots * ctx_per_slot),
    ]


class LlamaServerProcess(ServerProcess):
    """`llama-server` with loadtest's process handling; its output goes to `log_path`."""

    def __init__(self, command: list[str], port: int, log_path: Path) -> None:
        super().__init__(command[0], None, ServerAddresses(DEFAULT_HOST, port, metrics_port=0))
        self.command = command  # the base class would have built a `mora serve` command
        self.log_path = log_path
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        # Its own session: a Ctrl-C reaches this process, which then stops the server.
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def stop(self, grace_s: float = 30.0) -> int | None:
        try:
            return super().stop(grace_s)
        finally:
            if self._log is not None:
                self._log.close()

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


@contextlib.contextmanager
def running(
    command: list[str], port: int, log_path: Path, timeout_s: float = 300.0
) -> Iterator[LlamaServerProcess]:
    """A healthy llama-server for the `with` block, stopped afterwards whatever happens."""
    server = LlamaServerProcess(command, port, log_path)
    server.start()
    try:
        try:
            server.wait_healthy(timeout_s)
        except Exception:
            print(f"llama-server did not start; its log ends:\n{server.log_tail()}", flush=True)
            raise
        yield server
    finally:
        server.stop()


if __name__ == "__main__":  # build (or find) it alone: `python benchmarks/llama_server.py`
    print(ensure_built(force="--rebuild" in sys.argv[1:]))
