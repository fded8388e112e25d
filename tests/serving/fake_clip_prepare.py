"""A stand-in for `mora models prepare --only clip`, run as a script by
tests/serving/test_cli_serve.py: `fake_clip_prepare.py MODE PIDFILE`.

Every mode prints a line (it must reach the log file) and writes its pids to PIDFILE:
"train" sleeps until stopped; "stubborn" ignores SIGTERM and first starts a child of its
own (same process group) that sleeps too, writing "PID CHILD_PID"; "done" exits 0 at once;
"fail" exits 3.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def main(mode: str, pidfile: Path) -> int:
    print(f"fake CLIP preparation: {mode}", flush=True)
    pids = [os.getpid()]
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        pids.append(child.pid)
    pidfile.write_text(" ".join(map(str, pids)))
    if mode == "done":
        return 0
    if mode == "fail":
        return 3
    time.sleep(600)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2])))
