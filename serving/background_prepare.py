"""`mora serve`'s background preparation of the default CLIP.

Serving completions needs only the LM, so `mora serve` prepares that first and leaves the
default CLIP (trained once, which takes minutes on a CPU) to a child process,
`mora models prepare --only clip`, while the server starts; the CLIP replica warms up until
the model directory appears (serving/cluster/deployments.py, ClipServer).

The child runs in a process group of its own (a terminal's Ctrl-C reaches only the server,
which then ends the child: the whole group, so nothing it started outlives it), at a lower
CPU priority than serving, with its output in a log file. Killing it is safe: the model is
built in a temporary sibling directory under a file lock and renamed into place
(mora_runtime/models/materialize.py); the kernel drops the lock with the process, and the
next run removes the half-built directory before it starts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

# Below the server's priority: completions and classification stay responsive while the
# CLIP trains; an idle server still leaves it every core.
NICENESS = 10
STOP_GRACE_S = 10.0


def clip_prepare_command() -> list[str]:
    """`mora models prepare --only clip --threads <every core>`, with this Python (no PATH
    lookup). Every core: the child is niced, so the server's own work comes first, and the
    load-based default would count the starting server and train on one thread."""
    threads = str(os.cpu_count() or 1)
    return [
        sys.executable,
        "-m",
        "mora_runtime.cli",
        "models",
        "prepare",
        "--only",
        "clip",
        "--threads",
        threads,
    ]


class BackgroundPrepare:
    """One preparation child process: started in its own process group, stopped with it."""

    def __init__(self, what: str, command: Sequence[str], log_path: Path) -> None:
        self.what = what
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own session and process group
            )
        self._stopping = False
        with contextlib.suppress(OSError, AttributeError):  # not POSIX, or not allowed
            os.setpriority(os.PRIO_PROCESS, self.process.pid, NICENESS)
        self._watcher = threading.Thread(target=self._report_end, name=f"watch-{what}", daemon=True)
        self._watcher.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def _report_end(self) -> None:
        """Say when the child ends by itself: the user is waiting for /classify."""
        code = self.process.wait()
        if self._stopping:
            return
        if code == 0:
            print(f"{self.what}: prepared in the background; it serves once loaded", flush=True)
        else:
            print(
                f"{self.what}: background preparation failed (exit {code}), see "
                f"{self.log_path}; it stays unavailable until `mora models prepare --only "
                "clip` succeeds",
                file=sys.stderr,
                flush=True,
            )

    def stop(self, grace_s: float | None = None) -> int | None:
        """End the child's process group if it still runs: SIGTERM, then SIGKILL after
        `grace_s` (default STOP_GRACE_S). Returns the child's exit code (None if it could
        not be reaped)."""
        grace_s = STOP_GRACE_S if grace_s is None else grace_s
        self._stopping = True
        if not self.running():  # it finished by itself: its group id may be reused by now
            return self.process.returncode
        self._signal_group(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(grace_s)
        # Whatever is left of the group (the child if it ignored SIGTERM, anything it
        # started): while one member lives the group id cannot be reused, so this is safe.
        self._signal_group(signal.SIGKILL)
        try:
            return self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            return None

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)
