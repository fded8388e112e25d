"""`mora experts list|load|retire` and `mora learn --load`: the admin routes from the shell;
`mora experts random`: random expert sets written locally (mora_runtime.expert_sets.synthetic).

A thin httpx client of `GET/POST/DELETE /v1/experts` (serving/http/routes_experts.py). The admin
token comes from `--token`, else `$MORA_ADMIN_TOKEN` (the variable the server reads too).
`load` uploads a local expert-set directory as a zip (it works whether or not the directory
is inside the server's expert store, and with a server on another machine); with
`--in-store`, or when no such local directory exists, the argument is sent as a path inside
the server's store instead, which the server reads in place. Every failure (no server,
refused token, unknown set, invalid set) is one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from mora_runtime.cli import CLIError

ADMIN_TOKEN_ENV = "MORA_ADMIN_TOKEN"  # the same variable as serving.config.ADMIN_TOKEN_ENV
DEFAULT_URL = "http://127.0.0.1:8000"
EXPERTS_ROUTE = "/v1/experts"
# The files of an expert set (mora_runtime/expert_sets/format.py); only these travel in an upload.
SET_FILES = ("expert_set.json", "expert_set.safetensors")
# Loading validates the set on every replica before committing it: allow for that.
DEFAULT_TIMEOUT_S = 300.0


def register(subparsers: Any) -> None:
    """Add `experts list|load|retire` and the `--load` option of `learn`."""
    experts = subparsers.add_parser(
        "experts",
        help="list, hot-load or retire the expert sets of a running server; write random ones",
        description="Talk to the admin routes (/v1/experts) of a running server. The admin "
        f"token is --token or ${ADMIN_TOKEN_ENV}. `random` works locally, without a server.",
    )
    actions = experts.add_subparsers(dest="experts_command", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="the loaded expert sets and the pool version")
    listing.add_argument("--json", action="store_true", help="print the server's JSON answer")
    _add_server_options(listing)
    listing.set_defaults(handler=_cmd_list)

    load = actions.add_parser(
        "load",
        help="hot-load an expert set into every replica",
        description="SET is a local expert-set directory (uploaded as a zip), or a path "
        "inside the server's expert store (read in place by the server).",
    )
    load.add_argument("set", metavar="SET", help="expert-set directory or path in the store")
    load.add_argument(
        "--in-store",
        action="store_true",
        help="send SET as a path inside the server's expert store even if it exists here",
    )
    load.add_argument("--model", help="served model to load into (default: by the set's kind)")
    _add_server_options(load)
    load.set_defaults(handler=_cmd_load)

    retire = actions.add_parser("retire", help="remove a loaded expert set from every replica")
    retire.add_argument("name", metavar="NAME", help="name of the loaded expert set")
    _add_server_options(retire)
    retire.set_defaults(handler=_cmd_retire)

    _register_random(actions)

    learn = subparsers.choices.get("learn")
    if learn is not None:
        _extend_learn(learn)


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default: {DEFAULT_URL})")
    parser.add_argument("--token", help=f"admin token (default: ${ADMIN_TOKEN_ENV})")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"seconds to wait for the server (default: {DEFAULT_TIMEOUT_S:g})",
    )


class ExpertsClient:
    """The admin routes of one server; every failure is raised as a one-line `CLIError`."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> ExpertsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def list_sets(self) -> dict[str, Any]:
        return self._request("GET", EXPERTS_ROUTE)

    def load_path(self, path: str, model: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"path": path}
        if model is not None:
            body["model"] = model
        return self._request("POST", EXPERTS_ROUTE, json=body)

    def upload(self, directory: Path, model: str | None = None) -> dict[str, Any]:
        files = {"file": (f"{directory.name}.zip", zip_expert_set(directory), "application/zip")}
        data = {"model": model} if model is not None else None
        return self._request("POST", EXPERTS_ROUTE, files=files, data=data)

    def retire(self, name: str) -> dict[str, Any]:
        return self._request("DELETE", f"{EXPERTS_ROUTE}/{quote(name, safe='')}")

    def _request(self, method: str, route: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, route, **kwargs)
        except httpx.ConnectError:
            raise CLIError(
                f"cannot reach a server at {self.url} (start one with `make run` or "
                "`mora serve`, or pass --url)"
            ) from None
        except httpx.TimeoutException:
            raise CLIError(f"{self.url} did not answer in time (raise --timeout)") from None
        except httpx.HTTPError as error:
            raise CLIError(f"request to {self.url} failed: {error}") from None
        if response.is_success:
            try:
                return response.json()
            except ValueError:
                raise CLIError(f"{self.url} answered {response.status_code} without JSON") from None
        raise CLIError(self._describe(response))

    def _describe(self, response: httpx.Response) -> str:
        message, param = _error_fields(response)
        status = response.status_code
        if status == 401:
            hint = (
                f"pass --token or set {ADMIN_TOKEN_ENV} to the server's admin token"
                if self.token
                else f"no admin token given: pass --token or set {ADMIN_TOKEN_ENV}"
            )
            return f"the server refused the request (401): {message}; {hint}"
        where = f" [{param}]" if param else ""
        if status >= 500:
            return f"the server failed ({status}): {message}"
        return f"the server refused the request ({status}){where}: {message}"


