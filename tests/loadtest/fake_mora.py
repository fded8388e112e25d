"""A stand-in for the `mora` command, run as a script by tests/loadtest/test_server_process.py.

`serve --config FILE`: answers GET /health with 200 on the config's http_options port, and
writes "term" to $FAKE_MORA_MARKER when SIGTERM stops it. $FAKE_MORA_MODE changes that:
"exit" exits at once with code 3; "stubborn" ignores SIGTERM and first starts a child in
its process group, whose pid it writes to the marker.

`experts random STORE ... --count N --prefix P`: prints P-0 ... P-(N-1) after a noise line;
mode "exit" fails with code 2, mode "wrong" prints other names.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

MODE = os.environ.get("FAKE_MORA_MODE", "")
MARKER = Path(os.environ.get("FAKE_MORA_MARKER", os.devnull))


class Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args: object) -> None:
        pass


def serve(argv: list[str]) -> int:
    if MODE == "exit":
        return 3
    config = yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text())
    server = ThreadingHTTPServer(("127.0.0.1", int(config["http_options"]["port"])), Health)
    if MODE == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        MARKER.write_text(str(child.pid))
    else:

        def on_term(*_: object) -> None:
            MARKER.write_text("term")
            threading.Thread(target=server.shutdown).start()

        signal.signal(signal.SIGTERM, on_term)
    server.serve_forever()
    return 0


def random_sets(argv: list[str]) -> int:
    if MODE == "exit":
        print("fake mora: no model", file=sys.stderr)
        return 2
    count = int(argv[argv.index("--count") + 1])
    prefix = argv[argv.index("--prefix") + 1]
    print("some library's progress line")
    for i in range(count):
        print(f"{'other' if MODE == 'wrong' else prefix}-{i}")
    return 0


def main(argv: list[str]) -> int:
    if "--log-level" in argv:
        at = argv.index("--log-level")
        del argv[at : at + 2]
    if argv[0] == "serve":
        return serve(argv[1:])
    if argv[:2] == ["experts", "random"]:
        return random_sets(argv[2:])
    print(f"fake mora: unexpected {argv}", file=sys.stderr)
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
