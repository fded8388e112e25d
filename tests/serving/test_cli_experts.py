"""`mora experts list|load|retire` against the real HTTP app over a fake admin, on loopback."""

from __future__ import annotations

import socket
import zipfile
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest

from serving.cli import main
from tests.serving import fakes
from tests.serving.conftest import ADMIN_TOKEN, make_app


@pytest.fixture
def admin() -> fakes.FakeAdmin:
    return fakes.FakeAdmin()


@pytest.fixture
def url(admin: fakes.FakeAdmin) -> Iterator[str]:
    app = make_app(fakes.FakeLM(), None, admin, admin_token=ADMIN_TOKEN)
    with fakes.running_server(app) as address:
        yield address


def experts(url: str, *argv: str, token: str = ADMIN_TOKEN) -> int:
    return main(["experts", *argv, "--url", url, "--token", token])


def test_load_list_retire(url: str, admin: fakes.FakeAdmin, tmp_path: Path, capsys) -> None:
    assert experts(url, "load", "dates") == 0  # not a local directory: a path in the store
    assert admin.loads[-1] == ("dates", None, None)
    local = tmp_path / "my-set"
    local.mkdir()
    (local / "expert_set.json").write_text("{}")
    (local / "expert_set.safetensors").write_bytes(b"tensors")
    assert experts(url, "load", str(local)) == 0  # a local directory: uploaded as a zip
    upload = admin.loads[-1][1]
    assert upload is not None
    names = sorted(zipfile.ZipFile(BytesIO(upload)).namelist())
    assert names == ["expert_set.json", "expert_set.safetensors"]
    assert experts(url, "list", "--json") == 0
    assert '"dates"' in capsys.readouterr().out
    assert experts(url, "retire", "dates") == 0
    assert "dates" not in admin.sets


def test_wrong_token_is_one_line_and_exit_1(url: str, admin, capsys) -> None:
    assert experts(url, "list", token="wrong") == 1
    err = capsys.readouterr().err
    assert "401" in err and "MORA_ADMIN_TOKEN" in err and "Traceback" not in err


def test_unknown_set_is_404(url: str, capsys) -> None:
    assert experts(url, "retire", "nothing-here") == 1
    err = capsys.readouterr().err
    assert "404" in err and "nothing-here" in err and "Traceback" not in err


def test_invalid_set_is_422_and_changes_nothing(url: str, admin, capsys) -> None:
    assert experts(url, "load", "broken", "--in-store") == 1
    err = capsys.readouterr().err
    assert "422" in err and "expert_set.json is missing" in err
    assert admin.sets == {}


def test_connection_refused(capsys) -> None:
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert experts(f"http://127.0.0.1:{port}", "list") == 1
    err = capsys.readouterr().err
    assert "cannot reach a server" in err and "Traceback" not in err


# --- mora experts random (local) -------------------------------------------------------------


def random_sets(store: Path, model_dir: Path, *argv: str) -> int:
    return main(["experts", "random", str(store), "--model", str(model_dir), *argv])


def test_random_writes_sets_the_model_accepts(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    import torch

    from mora_runtime.expert_sets.fingerprint import base_fingerprint
    from mora_runtime.expert_sets.store import load_expert_set
    from mora_runtime.experts.patching import find_target_modules
    from mora_runtime.models.lm import load_causal_lm

    store = tmp_path / "store"
    argv = ("--count", "2", "--rank", "3", "--seed", "5", "--prefix", "rnd")
    assert random_sets(store, tiny_llama_dir, *argv) == 0
    assert capsys.readouterr().out.splitlines() == ["rnd-0", "rnd-1"]
    model = load_causal_lm(tiny_llama_dir).model
    modules = find_target_modules(model)
    fingerprint = base_fingerprint(model, modules)
    sets = [
        load_expert_set(store / name, expected_fingerprint=fingerprint)
        for name in ("rnd-0", "rnd-1")
    ]
    for name, expert_set in zip(("rnd-0", "rnd-1"), sets, strict=True):
        assert expert_set.meta.name == name and expert_set.meta.rank == 3
        assert expert_set.meta.model_kind == "causal_lm"
        assert sorted(expert_set.tensors) == sorted(modules)
        assert all(A.shape[0] == B.shape[0] == 3 for A, B in expert_set.tensors.values())
    path = sorted(modules)[0]
    assert not torch.equal(sets[0].tensors[path][0], sets[1].tensors[path][0])

    # The same seed gives the same sets; another seed, other ones.
    assert random_sets(tmp_path / "again", tiny_llama_dir, *argv) == 0
    assert random_sets(tmp_path / "other", tiny_llama_dir, *argv[:5], "6", *argv[6:]) == 0
    again = load_expert_set(tmp_path / "again" / "rnd-0").tensors[path][0]
    other = load_expert_set(tmp_path / "other" / "rnd-0").tensors[path][0]
    assert torch.equal(again, sets[0].tensors[path][0])
    assert not torch.equal(other, again)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--count", "1", "--prefix", "bad name"), "--prefix"),
        (("--count", "1", "--model", "/nonexistent/model"), "does not exist"),
    ],
)
def test_random_refuses_bad_arguments_in_one_line(
    argv: tuple[str, ...], message: str, tmp_path: Path, capsys
) -> None:
    assert main(["experts", "random", str(tmp_path / "store"), *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "store").exists()