def _error_fields(response: httpx.Response) -> tuple[str, str | None]:
    """(message, param) of an OpenAI-shaped error body, or the start of any other body."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"]), error.get("param")
    text = response.text.strip().splitlines()[0][:300] if response.text.strip() else ""
    return text or response.reason_phrase, None


def zip_expert_set(directory: Path) -> bytes:
    """The files of an expert-set directory as an in-memory zip (the upload format)."""
    missing = [name for name in SET_FILES if not (directory / name).is_file()]
    if missing:
        raise CLIError(f"{directory} is not an expert-set directory (missing {missing[0]})")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in SET_FILES:
            archive.write(directory / name, arcname=name)
    return buffer.getvalue()


def make_client(args: argparse.Namespace) -> ExpertsClient:
    token = args.token or os.environ.get(ADMIN_TOKEN_ENV) or None
    return ExpertsClient(args.url, token, timeout=args.timeout)


def load_set(client: ExpertsClient, target: str, *, in_store: bool, model: str | None) -> dict:
    """Upload `target` if it is a local directory (and not `in_store`), else send its path."""
    directory = Path(target).expanduser()
    if not in_store and directory.is_dir():
        return client.upload(directory, model)
    return client.load_path(target, model)


def _cmd_list(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        answer = client.list_sets()
    if args.json or not isinstance(answer.get("sets"), list):
        print(json.dumps(answer, indent=2))
        return 0
    sets = answer["sets"]
    print(f"pool version {answer.get('version')}: {len(sets)} expert set(s) loaded")
    if sets:
        columns = ("name", "model_kind", "rank", "version_added", "activations", "path")
        rows = [[str(entry.get(c, "")) for c in columns] for entry in sets]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        for row in [list(columns), *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _cmd_load(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        answer = load_set(client, args.set, in_store=args.in_store, model=args.model)
    print(_summary("loaded", answer))
    return 0


def _cmd_retire(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        answer = client.retire(args.name)
    print(_summary("retired", answer))
    return 0


def _summary(verb: str, answer: dict[str, Any]) -> str:
    """One line for a load or retire answer (the whole JSON if it is not the usual shape)."""
    if "name" not in answer or "version" not in answer:
        return json.dumps(answer)
    replicas = answer.get("replicas") or []
    done = sum(1 for r in replicas if isinstance(r, dict) and r.get("status") == "committed")
    return (
        f"{verb} '{answer['name']}': pool version {answer['version']}, "
        f"{done}/{len(replicas)} replica(s) committed (the rest reconcile on their own)"
    )


# --- mora experts random (local, no server) ----------------------------------------------------


def _register_random(actions: Any) -> None:
    random_sets = actions.add_parser(
        "random",
        help="write random expert sets for a causal LM into a directory (no server needed)",
        description="Write COUNT random expert sets for a causal LM into STORE (for load tests "
        "and benchmarks) and print their names, one per line: each name is also the set's "
        "path relative to STORE.",
    )
    random_sets.add_argument("store", type=Path, metavar="STORE", help="directory to write into")
    random_sets.add_argument("--count", type=_non_negative_int, required=True, help="how many")
    random_sets.add_argument("--rank", type=_positive_int, default=8, help="rank of each set")
    random_sets.add_argument("--seed", type=_non_negative_int, default=0, help="random seed")
    random_sets.add_argument("--prefix", help="names are PREFIX-0, PREFIX-1, ... (default: dated)")
    random_sets.add_argument(
        "--model", type=Path, metavar="DIR", help="local causal LM (default: the default model)"
    )
    random_sets.set_defaults(handler=_cmd_random)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _cmd_random(args: argparse.Namespace) -> int:
    from mora_runtime.expert_sets.format import NAME_PATTERN

    if args.prefix is not None and not NAME_PATTERN.fullmatch(f"{args.prefix}-0"):
        raise CLIError(f"--prefix {args.prefix!r}: names must match {NAME_PATTERN.pattern}")
    if args.model is not None and not args.model.is_dir():
        raise CLIError(f"model directory {args.model} does not exist")
    from mora_runtime.expert_sets.synthetic import write_random_sets

    names = write_random_sets(
        args.store,
        args.count,
        model_dir=args.model,
        rank=args.rank,
        seed=args.seed,
        prefix=args.prefix,
    )
    for name in names:
        print(name, flush=True)
    return 0


# --- mora learn --load -----------------------------------------------------------------------


def _extend_learn(learn: argparse.ArgumentParser) -> None:
    group = learn.add_argument_group("hot-loading the new set into a running server")
    group.add_argument(
        "--load", action="store_true", help="upload the new set to a running server and load it"
    )
    group.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default: {DEFAULT_URL})")
    group.add_argument("--token", help=f"admin token (default: ${ADMIN_TOKEN_ENV})")
    group.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"seconds to wait for the server (default: {DEFAULT_TIMEOUT_S:g})",
    )
    learn_handler = learn.get_default("handler")

    def learn_then_load(args: argparse.Namespace) -> int:
        if not args.load:
            return int(learn_handler(args))
        with make_client(args) as client:
            client.list_sets()  # a missing server or a wrong token fails before learning
            code = int(learn_handler(args))
            if code != 0:
                return code
            answer = client.upload(args.written)
        print(_summary("loaded", answer))
        return 0

    learn.set_defaults(handler=learn_then_load)
