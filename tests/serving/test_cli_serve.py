"""`mora serve`: what it prepares before serving, and the default CLIP prepared by a child
process in the background (its own process group, output in a log under the cache) that the
command ends, group and all, when the server stops or the start fails. The server and the
LM preparation are stubbed; the child is tests/serving/fake_clip_prepare.py."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from mora_runtime import paths
from mora_runtime.cli import build_parser
from serving import background_prepare
from serving import cli as serving_cli
from serving.cluster import launcher

FAKE = Path(__file__).with_name("fake_clip_prepare.py")
REPO = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def wait_for(condition: Any, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Serve:
    """`mora serve` with the server and the preparation stubbed; records what they saw."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: str) -> None:
        self.pidfile = tmp_path / "pids"
        self.cache = tmp_path / "cache"
        self.prepared: list[dict[str, Any]] = []
        self.seen_at_serve: dict[str, Any] = {}
        self.serve_error: BaseException | None = None
        self.clip_prepared = False
        self.expect_child = True
        monkeypatch.setenv(paths.CACHE_ENV, str(self.cache))
        monkeypatch.setattr(
            serving_cli,
            "clip_prepare_command",
            lambda: [sys.executable, str(FAKE), mode, str(self.pidfile)],
        )
        self.events: list[str] = []
        started = serving_cli.BackgroundPrepare

        def start_child(*args: Any, **kwargs: Any) -> Any:
            self.events.append("child")
            return started(*args, **kwargs)

        monkeypatch.setattr(serving_cli, "BackgroundPrepare", start_child)
        monkeypatch.setattr(serving_cli, "prepare_models", self._prepare)
        monkeypatch.setattr(launcher, "run", self._serve)
        import mora_runtime.learn.pretrain_clip as pretrain_clip

        monkeypatch.setattr(pretrain_clip, "default_clip_is_prepared", lambda: self.clip_prepared)

    def _prepare(self, **kwargs: Any) -> dict:
        self.events.append("prepare")
        self.prepared.append(kwargs)
        return {}

    def _serve(self, config: Path | None) -> int:
        if self.expect_child:
            wait_for(self.pidfile.exists, "the child to start")
            pids = [int(p) for p in self.pidfile.read_text().split()]
            self.seen_at_serve = {
                "pids": pids,
                "alive": all(alive(pid) for pid in pids),
                "own_group": os.getpgid(pids[0]) == pids[0] != os.getpgid(0),
            }
        if self.serve_error is not None:
            raise self.serve_error
        return 0

    def __call__(self, *argv: str) -> int:
        return serving_cli.main(["serve", *argv])

    @property
    def log(self) -> Path:
        return self.cache / "logs" / "clip-prepare.log"


@pytest.fixture
def no_child(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("no background preparation was expected")

    monkeypatch.setattr(serving_cli, "BackgroundPrepare", refuse)


def test_serve_prepares_the_lm_and_trains_the_clip_in_a_child_it_stops(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    serve = Serve(monkeypatch, tmp_path, "train")
    handler = signal.getsignal(signal.SIGTERM)  # another test's ray.init may have set one
    assert serve() == 0
    assert serve.prepared == [{"lm": True, "clip": False}]  # the CLIP is not waited for
    # ... and trains only once the LM is ready, which then has the whole machine
    assert serve.events == ["prepare", "child"]
    assert serve.seen_at_serve["alive"] and serve.seen_at_serve["own_group"]
    [pid] = serve.seen_at_serve["pids"]
    assert not alive(pid)  # stopped when the server ended
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # and its whole group
    assert "fake CLIP preparation: train" in serve.log.read_text()
    out = capsys.readouterr().out
    assert str(serve.log) in out and f"pid {pid}" in out and "503" in out
    assert signal.getsignal(signal.SIGTERM) == handler  # the handler is given back


def test_a_child_ignoring_sigterm_is_killed_with_everything_it_started(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(background_prepare, "STOP_GRACE_S", 0.5)
    serve = Serve(monkeypatch, tmp_path, "stubborn")
    assert serve() == 0
    pids = serve.seen_at_serve["pids"]
    assert len(pids) == 2 and serve.seen_at_serve["alive"]
    wait_for(lambda: not any(alive(pid) for pid in pids), "the group to die", 10)


def test_a_failed_start_stops_the_child_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    serve = Serve(monkeypatch, tmp_path, "train")
    serve.serve_error = KeyboardInterrupt()  # Ctrl-C while Ray starts
    assert serve() == 130
    [pid] = serve.seen_at_serve["pids"]
    assert serve.seen_at_serve["alive"] and not alive(pid)


@pytest.mark.parametrize("mode, message", [("done", "prepared in the background"),
                                           ("fail", "failed (exit 3)")])  # fmt: skip
def test_a_child_that_ends_by_itself_says_so_and_is_left_alone(
    mode: str,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    serve = Serve(monkeypatch, tmp_path, mode)
    started = background_prepare.BackgroundPrepare(
        "CLIP", serving_cli.clip_prepare_command(), serve.log
    )
    wait_for(lambda: not started.running(), "the child to end")
    started._watcher.join(10)
    assert started.stop() == (0 if mode == "done" else 3)
    out, err = capfd.readouterr()
    assert message in out + err
    if mode == "fail":
        assert str(serve.log) in err


def test_a_second_start_with_everything_prepared_starts_no_child(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_child: None
) -> None:
    serve = Serve(monkeypatch, tmp_path, "train")
    serve.clip_prepared, serve.expect_child = True, False
    assert serve() == 0
    assert serve.prepared == [{"lm": True, "clip": False}]
    assert not serve.log.exists()


@pytest.mark.parametrize(
    "clip", [{"enabled": False}, {"model_dir": "/somewhere/else"}], ids=["off", "own"]
)
def test_no_child_when_the_config_serves_no_default_clip(
    clip: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_child: None
) -> None:
    serve = Serve(monkeypatch, tmp_path, "train")
    serve.expect_child = False
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"lm": {"model_dir": "/my/lm"}, "clip": clip}))
    assert serve("--config", str(config)) == 0
    assert serve.prepared == [{"lm": False, "clip": False}]


def test_make_run_leaves_preparing_to_serve() -> None:
    makefile = (REPO / "Makefile").read_text()
    run = makefile.split("\nrun:", 1)[1].split("\n", 1)[0].split()
    assert run == ["setup"], "make run must not wait for `make models` (the CLIP training)"


def test_the_background_child_trains_the_clip_on_every_core() -> None:
    # The load-based default would count the starting server and train on one thread.
    command = background_prepare.clip_prepare_command()
    assert command[:3] == [sys.executable, "-m", "mora_runtime.cli"]
    assert command[3:] == [
        "models", "prepare", "--only", "clip", "--threads", str(os.cpu_count() or 1)
    ]  # fmt: skip
    parsed = build_parser().parse_args(command[3:])
    assert (parsed.only, parsed.threads) == ("clip", os.cpu_count() or 1)
