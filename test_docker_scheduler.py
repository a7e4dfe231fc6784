"""Tests for docker_scheduler, against a real Docker daemon.

Sections mirror the module: labels and names, session store, log harvest,
scheduler (describe, logs, cancel, close), factory and the torchx CLI.
The tests provision ``busybox:latest`` themselves (present, else pulled, else
built FROM scratch around a static busybox on the host) and remove every
container they create, by label. With no daemon they skip, unless CI=true.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import io
import itertools
import json
import logging
import os
import pickle
import pwd
import re
import select
import shlex
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import textwrap
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.errors import DockerException, NotFound
from torchx import specs
from torchx.schedulers.api import Scheduler, Stream
from torchx.schedulers.docker_scheduler import LABEL_APP_ID
from torchx.specs import AppState

import docker_scheduler
from docker_scheduler import (
    LABEL_SESSION,
    STATE_DIR_ENV,
    DockerUnavailableError,
    PersistentDockerScheduler,
    create_scheduler,
)

Change = docker_scheduler._Change
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Tests that change this machine (add a user, mount a file system, start a daemon such as sshd, a
# registry or Podman's service, write under /etc) run only where CI=true or this variable is 1.
SYSTEM = CI or os.environ.get("DOCKER_SCHEDULER_TEST_SYSTEM") == "1"
# Which CI legs run a test (docs/testing.md says why): the torchx 0.7 leg on dockerd runs them all;
# the torchx-nightly leg those marked `torchx` (their outcome depends on torchx), the Podman leg
# those marked `engine` (their outcome depends on the engine). The rest (records, the store, the
# state directory's security, crashes and stress) depend on neither, and run once.
IMAGE = "busybox:latest"
# Tests use the local image; `always` would ask a registry first.
CFG: dict[str, Any] = {"image_pull": "missing"}
# Runs until stopped, and stops at once on SIGTERM (PID 1 ignores it by default).
LONG = "trap 'exit 143' TERM; sleep 300 & wait"
TERMINAL = (AppState.SUCCEEDED, AppState.FAILED, AppState.CANCELLED)
ROOT = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------
# Fixtures: daemon, image, schedulers and cleanup
# ---------------------------------------------------------------------------


def needs_system(what: str) -> None:
    """Skips a test that changes this machine unless CI=true or DOCKER_SCHEDULER_TEST_SYSTEM=1."""
    if not SYSTEM:
        pytest.skip(f"{what} changes this machine: runs where CI=true or DOCKER_SCHEDULER_TEST_SYSTEM=1")


def default_signals() -> None:
    """For a child a test stops by signal (``preexec_fn``): the dispositions a terminal gives, since a
    shell's ``&`` starts its children with SIGINT and SIGQUIT ignored, and nohup SIGHUP."""
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def _static_busybox() -> Path | None:
    for candidate in ("/bin/busybox", shutil.which("busybox")):
        if candidate and os.path.isfile(candidate):
            data = Path(candidate).read_bytes()
            if b"/ld-linux" not in data and b"/ld-musl" not in data:
                return Path(candidate)
    return None


def provision_busybox(client: docker.DockerClient) -> str:
    """Makes ``busybox:latest`` available: present, else pulled, else built from the host's static busybox."""
    try:
        client.images.get(IMAGE)
        return IMAGE
    except NotFound:
        pass
    try:
        client.images.pull("busybox", tag="latest")
        return IMAGE
    except DockerException as e:
        logging.info("pulling busybox failed (%s); building it from a static busybox", e)
    binary = _static_busybox()
    if binary is None:
        raise RuntimeError(
            "no busybox image, no registry and no static busybox: apt-get install busybox-static"
        )
    dockerfile = b'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
        tar.add(str(binary), arcname="busybox")
    context.seek(0)
    client.images.build(fileobj=context, custom_context=True, tag=IMAGE, rm=True)
    return IMAGE


def _files(root: Path) -> dict[str, tuple[int, int, int]] | None:
    """Every path under ``root`` with its mode, size and modification time; None when it is missing."""
    if not root.exists():
        return None
    found = {}
    for where, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            st = os.lstat(os.path.join(where, name))
            found[os.path.relpath(os.path.join(where, name), root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return found


def _engine_inventory() -> tuple[set[str], dict[str, set[str]]] | None:
    """The engine's containers, and its images with their tags; None when no engine answers."""
    try:
        with contextlib.closing(docker.from_env()) as c:
            containers = {x["Id"] for x in c.api.containers(all=True)}
            return containers, {i["Id"]: set(i.get("RepoTags") or []) for i in c.api.images(all=True)}
    except DockerException:
        return None


@pytest.fixture(scope="session", autouse=True)
def leaves_what_is_yours_alone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Points the default state directory of every scheduler and child process at the run's own, and
    fails the run if it changed the user's state directory, ``~/.docker``, or containers and images
    the engine had before it (or left a container of its sessions behind)."""
    xdg = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    watched = {Path(os.environ.get(STATE_DIR_ENV) or xdg / "docker_scheduler"), Path.home() / ".docker"}
    files = {path: _files(path) for path in watched}
    engine = _engine_inventory()
    own = {STATE_DIR_ENV: str(tmp_path_factory.mktemp("default-state"))}
    with pytest.MonkeyPatch.context() as env:
        env.setenv(STATE_DIR_ENV, own[STATE_DIR_ENV])
        yield
    changed = [str(path) for path in watched if _files(path) != files[path]]
    after = _engine_inventory()
    if engine is not None and after is not None:
        changed += [f"container {c[:12]}, now gone" for c in engine[0] - after[0]]
        changed += [
            f"image {i[:19]} {sorted(t)}, now {sorted(after[1].get(i, {'gone'}))}"
            for i, t in engine[1].items()
            if after[1].get(i) != t
        ]
        with contextlib.closing(docker.from_env()) as c:
            left = c.api.containers(all=True, filters={"label": LABEL_SESSION})
        changed += [
            f"container {x['Names'][0]} of a test session, left behind"
            for x in left
            if x["Id"] not in engine[0]
        ]
    if changed:
        pytest.fail(f"the tests changed what they did not make: {changed}")


@pytest.fixture(scope="session")
def client() -> Iterator[docker.DockerClient]:
    try:
        c = docker.from_env()
        c.ping()
    except DockerException as e:
        if CI:
            pytest.fail(f"CI=true and no Docker daemon answers: {e}")
        pytest.skip(f"no Docker daemon answers ({e}); start dockerd to run these tests")
    yield c
    c.close()


@pytest.fixture(scope="session")
def image(client: docker.DockerClient) -> str:
    return provision_busybox(client)


@pytest.fixture
def state_dir(tmp_path: Path) -> str:
    return str(tmp_path / "state")


@pytest.fixture
def make(
    client: docker.DockerClient, image: str, state_dir: str
) -> Iterator[Callable[..., PersistentDockerScheduler]]:
    """Builds schedulers on fresh sessions; afterwards removes every container of those sessions."""
    sessions: list[str] = []
    made: list[PersistentDockerScheduler] = []

    def make(session: str | None = None, **kwargs: Any) -> PersistentDockerScheduler:
        name = session or f"test-{uuid.uuid4().hex[:10]}"
        kwargs.setdefault("state_dir", state_dir)
        scheduler = PersistentDockerScheduler(name, **kwargs)
        sessions.append(name)
        made.append(scheduler)
        return scheduler

    yield make
    for name in set(sessions):
        remove_session_containers(client, name)
    for scheduler in made:
        scheduler.close()


def is_podman(client: docker.DockerClient) -> bool:
    """Whether the engine is Podman's Docker-compatible API rather than dockerd."""
    return any("podman" in c.get("Name", "").lower() for c in client.version().get("Components", []))


def labelled(client: docker.DockerClient, key: str, value: str) -> list[Any]:
    """Every container, running or not, labelled ``key=value``."""
    return client.containers.list(all=True, filters={"label": f"{key}={value}"})


def state_env(state_dir: str | Path, **extra: str) -> dict[str, str]:
    """This process's environment, with ``extra`` and ``state_dir`` as the state directory."""
    return {**os.environ, **extra, STATE_DIR_ENV: str(state_dir)}


def remove_session_containers(client: docker.DockerClient, session: str) -> None:
    for c in labelled(client, LABEL_SESSION, session):
        c.remove(force=True)


def remove_app_containers(client: docker.DockerClient, app_id: str) -> None:
    for c in labelled(client, LABEL_APP_ID, app_id):
        c.remove(force=True)


def role(name: str, script: str, replicas: int = 1, **kwargs: Any) -> specs.Role:
    return specs.Role(
        name, image=IMAGE, entrypoint="sh", args=["-c", script], num_replicas=replicas, **kwargs
    )


def submit(scheduler: PersistentDockerScheduler, *roles: specs.Role, name: str = "app", **cfg: Any) -> str:
    return scheduler.submit(specs.AppDef(name, roles=list(roles)), {**CFG, **cfg})


def wait_until(check: Callable[[], Any], what: str, timeout: float = 60, interval: float = 0.2) -> Any:
    """Polls ``check`` until it returns something true, and returns that; fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout}s, still waiting for {what}")
        time.sleep(interval)


def wait_for(scheduler: PersistentDockerScheduler, app_id: str, states: Any = TERMINAL, timeout: float = 60):
    """Polls until the app is in ``states``; for terminal states, until every replica ended too."""

    def reached() -> Any:
        desc = scheduler.describe(app_id)
        replicas = [r.state for s in desc.roles_statuses for r in s.replicas] if desc else []
        settled = states != TERMINAL or all(r in TERMINAL for r in replicas)
        return desc if desc is not None and desc.state in states and settled else None

    return wait_until(reached, f"{app_id} to be in {states}", timeout)


def assert_nothing_created(client: docker.DockerClient, scheduler: PersistentDockerScheduler) -> None:
    """No container of the scheduler's session, and no session file."""
    labelled = {"label": f"{LABEL_SESSION}={scheduler.session_name}"}
    assert client.containers.list(all=True, filters=labelled) == []
    assert not os.path.exists(scheduler.session_file)


def start_long(scheduler: PersistentDockerScheduler, replicas: int = 1) -> str:
    """Submits an app whose replicas run until stopped, and waits until it runs."""
    app_id = submit(scheduler, role("r", LONG, replicas=replicas))
    wait_for(scheduler, app_id, (AppState.RUNNING,))
    return app_id


def container_names(client: docker.DockerClient, app_id: str) -> list[str]:
    found = labelled(client, LABEL_APP_ID, app_id)
    return sorted(c.name for c in found)


def wait_exited(client: docker.DockerClient, app_id: str) -> None:
    for name in container_names(client, app_id):
        client.api.wait(name, timeout=60)


PACKAGE_FILES = [
    "setup.py",
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "docker_scheduler.py",
    "torchx_plugins",
]


def copy_package(dest: Path, *extra: str) -> Path:
    """A copy of the files that make the package (and ``extra`` ones) in ``dest``, as a clone has them."""
    dest.mkdir()
    for name in [*PACKAGE_FILES, *extra]:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, dest / name)
    return dest


def recorded_in(state_dir: str | Path, session: str) -> dict[str, docker_scheduler.AppRecord]:
    """The records of a session file, read by a store of their own, as another process would."""
    with docker_scheduler._open_private_dir(str(state_dir)) as held:
        store = docker_scheduler._SessionStore(held, session, dict)
        return {app_id: store.get(app_id) for app_id, _ in store.summaries()}


def recorded(scheduler: PersistentDockerScheduler) -> dict[str, docker_scheduler.AppRecord]:
    return recorded_in(scheduler.state_dir, scheduler.session_name)


def run_python(
    code: str, state_dir: str, env: Mapping[str, str | None] | None = None, args: Sequence[str] = ()
) -> Any:
    """Runs ``code`` (with ``args`` as its sys.argv[1:]) in a new interpreter, with ``env`` over this
    one's (a None value unsets), and returns what it printed last, as JSON."""
    environ = {**state_env(state_dir), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        env={key: value for key, value in environ.items() if value is not None},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# Labels, names and the state directory
# ---------------------------------------------------------------------------


@pytest.mark.pure
@pytest.mark.parametrize("name", ["", "a/b", "..", "../up", "a..b", "nul\0byte"])
def test_session_name_is_validated(name: str, state_dir: str) -> None:
    with pytest.raises(ValueError, match="invalid session name"):
        PersistentDockerScheduler(name, state_dir=state_dir)
    assert not os.path.exists(state_dir)  # refused before anything is made


@pytest.mark.pure
def test_a_state_dir_under_a_file_names_the_file_and_what_to_do(tmp_path: Path) -> None:
    blocker = tmp_path / "passwd"
    blocker.write_text("root:x:0:0\n")
    with pytest.raises(NotADirectoryError) as raised:
        PersistentDockerScheduler("s", state_dir=str(blocker / "state"))
    assert f"{blocker} is a file, not a directory: point state_dir or DOCKER_SCHEDULER_STATE_DIR at" in str(
        raised.value
    )
    assert "free space" not in str(raised.value) and blocker.read_text() == "root:x:0:0\n"


@pytest.mark.pure
def test_state_dir_comes_from_argument_env_then_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DOCKER_SCHEDULER_STATE_DIR", raising=False)
    assert PersistentDockerScheduler("s").state_dir == str(tmp_path / "xdg" / "docker_scheduler")
    monkeypatch.setenv("DOCKER_SCHEDULER_STATE_DIR", str(tmp_path / "env"))
    assert PersistentDockerScheduler("s").state_dir == str(tmp_path / "env")
    scheduler = PersistentDockerScheduler("s", state_dir=str(tmp_path / "arg"))
    assert scheduler.session_file == str(tmp_path / "arg" / "s.pickle")


@pytest.mark.pure
@pytest.mark.parametrize("chosen_by", ["argument", "env", "xdg"])
def test_a_state_dir_that_cannot_be_made_names_the_path_and_the_setting(
    chosen_by: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.delenv("DOCKER_SCHEDULER_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(blocker / "xdg"))
    kwargs = {"state_dir": str(blocker / "arg")} if chosen_by == "argument" else {}
    if chosen_by == "env":
        monkeypatch.setenv("DOCKER_SCHEDULER_STATE_DIR", str(blocker / "env"))
    path, setting = {
        "argument": (blocker / "arg", "the state_dir argument"),
        "env": (blocker / "env", "DOCKER_SCHEDULER_STATE_DIR"),
        "xdg": (blocker / "xdg" / "docker_scheduler", "${XDG_STATE_HOME:-~/.local/state}"),
    }[chosen_by]
    with pytest.raises(OSError) as raised:
        PersistentDockerScheduler("s", **kwargs)
    message = str(raised.value)
    assert f"the state directory {path} comes from" in message and setting in message
    assert "Not a directory" in message and "point state_dir or DOCKER_SCHEDULER_STATE_DIR" in message


# ---------------------------------------------------------------------------
# Records (pure: no daemon)
# ---------------------------------------------------------------------------


def _record(**replica: Any) -> docker_scheduler.AppRecord:
    """A one-replica app's record, the replica's fields overridden by ``replica``."""
    rep = docker_scheduler.ReplicaRecord("r", 0, "app-r-0", **replica)
    role = docker_scheduler.RoleRecord("r", IMAGE, "sh", ("-c", "true"), {"K": "v"}, 1, 0)
    return docker_scheduler.AppRecord("app", 1.0, (role,), (rep,))


@pytest.mark.pure
def test_records_are_replaced_never_mutated_and_read_back_whole() -> None:
    record = _record(exit_code=3, exit_note="out of memory", ended=2.0, logs="recorded")
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.replicas[0].exit_code = 0  # type: ignore[misc]
    plain = pickle.loads(pickle.dumps(docker_scheduler._to_dict(record)))
    assert _builtin_only(plain)
    assert docker_scheduler._from_dict(docker_scheduler.AppRecord, plain) == record
    ended = record.with_changes({"app-r-0": Change(exit_code=0)})  # final already: only logs may be retried
    assert ended.replicas[0].exit_code == 3 and record.replicas[0].exit_code == 3
    retried = dataclasses.replace(record, replicas=(dataclasses.replace(record.replicas[0], logs="retry"),))
    recorded_now = retried.with_changes({"app-r-0": Change.of_logs("recorded")}).replicas[0]
    assert (recorded_now.logs, recorded_now.exit_code, recorded_now.exit_note) == (
        "recorded",
        3,
        "out of memory",
    )


@pytest.mark.pure
def test_a_store_write_keeps_the_records_it_did_not_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write encodes only the records it changed; a reader decodes only the records it asks for."""
    encoded: list[str] = []
    decoded: list[str] = []
    encode, decode = docker_scheduler._encode, docker_scheduler._decode
    monkeypatch.setattr(docker_scheduler, "_encode", lambda r: encoded.append(r.app_id) or encode(r))
    monkeypatch.setattr(docker_scheduler, "_decode", lambda a, blob: decoded.append(a) or decode(a, blob))
    store = docker_scheduler._SessionStore(docker_scheduler._open_private_dir(str(tmp_path)), "s", dict)
    with store.update() as apps:
        apps["a"] = dataclasses.replace(_record(), app_id="a")
        apps["b"] = dataclasses.replace(_record(), app_id="b")
    with store.update() as apps:
        apps["b"] = store.get("b").with_changes({"app-r-0": Change(exit_code=1, logs="recorded")})
    assert encoded == ["a", "b", "b"]  # "a" was not encoded again
    fresh = docker_scheduler._SessionStore(docker_scheduler._open_private_dir(str(tmp_path)), "s", dict)
    decoded.clear()
    assert [(app_id, state) for app_id, state in fresh.summaries()] == [("a", None), ("b", "FAILED")]
    assert decoded == []  # nothing decoded until asked
    assert fresh.get("b").replicas[0].exit_code == 1 and decoded == ["b"]


@pytest.mark.pure
def test_a_sweep_never_takes_a_finished_temporary_file_before_it_is_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = docker_scheduler._open_private_dir(str(tmp_path))
    rename = docker_scheduler._Dir.replace

    def swept_first(self: Any, *args: Any) -> None:  # another writer sweeps just before the rename
        held.sweep()
        rename(self, *args)

    monkeypatch.setattr(docker_scheduler._Dir, "replace", swept_first)
    with held, held.written("kept") as f:
        f.write(b"whole\n")
    assert (tmp_path / "kept").read_bytes() == b"whole\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


# ---------------------------------------------------------------------------
# Log harvest and reconciliation (pure: no daemon)
# ---------------------------------------------------------------------------

T1, T2 = b"2026-11-30T01:02:03.000000001Z", b"2026-11-30T01:02:04.000000002Z"


@pytest.mark.pure
def test_a_raw_tty_log_split_mid_line_is_harvested_whole(tmp_path: Path) -> None:
    blocks = [T1 + b" hello wor", b"ld\n" + T2 + b" second line\n"]
    assert list(docker_scheduler._frames(iter(blocks))) == [
        (1, T1 + b" hello world\n"),
        (1, T2 + b" second line\n"),
    ]
    with docker_scheduler._open_private_dir(str(tmp_path)) as held:
        names = {1: "out", 2: "err"}
        docker_scheduler._write_streams(docker_scheduler._frames(iter(blocks)), held, held, names)
    assert (tmp_path / "out").read_bytes() == T1 + b" hello world\n" + T2 + b" second line\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["err", "out"]  # no temporary file left


@pytest.mark.pure
def test_a_multiplexed_log_whose_first_block_is_short_is_demultiplexed() -> None:
    body = b"\x01\x00\x00\x00\x00\x00\x00\x03hi\n" + b"\x02\x00\x00\x00\x00\x00\x00\x04err\n"
    for cut in range(1, len(body)):
        blocks = [body[:cut], body[cut:]]
        assert list(docker_scheduler._frames(iter(blocks))) == [(1, b"hi\n"), (2, b"err\n")], cut


@pytest.mark.pure
def test_timestamps_with_an_offset_mean_the_same_instant_everywhere() -> None:
    assert docker_scheduler._fixed_stamp(b"2026-11-30T03:02:03.5+02:00 x\n") == (
        b"2026-11-30T01:02:03.500000000Z x\n"
    )
    finished = datetime(2026, 11, 30, 1, 2, 3, 500000, tzinfo=timezone.utc).timestamp()
    assert docker_scheduler._finished_at("2026-11-30T03:02:03.5+02:00") == finished
    assert docker_scheduler._finished_at("2026-11-30T01:02:03.500000000Z") == finished


@pytest.mark.pure
def test_a_stamp_on_a_whole_second_stands_for_that_second_live_and_harvested() -> None:
    """Podman stamps to the second: such a line may lie anywhere in its second, so a bound in that
    second keeps it. A stamp with a fraction is compared exactly. Harvested and live reads agree."""
    body = b"2026-11-30T01:02:03.000000000Z coarse\n2026-11-30T01:02:03.400000000Z exact\n"
    cases = {  # (since, until) as offsets into 01:02:03 in ms: the lines each keeps
        (500, None): [b"coarse\n"],
        (100, 300): [b"coarse\n"],
        (None, 300): [b"coarse\n"],
        (300, 400): [b"coarse\n", b"exact\n"],
        (401, None): [b"coarse\n"],
        (1000, None): [],
    }
    at = datetime(2026, 11, 30, 1, 2, 3, tzinfo=timezone.utc)
    for (since, until), kept in cases.items():
        window = [None if ms is None else at + timedelta(milliseconds=ms) for ms in (since, until)]
        low, high = (docker_scheduler._docker_time(t) for t in window)
        harvested = [text for _, text in docker_scheduler._read_harvested(io.BytesIO(body), low, high)]
        frames = [(1, line) for line in body.splitlines(keepends=True)]
        live = list(docker_scheduler._stamped_lines(frames, *window))
        assert harvested == live == kept, (since, until)


def _listed(state: str) -> dict[str, Any]:
    return {"State": state}


@pytest.mark.pure
@pytest.mark.parametrize(
    "replica, listed, expected",
    [
        ({}, {"app-r-0": _listed("running")}, {"live": {"app-r-0": AppState.RUNNING}}),
        ({}, {"app-r-0": _listed("exited")}, {"inspect": ("app-r-0",)}),
        ({}, {}, {"changes": Change(vanished=docker_scheduler._GONE_BEFORE_READ, logs="lost")}),
        (
            {"exit_code": 1, "logs": "retry", "log_error": "full"},
            {"app-r-0": _listed("exited")},
            {"retry": ("app-r-0",)},
        ),
        (
            {"exit_code": 1, "logs": "retry", "log_error": "full"},
            {},
            {"changes": Change.of_logs("lost")},
        ),
        ({"exit_code": 0, "logs": "recorded"}, {"app-r-0": _listed("exited")}, {}),
    ],
    ids=["running", "ended", "vanished", "logs-retried", "logs-lost", "settled"],
)
def test_plan_decides_from_the_record_and_the_listing(
    replica: dict[str, Any],
    listed: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    plan = docker_scheduler._plan(_record(**replica), listed, "started", now=5.0)
    assert plan.live == expected.get("live", {})
    assert (plan.inspect, plan.retry) == (expected.get("inspect", ()), expected.get("retry", ()))
    changes = {name: dataclasses.replace(change, ended=None) for name, change in plan.changes.items()}
    assert changes == ({"app-r-0": expected["changes"]} if "changes" in expected else {})
    assert not plan.write


@pytest.mark.pure
def test_plan_leaves_a_starting_app_alone_until_its_start_is_over() -> None:
    starting = dataclasses.replace(_record(), starting=True)
    listed = {"app-r-0": _listed("created")}
    plan = docker_scheduler._plan(starting, listed, "under way", now=5.0)
    assert plan.live == {"app-r-0": AppState.SUBMITTED} and not plan.changes and not plan.write
    plan = docker_scheduler._plan(starting, {}, "not started", now=5.0)
    assert plan.changes["app-r-0"].vanished == docker_scheduler._GONE_NEVER_CREATED and plan.write
    plan = docker_scheduler._plan(starting, {}, "started", now=5.0)
    assert plan.changes["app-r-0"].vanished == docker_scheduler._GONE_BEFORE_READ


# ---------------------------------------------------------------------------
# Session store
# ---------------------------------------------------------------------------


def _builtin_only(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_builtin_only(k) and _builtin_only(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_builtin_only(v) for v in value)
    return value is None or type(value) in (str, int, float, bool, bytes)


def test_session_file_holds_builtins_with_private_modes(
    make: Callable[..., PersistentDockerScheduler],
) -> None:
    scheduler = make()
    app_id = submit(scheduler, role("r", "echo out; echo err >&2"))
    wait_for(scheduler, app_id)
    with open(scheduler.session_file, "rb") as f:
        data = docker_scheduler._RestrictedUnpickler(f).load()
    assert data["format"] == docker_scheduler.FORMAT_VERSION
    assert app_id in data["apps"] and _builtin_only(data)
    assert stat.S_IMODE(os.stat(scheduler.session_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(scheduler.state_dir).st_mode) == 0o700
    log_dir = Path(scheduler.state_dir) / f"{scheduler.session_name}.logs" / app_id
    assert stat.S_IMODE(log_dir.stat().st_mode) == 0o700
    assert {p.name for p in log_dir.iterdir()} == {".started", "r.0.stdout", "r.0.stderr"}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in log_dir.iterdir())


class _RunsCode:
    """Unpickling this would create a marker file through os.system."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_a_crafted_pickle(
    make: Callable[..., PersistentDockerScheduler], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"format": 1, "session": "x", "apps": {"a": _RunsCode(str(marker))}})
    with pytest.raises(pickle.UnpicklingError, match=r"posix\.system|os\.system"):
        docker_scheduler._RestrictedUnpickler(io.BytesIO(payload)).load()
    scheduler = make()
    Path(scheduler.session_file).write_bytes(payload)
    os.chmod(scheduler.session_file, 0o600)
    with caplog.at_level(logging.WARNING, logger="docker_scheduler"):
        assert scheduler.describe("a") is None
    assert not marker.exists()
    aside = [p for p in Path(scheduler.state_dir).iterdir() if ".pickle.corrupt-" in p.name]
    assert len(aside) == 1 and aside[0].read_bytes() == payload
    assert scheduler.session_file in caplog.text and str(aside[0]) in caplog.text


# ---------------------------------------------------------------------------
# Scheduler: describe
# ---------------------------------------------------------------------------


@pytest.mark.smoke
def test_describe_unknown_app_is_none_and_says_so_once(
    make: Callable[..., PersistentDockerScheduler], caplog: pytest.LogCaptureFixture
) -> None:
    scheduler = make()
    with caplog.at_level(logging.WARNING, logger="docker_scheduler"):
        assert scheduler.describe("never-scheduled-0000") is None
        assert scheduler.describe("never-scheduled-0000") is None  # torchx's CLI asks every second
    said = [r.getMessage() for r in caplog.records if "never-scheduled-0000" in r.getMessage()]
    assert said == [
        f"session {scheduler.session_name} in {scheduler.state_dir} has no app never-scheduled-0000, "
        "and no container carries it: check the id (list(), or `torchx list -s local_docker_persistent`, "
        "lists the session's apps)"
    ]


@pytest.mark.torchx
@pytest.mark.engine
def test_multi_role_mixed_states_fail_and_keep_roles_as_submitted(
    make: Callable[..., PersistentDockerScheduler],
) -> None:
    scheduler = make()
    good = role("good", "echo $GREETING", replicas=2, env={"GREETING": "hi"})
    bad = role("bad", "exit 3")
    app_id = submit(scheduler, good, bad)
    desc = wait_for(scheduler, app_id)
    assert desc.state == AppState.FAILED
    states = {(s.role, r.id): r.state for s in desc.roles_statuses for r in s.replicas}
    assert states == {
        ("good", 0): AppState.SUCCEEDED,
        ("good", 1): AppState.SUCCEEDED,
        ("bad", 0): AppState.FAILED,
    }
    roles = {r.name: r for r in desc.roles}
    assert (roles["good"].image, roles["good"].entrypoint, roles["good"].args) == (
        IMAGE,
        "sh",
        ["-c", "echo $GREETING"],
    )
    assert roles["good"].env == {"GREETING": "hi"} and roles["good"].num_replicas == 2
    assert roles["bad"].num_replicas == 1
    assert "bad/0 exited with code 3" in desc.msg


@pytest.mark.smoke
@pytest.mark.engine
def test_multi_replica_succeeds_only_when_every_replica_does(
    make: Callable[..., PersistentDockerScheduler],
) -> None:
    scheduler = make()
    ok = submit(scheduler, role("w", "exit 0", replicas=3))
    one_bad = submit(scheduler, role("w", '[ "$(hostname)" != "${HOSTNAME%-1}-1" ]', replicas=3))
    assert wait_for(scheduler, ok).state == AppState.SUCCEEDED
    desc = wait_for(scheduler, one_bad)
    assert desc.state == AppState.FAILED
    assert [r.state for r in desc.roles_statuses[0].replicas] == [
        AppState.SUCCEEDED,
        AppState.FAILED,
        AppState.SUCCEEDED,
    ]


@pytest.mark.smoke
@pytest.mark.engine
def test_running_app_reads_running_until_every_replica_ends(
    make: Callable[..., PersistentDockerScheduler],
) -> None:
    scheduler = make()
    app_id = submit(scheduler, role("quick", "exit 0"), role("slow", LONG))

    def quick_done() -> Any:
        desc = scheduler.describe(app_id)
        replicas = {s.role: s.replicas[0].state for s in desc.roles_statuses}
        return desc if replicas == {"quick": AppState.SUCCEEDED, "slow": AppState.RUNNING} else None

    assert wait_until(quick_done, "quick to succeed while slow runs", 30).state == AppState.RUNNING


@pytest.mark.pure
@pytest.mark.parametrize(
    "states, expected",
    [
        ([AppState.SUCCEEDED, AppState.RUNNING, AppState.PENDING], AppState.PENDING),
        ([AppState.RUNNING, AppState.SUBMITTED], AppState.SUBMITTED),
        ([AppState.SUCCEEDED, AppState.UNKNOWN], AppState.UNKNOWN),
        ([AppState.FAILED, AppState.RUNNING], AppState.FAILED),
        ([AppState.SUCCEEDED, AppState.SUCCEEDED], AppState.SUCCEEDED),
        ([], AppState.UNKNOWN),
    ],
)
def test_app_state_rules(states: list[AppState], expected: AppState) -> None:
    assert docker_scheduler._app_state(states) == expected
    assert docker_scheduler._app_state(states, cancelled=True) == AppState.CANCELLED


@pytest.mark.smoke
@pytest.mark.torchx
@pytest.mark.engine
def test_exit_code_and_logs_survive_container_removal(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    scheduler = make()
    app_id = submit(scheduler, role("r", "echo bye; exit 7"))
    assert wait_for(scheduler, app_id).state == AppState.FAILED
    for name in container_names(client, app_id):
        client.api.remove_container(name)
    fresh = make(session=scheduler.session_name)
    desc = fresh.describe(app_id)
    assert desc.state == AppState.FAILED and "exited with code 7" in desc.msg
    assert list(fresh.log_iter(app_id, "r")) == ["bye\n"]


@pytest.mark.engine
def test_container_removed_before_exit_reads_failed_and_ends_waits(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    scheduler = make()
    app_id = start_long(scheduler, replicas=2)
    for name in container_names(client, app_id):
        client.api.remove_container(name, force=True)
    # torchx's Runner.wait polls until a terminal state: it must end (run_python times out otherwise).
    seen = run_python(
        f"""
        import json
        from torchx.runner import Runner
        from docker_scheduler import create_scheduler
        with Runner({scheduler.session_name!r}, {{"local_docker_persistent": create_scheduler}}) as runner:
            handle = "local_docker_persistent://{scheduler.session_name}/{app_id}"
            status = runner.wait(handle, wait_interval=0.2)
        print(json.dumps([status.state.name, status.msg]))
        """,
        scheduler.state_dir,
    )
    assert seen[0] == "FAILED"
    assert f"r/0: container {app_id}-r-0 vanished before its exit code could be read" in seen[1]
    desc = scheduler.describe(app_id)
    assert desc.state == AppState.FAILED
    assert [r.state for r in desc.roles_statuses[0].replicas] == [AppState.FAILED] * 2


# ---------------------------------------------------------------------------
# Scheduler: logs
# ---------------------------------------------------------------------------


def gap(client: docker.DockerClient) -> str:
    """Seconds between two log lines that a bound must tell apart: Podman stamps lines to the whole
    second, so two whole seconds and more there; dockerd stamps them to the nanosecond."""
    return "2.2" if is_podman(client) else "0.2"


def script(client: docker.DockerClient) -> str:
    g = gap(client)
    return (
        f"echo o1; sleep 0.3; echo e1 >&2; sleep {g}; echo o2; sleep 0.3; echo e2 >&2; sleep {g}; "
        "echo o3; printf partial"
    )


def _docker_times(client: docker.DockerClient, name: str) -> dict[str, datetime]:
    times = {}
    for line in client.api.logs(name, timestamps=True).decode().splitlines():
        ts, _, text = line.partition(" ")
        # dockerd prints 9 fraction digits; Podman trims them, or prints none
        fixed = docker_scheduler._fixed_stamp(f"{ts} ".encode()).decode()
        times[text] = datetime.strptime(fixed[:26], "%Y-%m-%dT%H:%M:%S.%f")
    return times


def _all_params(times: dict[str, datetime]) -> dict[str, dict[str, Any]]:
    mid1 = times["e1"] + (times["o2"] - times["e1"]) / 2
    mid2 = times["e2"] + (times["o3"] - times["e2"]) / 2
    return {
        "default": {},
        "stdout": {"streams": Stream.STDOUT},
        "stderr": {"streams": Stream.STDERR},
        "combined": {"streams": Stream.COMBINED},
        "regex": {"regex": "^o"},
        "since": {"since": mid1},
        "since_aware": {"since": mid1.replace(tzinfo=timezone.utc).astimezone(timezone(timedelta(hours=5)))},
        "until": {"until": mid2},
        "window": {"since": mid1, "until": mid2},
        "window_stdout_regex": {"since": mid1, "until": mid2, "streams": Stream.STDOUT, "regex": "2"},
        "tail": {"should_tail": True},
    }


EXPECTED = {
    "default": ["o1\n", "e1\n", "o2\n", "e2\n", "o3\n", "partial"],
    "stdout": ["o1\n", "o2\n", "o3\n", "partial"],
    "stderr": ["e1\n", "e2\n"],
    "combined": ["o1\n", "e1\n", "o2\n", "e2\n", "o3\n", "partial"],
    "regex": ["o1\n", "o2\n", "o3\n"],
    "since": ["o2\n", "e2\n", "o3\n", "partial"],
    "since_aware": ["o2\n", "e2\n", "o3\n", "partial"],
    "until": ["o1\n", "e1\n", "o2\n", "e2\n"],
    "window": ["o2\n", "e2\n"],
    "window_stdout_regex": ["o2\n"],
    "tail": ["o1\n", "e1\n", "o2\n", "e2\n", "o3\n", "partial"],
}


@pytest.mark.smoke
@pytest.mark.engine
def test_every_log_parameter_reads_the_same_before_and_after_removal(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    scheduler = make()
    app_id = submit(scheduler, role("r", script(client)))
    wait_exited(client, app_id)
    (name,) = container_names(client, app_id)
    params = _all_params(_docker_times(client, name))
    live = {key: list(scheduler.log_iter(app_id, "r", **p)) for key, p in params.items()}
    assert live == EXPECTED
    wait_for(scheduler, app_id)  # harvests
    client.api.remove_container(name)
    fresh = make(session=scheduler.session_name)
    harvested = {key: list(fresh.log_iter(app_id, "r", **p)) for key, p in params.items()}
    assert harvested == EXPECTED


@pytest.mark.engine
def test_since_and_until_keep_every_line_that_may_lie_in_the_window(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    """Podman stamps lines to the second: a bound inside a line's second keeps the line. dockerd's
    stamps are exact: a bound a nanosecond after a line drops it. Each of five lines, live and harvested."""
    scheduler = make()
    pace = "0.7" if is_podman(client) else "0.05"  # Podman: lines in different seconds, and some in one
    app_id = submit(scheduler, role("r", f"for i in 1 2 3 4 5; do echo line$i; sleep {pace}; done"))
    wait_exited(client, app_id)
    (name,) = container_names(client, app_id)
    stamps = {}
    for raw in client.api.logs(name, timestamps=True).decode().splitlines():
        ts, _, text = raw.partition(" ")
        stamps[text] = docker_scheduler._fixed_stamp(f"{ts} ".encode()).decode()[:-1]
    coarse = all(ts.endswith(".000000000Z") for ts in stamps.values())
    assert coarse == is_podman(client)

    def windows() -> dict[str, list[list[str]]]:
        seen: dict[str, list[list[str]]] = {}
        for text, ts in stamps.items():
            at = datetime.strptime(ts[:26], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=timezone.utc)
            later = at + (timedelta(milliseconds=500) if coarse else timedelta(microseconds=1))
            whole = at.replace(microsecond=0)  # a bound on a whole second: asked of Podman as such
            seen[text] = [
                list(scheduler.log_iter(app_id, "r", since=later)),
                list(scheduler.log_iter(app_id, "r", since=later, until=later)),
                list(scheduler.log_iter(app_id, "r", until=whole)),
                list(scheduler.log_iter(app_id, "r", since=whole, until=whole)),
            ]
        epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
        seen["epoch"] = [
            list(scheduler.log_iter(app_id, "r", **w)) for w in ({"until": epoch}, {"since": epoch})
        ]
        return seen

    def expected(text: str) -> list[list[str]]:
        whole = stamps[text][:19] + ".000000000Z"
        on_whole = [
            [t + "\n" for t in stamps if stamps[t] <= whole],
            [t + "\n" for t in stamps if stamps[t] == whole],
        ]
        if coarse:  # the line may lie after the bound: kept
            after = [t + "\n" for t in stamps if stamps[t] >= stamps[text]]
            return [after, [t + "\n" for t in stamps if stamps[t] == stamps[text]], *on_whole]
        after = [t + "\n" for t in stamps if stamps[t] > stamps[text]]
        return [after, [], *on_whole]

    live = windows()
    wait_for(scheduler, app_id)  # harvests
    client.api.remove_container(name)
    harvested = windows()
    everything = [t + "\n" for t in stamps]
    assert live == harvested == {**{text: expected(text) for text in stamps}, "epoch": [[], everything]}


@pytest.mark.engine
def test_naive_datetimes_are_local_time(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    scheduler = make()
    app_id = submit(scheduler, role("r", f"echo before; sleep {gap(client)}; echo after"))
    wait_for(scheduler, app_id)
    (name,) = container_names(client, app_id)
    times = _docker_times(client, name)
    middle = (
        (times["before"] + (times["after"] - times["before"]) / 2).replace(tzinfo=timezone.utc).timestamp()
    )
    seen = run_python(
        f"""
        import json
        from datetime import datetime
        from docker_scheduler import PersistentDockerScheduler
        s = PersistentDockerScheduler({scheduler.session_name!r})
        naive = datetime.fromtimestamp({middle!r})  # local time, here Asia/Kolkata's
        print(json.dumps([list(s.log_iter({app_id!r}, "r", since=naive)), str(naive)]))
        """,
        scheduler.state_dir,
        env={"TZ": "Asia/Kolkata"},
    )
    assert seen[0] == ["after\n"], seen


@pytest.mark.engine
def test_long_lines_survive_harvest_whole(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    scheduler = make()
    app_id = submit(scheduler, role("r", "head -c 40000 /dev/zero | tr '\\0' x; echo; echo next"))
    wait_exited(client, app_id)
    live = list(scheduler.log_iter(app_id, "r"))
    wait_for(scheduler, app_id)
    for name in container_names(client, app_id):
        client.api.remove_container(name)
    assert live == ["x" * 40000 + "\n", "next\n"]
    assert list(scheduler.log_iter(app_id, "r")) == live


@pytest.mark.engine
def test_tail_follows_a_running_replica_until_it_exits(
    make: Callable[..., PersistentDockerScheduler],
) -> None:
    """Ending on a line with no newline, which dockerd's follow can drop: read again after it ends."""
    scheduler = make()
    expected = ["line1\n", "line2\n", "line3\n", "last"]
    for _ in range(3):
        app_id = submit(scheduler, role("r", "for i in 1 2 3; do echo line$i; sleep 0.3; done; printf last"))
        assert list(scheduler.log_iter(app_id, "r", should_tail=True)) == expected
    assert list(scheduler.log_iter(app_id, "r", should_tail=True)) == expected
    # The seam: a follow that ends before the last two lines, as dockerd's can, is caught up.
    logs, streams, window = scheduler._logs, ["stdout", "stderr"], (None, None)
    cut = itertools.islice(logs._frames(f"{app_id}-r-0", streams, window, True), 2)
    caught_up = logs._caught_up(f"{app_id}-r-0", streams, window, cut)
    assert [payload.partition(b" ")[2] for _, payload in caught_up] == [line.encode() for line in expected]


@pytest.mark.engine
def test_logs_of_a_container_removed_before_they_were_read_are_reported_lost(
    make: Callable[..., PersistentDockerScheduler],
    client: docker.DockerClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scheduler = make()
    app_id = submit(scheduler, role("r", "echo never-read"))
    wait_exited(client, app_id)
    for name in container_names(client, app_id):
        client.api.remove_container(name)
    with caplog.at_level(logging.WARNING, logger="docker_scheduler"):
        assert list(scheduler.log_iter(app_id, "r")) == []
    assert "logs of" in caplog.text and "are lost" in caplog.text
    desc = scheduler.describe(app_id)  # its exit code went with the container: never SUCCEEDED
    assert desc.state == AppState.FAILED and "vanished before its exit code could be read" in desc.msg


@pytest.mark.engine
def test_harvested_logs_removed_by_hand_are_read_again_or_reported_gone(
    make: Callable[..., PersistentDockerScheduler],
    client: docker.DockerClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scheduler = make()
    app_id = submit(scheduler, role("r", "echo out; echo err >&2"))
    assert wait_for(scheduler, app_id).state == AppState.SUCCEEDED  # harvested; the container is kept
    app_dir = Path(scheduler.state_dir) / f"{scheduler.session_name}.logs" / app_id
    for f in app_dir.glob("r.0.*"):
        f.unlink()
    with caplog.at_level(logging.WARNING, logger="docker_scheduler"):
        assert sorted(scheduler.log_iter(app_id, "r")) == ["err\n", "out\n"]
    assert "were removed; reading them again from its container" in caplog.text
    assert (app_dir / "r.0.stdout").read_bytes().endswith(b" out\n")  # and recorded again
    remove_app_containers(client, app_id)
    (app_dir / "r.0.stderr").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="docker_scheduler"):
        assert list(scheduler.log_iter(app_id, "r")) == []
    gone = f"the log files of {app_id}-r-0 in {app_dir} were removed, and so was its container: the logs"
    assert gone in caplog.text
    assert scheduler.describe(app_id).state == AppState.SUCCEEDED  # its exit code is still recorded


def test_log_iter_names_the_valid_roles_and_replicas(make: Callable[..., PersistentDockerScheduler]) -> None:
    scheduler = make()
    app_id = submit(scheduler, role("a", "true", replicas=2), role("b", "true"))
    with pytest.raises(ValueError, match=r"no role 'c'; its roles are \['a', 'b'\]"):
        scheduler.log_iter(app_id, "c")
    with pytest.raises(ValueError, match="no replica 2; valid replica indices are 0 to 1"):
        scheduler.log_iter(app_id, "a", 2)
    with pytest.raises(ValueError, match="has no app nope-123, and no container carries it: check the id"):
        scheduler.log_iter("nope-123", "a")


# ---------------------------------------------------------------------------
# Scheduler: another process, cancel
# ---------------------------------------------------------------------------


@pytest.mark.smoke
@pytest.mark.engine
def test_a_second_process_reads_what_the_first_recorded(
    make: Callable[..., PersistentDockerScheduler],
) -> None:
    scheduler = make()
    app_id = submit(scheduler, role("r", "echo from-first; exit 4", replicas=2))
    wait_for(scheduler, app_id)
    seen = run_python(
        f"""
        import json
        from docker_scheduler import PersistentDockerScheduler
        s = PersistentDockerScheduler({scheduler.session_name!r})
        d = s.describe({app_id!r})
        states = [r.state.name for r in d.roles_statuses[0].replicas]
        logs = list(s.log_iter({app_id!r}, "r", 1))
        print(json.dumps([d.state.name, states, logs, [a.app_id for a in s.list()]]))
        """,
        scheduler.state_dir,
    )
    assert seen == ["FAILED", ["FAILED", "FAILED"], ["from-first\n"], [app_id]]


@pytest.mark.smoke
@pytest.mark.torchx
@pytest.mark.engine
def test_cancel_is_seen_by_every_process(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    scheduler = make()
    app_id = start_long(scheduler, replicas=2)
    scheduler.cancel(app_id)
    desc = scheduler.describe(app_id)
    assert desc.state == AppState.CANCELLED and desc.msg.startswith("cancelled")
    assert [r.state for r in desc.roles_statuses[0].replicas] == [AppState.CANCELLED] * 2
    assert all(not c.attrs["State"]["Running"] for c in labelled(client, LABEL_APP_ID, app_id))
    seen = run_python(
        f"""
        import json
        from docker_scheduler import PersistentDockerScheduler
        print(json.dumps(PersistentDockerScheduler({scheduler.session_name!r}).describe({app_id!r}).state.name))
        """,
        scheduler.state_dir,
    )
    assert seen == "CANCELLED"


@pytest.mark.torchx
def test_cancel_of_finished_or_unknown_apps_changes_nothing(
    make: Callable[..., PersistentDockerScheduler], caplog: pytest.LogCaptureFixture
) -> None:
    scheduler = make()
    app_id = submit(scheduler, role("r", "exit 0"))
    wait_for(scheduler, app_id)
    scheduler.cancel(app_id)
    assert scheduler.describe(app_id).state == AppState.SUCCEEDED
    before = Path(scheduler.session_file).read_bytes()
    with caplog.at_level(logging.WARNING, logger="docker_scheduler"):
        scheduler.cancel("no-such-app-123")
        scheduler.delete("no-such-app-123")
    assert "no-such-app-123" in caplog.text
    assert Path(scheduler.session_file).read_bytes() == before  # nothing written, nothing else touched
    assert [(a.app_id, a.state) for a in scheduler.list()] == [(app_id, AppState.SUCCEEDED)]
    assert scheduler.describe("no-such-app-123") is None


@pytest.mark.engine
def test_cancel_of_a_failed_app_stops_the_rest_and_keeps_failed(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    scheduler = make()
    app_id = submit(scheduler, role("broken", "exit 2"), role("server", LONG))
    wait_until(
        lambda: scheduler.describe(app_id).roles_statuses[0].replicas[0].state == AppState.FAILED,
        "the broken replica to fail",
        30,
    )
    scheduler.cancel(app_id)
    desc = scheduler.describe(app_id)
    assert desc.state == AppState.FAILED and "broken/0 exited with code 2" in desc.msg
    assert all(not c.attrs["State"]["Running"] for c in labelled(client, LABEL_APP_ID, app_id))


# Ignores SIGTERM, so only SIGKILL stops it.
STUBBORN = "trap '' TERM; while true; do sleep 1; done"


@pytest.mark.engine
def test_stop_timeout_sets_the_grace_before_sigkill_and_is_recorded(
    make: Callable[..., PersistentDockerScheduler], caplog: pytest.LogCaptureFixture
) -> None:
    scheduler = make()
    app_id = submit(scheduler, role("r", STUBBORN, replicas=2), stop_timeout=1)
    wait_for(scheduler, app_id, (AppState.RUNNING,))
    with caplog.at_level(logging.INFO, logger="docker_scheduler"):
        make(session=scheduler.session_name).cancel(app_id)  # another instance: the timeout is recorded
    assert f"cancel: stopping app {app_id} ({app_id}-r-0, {app_id}-r-1): SIGTERM, then SIGKILL after 1 s" in (
        caplog.text
    )
    desc = scheduler.describe(app_id)
    assert desc.state == AppState.CANCELLED and "was stopped with code 137" in desc.msg  # SIGKILL


@pytest.mark.parametrize("value", [-1, True, 2.5, "soon"])
@pytest.mark.torchx
def test_a_bad_stop_timeout_is_refused_before_anything_is_created(
    value: Any, make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    from torchx.specs.api import InvalidRunConfigException

    scheduler = make()
    if isinstance(value, int):  # the right type, the wrong value: ours
        with pytest.raises(ValueError, match=rf"stop_timeout={value!r} is not a whole number of seconds, 0"):
            submit(scheduler, role("r", "true"), stop_timeout=value)
    else:  # torchx checks every option's type first, naming it
        with pytest.raises(InvalidRunConfigException, match="Run option: stop_timeout, must be of type: int"):
            submit(scheduler, role("r", "true"), stop_timeout=value)
    assert_nothing_created(client, scheduler)


@pytest.mark.engine
def test_wait_blocks_until_the_app_ends_and_returns_its_description(
    make: Callable[..., PersistentDockerScheduler],
) -> None:
    scheduler = make()
    failed = submit(scheduler, role("ok", "sleep 0.3"), role("bad", "sleep 0.3; exit 3"))
    desc = scheduler.wait(failed, timeout=60)
    assert desc.state == AppState.FAILED and "bad/0 exited with code 3" in desc.msg
    retried = submit(scheduler, role("r", "sleep 0.3; exit 1", max_retries=2))
    desc = scheduler.wait(retried, timeout=60)  # not fooled by the ends between retries
    assert (desc.state, desc.num_restarts) == (AppState.FAILED, 2)
    assert scheduler.wait("never-scheduled-0000", timeout=60) is None


def test_wait_raises_timeout_error_naming_the_app_and_its_state(
    make: Callable[..., PersistentDockerScheduler],
) -> None:
    scheduler = make()
    app_id = start_long(scheduler)
    with pytest.raises(TimeoutError, match=rf"app {app_id} is still RUNNING after 0.5 s"):
        scheduler.wait(app_id, timeout=0.5)


@pytest.mark.smoke
@pytest.mark.engine
def test_wait_works_across_processes(make: Callable[..., PersistentDockerScheduler]) -> None:
    scheduler = make()
    app_id = submit(scheduler, role("r", "sleep 0.3; echo done"))
    seen = run_python(
        f"""
        import json
        from docker_scheduler import PersistentDockerScheduler
        desc = PersistentDockerScheduler({scheduler.session_name!r}).wait({app_id!r}, timeout=60)
        print(json.dumps(desc.state.name))
        """,
        scheduler.state_dir,
    )
    assert seen == "SUCCEEDED"
    assert list(scheduler.log_iter(app_id, "r")) == ["done\n"]


def test_another_state_dir_with_the_same_session_never_sees_or_touches_an_app(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient, tmp_path: Path
) -> None:
    a = make()
    b = make(session=a.session_name, state_dir=str(tmp_path / "other-state"))
    running = start_long(a)
    assert b.list() == [] and b.describe(running) is None
    with pytest.raises(ValueError, match=f"has no app {running}, and no container"):
        b.log_iter(running, "r")
    b.cancel(running)
    b.delete(running)
    assert not os.path.exists(b.session_file)  # nothing recorded for an app that is not its
    assert a.describe(running).state == AppState.RUNNING and len(container_names(client, running)) == 1
    Path(b.session_file).write_bytes(b"corrupt")  # a rebuild adopts only this state dir's containers
    assert b.list() == []
    a.cancel(running)
    assert a.describe(running).state == AppState.CANCELLED


def test_another_session_in_the_same_state_dir_never_acts_on_an_app(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    a, b = make(), make()
    running = start_long(a)
    b.cancel(running)
    b.delete(running)
    assert b.prune(timedelta(0)) == [] and b.describe(running) is None
    assert a.describe(running).state == AppState.RUNNING and len(container_names(client, running)) == 1
    assert (
        client.api.inspect_container(f"{running}-r-0")["Config"]["Labels"][docker_scheduler.LABEL_STATE_DIR]
        == Path(a.state_dir, docker_scheduler.IDENTITY_FILE).read_text().strip()
    )


@pytest.mark.smoke
def test_list_shows_this_session_only(make: Callable[..., PersistentDockerScheduler]) -> None:
    mine, other = make(), make()
    a = submit(mine, role("r", "exit 0"))
    b = submit(mine, role("r", "exit 1"))
    c = submit(other, role("r", "exit 0"))
    wait_for(mine, a), wait_for(mine, b), wait_for(other, c)
    assert {(x.app_id, x.state) for x in mine.list()} == {(a, AppState.SUCCEEDED), (b, AppState.FAILED)}
    assert [x.app_id for x in other.list()] == [c]
    os.remove(mine.session_file)  # as if no process had recorded them: adopted from their containers
    assert {(x.app_id, x.state) for x in mine.list()} == {(a, AppState.SUCCEEDED), (b, AppState.FAILED)}


# ---------------------------------------------------------------------------
# Scheduler: delete and describe_native
# ---------------------------------------------------------------------------


@pytest.mark.smoke
@pytest.mark.torchx
@pytest.mark.engine
def test_delete_forgets_a_running_app_and_leaves_the_rest(
    make: Callable[..., PersistentDockerScheduler],
    client: docker.DockerClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scheduler = make()
    kept = submit(scheduler, role("r", "echo kept; exit 5"))
    wait_for(scheduler, kept)
    running = start_long(scheduler, replicas=2)
    finished = submit(scheduler, role("r", "echo gone"))
    wait_for(scheduler, finished)
    log_root = Path(scheduler.state_dir) / f"{scheduler.session_name}.logs"
    assert (log_root / finished).is_dir()

    scheduler.delete(running)
    scheduler.delete(finished)
    for app_id in (running, finished):
        assert container_names(client, app_id) == []
        assert scheduler.describe(app_id) is None
        assert scheduler.describe_native(app_id) is None
        assert not (log_root / app_id).exists()
        with pytest.raises(ValueError, match="no app"):
            scheduler.log_iter(app_id, "r")
    assert [a.app_id for a in scheduler.list()] == [kept]
    assert [a.app_id for a in make(session=scheduler.session_name).list()] == [kept]
    desc = scheduler.describe(kept)
    assert desc.state == AppState.FAILED and "code 5" in desc.msg
    assert list(scheduler.log_iter(kept, "r")) == ["kept\n"]

    with caplog.at_level(logging.DEBUG, logger="docker_scheduler"):
        scheduler.delete("no-such-app-123")
    assert "no-such-app-123" in caplog.text
    assert [a.app_id for a in scheduler.list()] == [kept]


def test_delete_beside_concurrent_writers_loses_nothing(
    make: Callable[..., PersistentDockerScheduler], state_dir: str
) -> None:
    scheduler = make()
    doomed = [submit(scheduler, role("r", "true")) for _ in range(6)]
    writers = [start_writer(scheduler.session_name, 8, state_dir) for _ in range(2)]
    for app_id in doomed:
        scheduler.delete(app_id)
    written = []
    for proc in writers:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        written += out.split()
    assert len(set(written)) == 16
    assert {a.app_id for a in make(session=scheduler.session_name).list()} == set(written)


def _native_app(tmp_path: Path) -> specs.AppDef:
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("mounted\n")
    r = role(
        "r",
        "cat /data/f; echo $GREETING",
        replicas=2,
        env={"GREETING": "hi"},
        max_retries=1,
        mounts=[specs.BindMount(src_path=str(data), dst_path="/data", read_only=True)],
        resource=specs.Resource(cpu=1, gpu=0, memMB=128),
    )
    return specs.AppDef("native", roles=[r])


@pytest.mark.parametrize("when", ["before", "during"])
def test_a_harvest_that_meets_a_delete_leaves_nothing_and_says_what_happened(
    make: Callable[..., PersistentDockerScheduler],
    client: docker.DockerClient,
    caplog: pytest.LogCaptureFixture,
    when: str,
) -> None:
    """Another process deletes the app once the harvest has its logs request (``before`` it opens the
    app's directory), or while it writes them into that directory (``during``)."""
    harvester = make()
    app_id = submit(harvester, role("r", "echo hi"))
    wait_exited(client, app_id)
    logs = harvester._docker.logs

    def deleted_meanwhile(*args: Any, **kwargs: Any) -> Any:
        response = logs(*args, **kwargs)
        if when == "before":
            make(session=harvester.session_name).delete(app_id)
            return response
        blocks = response.iter_content

        def deleted_while_written(size: int) -> Iterator[bytes]:
            yield from blocks(size)
            make(session=harvester.session_name).delete(app_id)

        response.iter_content = deleted_while_written
        return response

    harvester._docker.logs = deleted_meanwhile
    with caplog.at_level(logging.WARNING, logger="docker_scheduler"):
        harvester.describe(app_id)
    assert "free space" not in caplog.text
    if when == "during":
        assert "a directory in it was removed meanwhile (by a delete, or by hand)" in caplog.text
    assert not os.path.exists(os.path.join(harvester.state_dir, f"{harvester.session_name}.logs", app_id))
    assert harvester.describe(app_id) is None and container_names(client, app_id) == []


@pytest.mark.torchx
def test_describe_native_returns_the_request_as_scheduled(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient, tmp_path: Path
) -> None:
    scheduler = make()
    info = scheduler.submit_dryrun(_native_app(tmp_path), dict(CFG))
    expected = copy.deepcopy(info.request)
    app_id = scheduler.schedule(info)
    wait_for(scheduler, app_id)
    assert scheduler.describe(app_id).state == AppState.SUCCEEDED
    for name in container_names(client, app_id):
        client.api.remove_container(name)

    native = scheduler.describe_native(app_id)
    assert native is not None and native.request.app_id == app_id
    assert [(c.image, c.command, c.kwargs) for c in native.request.containers] == [
        (c.image, c.command, c.kwargs) for c in expected.containers
    ]
    kwargs = native.request.containers[1].kwargs
    assert isinstance(kwargs["mounts"][0], docker.types.Mount)
    assert kwargs["mounts"][0]["Source"] == str(tmp_path / "data") and kwargs["mounts"][0]["ReadOnly"]
    assert kwargs["environment"]["GREETING"] == "hi"
    assert kwargs["labels"][LABEL_SESSION] == scheduler.session_name
    assert kwargs["restart_policy"] == {"Name": "on-failure", "MaximumRetryCount": 1}
    assert (kwargs["mem_limit"], kwargs["nano_cpus"], kwargs["network"]) == ("128m", 10**9, "torchx")
    assert kwargs["hostname"] == kwargs["name"] == f"{app_id}-r-1"
    assert scheduler.describe_native("no-such-app-123") is None

    seen = run_python(
        f"""
        import json
        from docker_scheduler import PersistentDockerScheduler
        native = PersistentDockerScheduler({scheduler.session_name!r}).describe_native({app_id!r})
        c = native.request.containers[0]
        print(json.dumps([c.image, c.command, type(c.kwargs["mounts"][0]).__name__, c.kwargs["name"]]))
        """,
        scheduler.state_dir,
    )
    assert seen == [IMAGE, expected.containers[0].command, "Mount", f"{app_id}-r-0"]


@pytest.mark.pure
def test_docker_helper_types_survive_the_session_file() -> None:
    kwargs = {
        "device_requests": [docker.types.DeviceRequest(count=2, capabilities=[["compute", "utility"]])],
        "ulimits": [docker.types.Ulimit(name="nofile", soft=1024, hard=2048)],
        "log_config": docker.types.LogConfig(type="none"),
        "mounts": [docker.types.Mount(target="/v", source="vol", type="volume")],
    }
    plain = docker_scheduler._builtins_only(kwargs)
    assert _builtin_only(plain)
    docker_scheduler._RestrictedUnpickler(io.BytesIO(pickle.dumps(plain))).load()
    rebuilt = docker_scheduler._container_kwargs(plain)
    assert rebuilt == kwargs
    assert [type(rebuilt[k][0]) for k in ("device_requests", "ulimits", "mounts")] == [
        docker.types.DeviceRequest,
        docker.types.Ulimit,
        docker.types.Mount,
    ]
    assert isinstance(rebuilt["log_config"], docker.types.LogConfig)
    assert rebuilt["device_requests"][0].count == 2


def _session_file(session: str, apps: dict[str, Any]) -> bytes:
    """A format-3 session file holding ``apps`` (id to a plain record dict) as given."""
    entries = {app_id: (1.0, None, pickle.dumps(plain)) for app_id, plain in apps.items()}
    return pickle.dumps({"format": 3, "session": session, "apps": entries})


# ---------------------------------------------------------------------------
# Scheduler: container options for training (shm_size, ipc_mode, ulimits)
# ---------------------------------------------------------------------------


def _ulimits(host_config: dict[str, Any]) -> list[tuple[str, int, int]]:
    """HostConfig.Ulimits as (name, soft, hard); Podman names them RLIMIT_NOFILE and so on."""
    found = [
        (u["Name"].lower().removeprefix("rlimit_"), u["Soft"], u["Hard"]) for u in host_config["Ulimits"]
    ]
    return sorted(found)


PROBE = "df -k /dev/shm | tail -n 1; ulimit -n; ulimit -Hn; ulimit -u; ulimit -s"
# Podman sets nofile and nproc itself, above what this sandbox lets a container raise, unless named.
ULIMITS = ["nofile=1024:2048", "nproc=1024:2048", "stack=67108864"]


@pytest.mark.torchx
@pytest.mark.engine
def test_container_options_reach_docker_and_the_container(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    scheduler = make()
    memory = specs.Resource(cpu=-1, gpu=0, memMB=128)
    cfg = {"shm_size": "256m", "ipc_mode": "shareable", "ulimits": ULIMITS}
    app_id = submit(scheduler, role("r", PROBE, resource=memory), **cfg)
    host = client.api.inspect_container(f"{app_id}-r-0")["HostConfig"]
    assert (host["ShmSize"], host["IpcMode"], host["Memory"]) == (256 * 2**20, "shareable", 128 * 2**20)
    assert _ulimits(host) == [("nofile", 1024, 2048), ("nproc", 1024, 2048), ("stack", 67108864, 67108864)]
    wait_for(scheduler, app_id)
    shm, soft, hard, nproc, stack = list(scheduler.log_iter(app_id, "r"))
    assert shm.split()[1] == "262144" and shm.split()[-1] == "/dev/shm"
    assert (soft, hard, nproc, stack) == ("1024\n", "2048\n", "1024\n", "65536\n")
    kwargs = scheduler.describe_native(app_id).request.containers[0].kwargs
    assert (kwargs["shm_size"], kwargs["ipc_mode"]) == ("256m", "shareable")
    assert kwargs["ulimits"] == [
        docker.types.Ulimit(name="nofile", soft=1024, hard=2048),
        docker.types.Ulimit(name="nproc", soft=1024, hard=2048),
        docker.types.Ulimit(name="stack", soft=67108864, hard=67108864),
    ]
    assert isinstance(kwargs["ulimits"][0], docker.types.Ulimit)

    # Unset, torchx's own behaviour stays: /dev/shm follows memMB.
    plain = submit(scheduler, role("r", PROBE, resource=memory))
    host = client.api.inspect_container(f"{plain}-r-0")["HostConfig"]
    assert (host["ShmSize"], bool(host["Ulimits"])) == (128 * 2**20, False)
    assert host["IpcMode"] in ("private", "shareable")  # the engine's default: dockerd's, Podman's


@pytest.mark.parametrize(
    "option, value, example",
    [
        ("shm_size", "lots", "shm_size=256m"),
        ("shm_size", "0", "shm_size=256m"),
        ("ipc_mode", "sideways", "ipc_mode=host"),
        ("ulimits", ["nofile=abc"], "nofile=1024:2048"),
        ("ulimits", ["nofile=1024:2048", "bogus=1"], "nofile=1024:2048"),
        ("ulimits", ["nofile=2048:1024"], "nofile=1024:2048"),
    ],
)
@pytest.mark.torchx
def test_bad_container_options_are_value_errors_before_anything_is_created(
    make: Callable[..., PersistentDockerScheduler],
    client: docker.DockerClient,
    option: str,
    value: Any,
    example: str,
) -> None:
    scheduler = make()
    with pytest.raises(ValueError) as raised:
        submit(scheduler, role("r", "true"), **{option: value})
    shown = value if isinstance(value, str) else value[-1]
    assert option in str(raised.value) and repr(shown) in str(raised.value)
    assert example in str(raised.value)
    assert_nothing_created(client, scheduler)


@pytest.mark.torchx
@pytest.mark.engine
def test_readme_training_example_runs_from_a_copied_file(
    client: docker.DockerClient, image: str, tmp_path: Path
) -> None:
    session = f"train-{uuid.uuid4().hex[:8]}"
    shutil.copy(ROOT / "docker_scheduler.py", tmp_path / "docker_scheduler.py")
    code = _doc_block("python", 1, "docs/training.md").replace('"training"', repr(session))
    (tmp_path / "train.py").write_text(code)
    env = state_env(tmp_path / "state")
    try:
        run = subprocess.run(
            [sys.executable, "train.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        assert [line.split(",")[0] for line in lines[::3]] == ["node 0 of 2", "node 1 of 2"]
        assert all(line.endswith("-train-0") for line in lines[::3])
        assert [line.split()[1] for line in lines[1::3]] == ["1048576"] * 2
        assert lines[2::3] == ["1024"] * 2
    finally:
        remove_session_containers(client, session)


@pytest.mark.torchx
def test_readme_cli_options_string_reaches_the_container(
    client: docker.DockerClient, image: str, tmp_path: Path
) -> None:
    words = _doc_command("ulimits=")
    env = state_env(tmp_path / "state")
    run = _torchx(*words[1:], cwd=tmp_path, env=env)
    handle = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    app_id = handle.rsplit("/", 1)[-1]
    try:
        assert run.returncode == 0, run.stderr
        host = client.api.inspect_container(f"{app_id}-sh-0")["HostConfig"]
        assert (host["ShmSize"], host["IpcMode"]) == (256 * 2**20, "shareable")
        assert _ulimits(host) == [
            ("nofile", 1024, 2048),
            ("nproc", 1024, 2048),
            ("stack", 67108864, 67108864),
        ]
        out = run.stderr.splitlines()
        assert any(x.startswith("sh/0 shm") and " 262144 " in x for x in out), run.stderr
        assert [x for x in out if x in ("sh/0 1024", "sh/0 2048", "sh/0 65536")] == [
            "sh/0 1024",
            "sh/0 2048",
            "sh/0 65536",
        ]
    finally:
        remove_app_containers(client, app_id)


# ---------------------------------------------------------------------------
# Scheduler: close, detach and garbage collection
# ---------------------------------------------------------------------------


@pytest.mark.engine
def test_close_stops_harvests_and_removes_this_instances_containers(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    scheduler = make()
    running = submit(scheduler, role("r", "echo started; " + LONG))
    finished = submit(scheduler, role("r", "echo done"))
    wait_for(scheduler, running, (AppState.RUNNING,))
    wait_exited(client, finished)
    bystander = make(session=scheduler.session_name, detach=True)
    other = submit(bystander, role("r", LONG))
    scheduler.close()
    scheduler.close()  # idempotent
    assert container_names(client, running) == [] and container_names(client, finished) == []
    assert len(container_names(client, other)) == 1
    fresh = make(session=scheduler.session_name)
    assert fresh.describe(running).state == AppState.CANCELLED
    assert fresh.describe(finished).state == AppState.SUCCEEDED
    assert list(fresh.log_iter(running, "r")) == ["started\n"]
    assert list(fresh.log_iter(finished, "r")) == ["done\n"]
    assert fresh.describe(other).state == AppState.RUNNING


def test_detached_close_leaves_apps_running(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    scheduler = make(detach=True)
    app_id = start_long(scheduler)
    scheduler.close()
    assert make(session=scheduler.session_name).describe(app_id).state == AppState.RUNNING
    assert len(container_names(client, app_id)) == 1


def test_garbage_collection_and_interpreter_exit_never_stop_apps(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient, state_dir: str
) -> None:
    session = make().session_name
    app_id = run_python(
        f"""
        import gc, json
        from torchx import specs
        from docker_scheduler import PersistentDockerScheduler
        s = PersistentDockerScheduler({session!r})
        role = specs.Role("r", image={IMAGE!r}, entrypoint="sh", args=["-c", {LONG!r}])
        app = specs.AppDef("gc", roles=[role])
        app_id = s.submit(app, {{"image_pull": "missing"}})
        del s
        gc.collect()
        print(json.dumps(app_id))
        """,
        state_dir,
    )
    scheduler = make(session=session)
    assert wait_for(scheduler, app_id, (AppState.RUNNING,)).state == AppState.RUNNING


def test_close_never_raises_when_docker_went_away(make: Callable[..., PersistentDockerScheduler]) -> None:
    scheduler = make()
    app_id = submit(scheduler, role("r", LONG))
    scheduler._docker._client = docker.DockerClient(
        base_url="unix:///nonexistent/docker.sock", version="1.41"
    )
    scheduler.close()
    assert make(session=scheduler.session_name).describe(app_id).state == AppState.RUNNING


# ---------------------------------------------------------------------------
# Factory and the torchx CLI
# ---------------------------------------------------------------------------


@pytest.mark.pure
@pytest.mark.torchx
def test_create_scheduler_passes_state_dir_and_detach(tmp_path: Path) -> None:
    scheduler = create_scheduler("f", state_dir=str(tmp_path / "s"), detach=False, unrelated=1)
    assert isinstance(scheduler, PersistentDockerScheduler)
    assert (scheduler.state_dir, scheduler.detach) == (str(tmp_path / "s"), False)
    assert create_scheduler("f", state_dir=str(tmp_path / "s")).detach is True


DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def _doc_block(kind: str, index: int, doc: str = "README.md") -> str:
    """The ``index``-th (from 1) fenced block of ``kind`` (``python``, ``sh``) in ``doc``."""
    blocks = re.findall(rf"^```{kind}\n(.*?)^```", (ROOT / doc).read_text(), re.S | re.M)
    return blocks[index - 1]


def _anchors(doc: Path) -> set[str]:
    """GitHub's anchors for the headings of ``doc``."""
    headings = re.findall(r"^#+ (.*)$", re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.pure
def test_every_relative_link_in_the_readme_and_docs_resolves() -> None:
    checked = 0
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", (ROOT / doc).read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, fragment = target.partition("#")
            resolved = (ROOT / doc).parent / path if path else ROOT / doc
            assert resolved.exists(), f"{doc}: {target} leads nowhere"
            if fragment:
                assert fragment in _anchors(resolved), f"{doc}: no heading for #{fragment} in {resolved.name}"
            checked += 1
    assert checked >= 10  # the README links to each file under docs/


@pytest.mark.parametrize(
    "index, session, expected",
    [
        (1, "demo", ["SUCCEEDED", "hello"]),  # a Runner, from a copied file
        (2, "demo", ["SUCCEEDED", "hello"]),  # the scheduler directly
        (3, "smoke", None),  # the pytest smoke check
        (1, "torchx", ["[]"]),  # prune, on an empty session
    ],
    ids=["runner", "direct", "pytest-smoke-check", "prune"],
)
@pytest.mark.torchx
def test_readme_python_blocks_run_each_on_its_own(
    index: int,
    session: str,
    expected: list[str] | None,
    client: docker.DockerClient,
    image: str,
    tmp_path: Path,
) -> None:
    unique = f"readme-{uuid.uuid4().hex[:8]}"  # so that clean-up touches this test's containers only
    doc = "docs/state.md" if session == "torchx" else "README.md"
    code = _doc_block("python", index, doc).replace(f'"{session}"', repr(unique))
    shutil.copy(ROOT / "docker_scheduler.py", tmp_path / "docker_scheduler.py")
    (tmp_path / "test_block.py").write_text(code)
    env = state_env(tmp_path / "state")
    command = (
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", "test_block.py"]
        if expected is None
        else ["test_block.py"]
    )
    try:
        run = subprocess.run(
            [sys.executable, *command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stdout + run.stderr
        lines = run.stdout.split()
        if expected is None:
            assert "1 passed" in run.stdout
        else:
            assert lines == expected
    finally:
        remove_session_containers(client, unique)


def test_readme_quick_start_commands_run_back_to_back(
    client: docker.DockerClient, image: str, tmp_path: Path
) -> None:
    """The two Quick start commands, as written, in one shell, in a copy of the checkout; the second's
    pytest only collects (PYTEST_ADDOPTS), since this suite is what it would run."""
    if TORCHX_MAIN or is_podman(client):
        pytest.skip(
            "the Quick start makes its own venv with torchx 0.7 from PyPI and talks to dockerd, whatever "
            "this leg runs: the torchx 0.7 leg on dockerd runs it (a minute of installs, once)"
        )
    clone = copy_package(tmp_path / "clone", "test_docker_scheduler.py")
    script = f"set -e\ncd {shlex.quote(str(clone))}\n{_doc_block('sh', 1)}{_doc_block('sh', 2)}"
    env = state_env(tmp_path / "state")
    env["PYTEST_ADDOPTS"] = "--collect-only -q -p no:cacheprovider"
    env["TMPDIR"] = str(tmp_path)  # where the command's `mktemp -d` makes its empty workspace
    images = {i.id for i in client.images.list()}
    run = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=900)
    handles = re.findall(r"local_docker_persistent://torchx/[\w.-]+", run.stdout)
    try:
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "echo/0 hello" in run.stderr and handles, run.stderr[-3000:]
        assert re.search(r"^\d+/\d+ tests collected \(\d+ deselected\)", run.stdout, re.M), run.stdout[-2000:]
    finally:
        for handle in handles:
            app_id = handle.rsplit("/", 1)[-1]
            for c in labelled(client, LABEL_APP_ID, app_id):
                built = c.attrs["Image"]
                c.remove(force=True)
                if built not in images:  # the workspace image this run built, unless it was there before
                    with contextlib.suppress(DockerException):
                        client.images.remove(built)


PODMAN_SOCKET = "/run/podman/podman.sock"
PODMAN_DROP_IN = Path("/etc/containers/containers.conf.d/50-no-default-ulimits.conf")


def test_readme_rootful_podman_lines_run_as_written(tmp_path: Path) -> None:
    needs_system("starting Podman's service and writing under /etc/containers")
    if os.getuid() != 0 or not shutil.which("podman"):
        if CI:
            pytest.fail("CI=true and no root or no podman: .ci/run installs podman and runs as root")
        pytest.skip("runs Podman rootful, as the README's Engines section does: needs root and podman")
    made = [p for p in (PODMAN_DROP_IN, Path("/run/podman")) if not p.exists()]
    script = "set -e\n" + _doc_block("sh", 3, "docs/engines.md") + _doc_block("sh", 1, "docs/engines.md")
    script += "for _ in $(seq 120); do docker version >/dev/null 2>&1 && break; sleep 0.5; done\necho ready\n"
    # The service runs in the background of this shell's process group, which the test ends.
    service = subprocess.Popen(
        ["bash", "-c", script + "sleep 600"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=default_signals,
    )
    session = f"podman-{uuid.uuid4().hex[:8]}"
    podman: docker.DockerClient | None = None
    try:
        assert service.stdout is not None and service.stdout.readline().strip() == "ready"
        podman = docker.DockerClient(base_url=f"unix://{PODMAN_SOCKET}")
        assert is_podman(podman)
        provision_busybox(podman)
        env = {"DOCKER_HOST": f"unix://{PODMAN_SOCKET}"}
        seen = run_python(
            f"""
            import json
            from torchx import specs
            from docker_scheduler import PersistentDockerScheduler
            s = PersistentDockerScheduler({session!r})
            r = specs.Role("r", image={IMAGE!r}, entrypoint="sh", args=["-c", "ulimit -n; echo podman"])
            app_id = s.submit(specs.AppDef("p", roles=[r]), {{"image_pull": "missing"}})
            desc = s.wait(app_id, timeout=60)
            print(json.dumps([desc.state.name, list(s.log_iter(app_id, "r"))[-1]]))
            """,
            str(tmp_path / "state"),
            env,
        )
        assert seen == ["SUCCEEDED", "podman\n"]
    finally:
        if podman is not None:
            remove_session_containers(podman, session)
            podman.close()
        os.killpg(service.pid, signal.SIGTERM)
        service.wait(timeout=60)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(PODMAN_SOCKET)
        for path in made:
            with contextlib.suppress(OSError):
                path.unlink() if path.is_file() else path.rmdir()


def _torchx(*args: str, cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("torchx")
    return subprocess.run(
        [str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


# -- registration, as a user who installs the package gets it

TORCHX_MAIN = importlib.util.find_spec("torchx.plugins") is not None


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """Environments for torchx: the package as a built wheel (its directory first on PYTHONPATH,
    so it hides the checkout's editable install), and torchx as it is without the package."""
    root = tmp_path_factory.mktemp("package")
    source = copy_package(root / "source")
    pip = [sys.executable, "-m", "pip", "-q"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "-w", str(root), str(source)], capture_output=True, text=True
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = root.glob("*.whl")
    site = root / "site"
    done = subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    # Without the package: on torchx 0.7 a distribution of the same name without entry points, found
    # first, hides the editable install's; torchx main is asked for no plugins at all.
    bare = root / "bare" / "docker_scheduler-0.0.0.dist-info"
    bare.mkdir(parents=True)
    (bare / "METADATA").write_text("Metadata-Version: 2.1\nName: docker_scheduler\nVersion: 0.0.0\n")
    without = {"TORCHX_PLUGINS_SOURCE": "0"} if TORCHX_MAIN else {"PYTHONPATH": str(bare.parent)}
    return {"with": {**os.environ, "PYTHONPATH": str(site)}, "without": {**os.environ, **without}}


REGISTRATION = """
import json, docker_scheduler
from importlib import metadata
from torchx.schedulers import get_default_scheduler_name, get_scheduler_factories
entry_points = {ep.name: ep.value for ep in metadata.distribution("docker_scheduler").entry_points}
try:
    from torchx import plugins
    errors = [str(e) for e in plugins.registry().load_errors()]
except ImportError:
    errors = []
print(json.dumps({"names": list(get_scheduler_factories()), "default": get_default_scheduler_name(),
                  "entry_points": entry_points, "errors": errors, "module": docker_scheduler.__file__}))
"""


def _registration(env: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    run = subprocess.run(
        [sys.executable, "-c", REGISTRATION], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.mark.torchx
def test_installing_adds_one_scheduler_and_leaves_torchx_as_it_was(
    installed: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    from torchx.schedulers import DEFAULT_SCHEDULER_MODULES

    before, after = (_registration(installed[k], tmp_path) for k in ("without", "with"))
    assert before["names"] == list(DEFAULT_SCHEDULER_MODULES) and before["default"] == "local_docker"
    assert after["module"].startswith(installed["with"]["PYTHONPATH"])  # the wheel, not the checkout
    assert after["errors"] == []
    if TORCHX_MAIN:  # registered in torchx_plugins.schedulers; torchx main lists plugins first
        assert after["names"] == ["local_docker_persistent", *before["names"]]
        assert after["default"] == "local_docker_persistent" and after["entry_points"] == {}
    else:  # torchx's own schedulers registered again, in its order, beside ours
        assert after["names"] == [*before["names"], "local_docker_persistent"]
        assert after["default"] == "local_docker"
        assert after["entry_points"] == {
            **{name: f"{module}:create_scheduler" for name, module in DEFAULT_SCHEDULER_MODULES.items()},
            "local_docker_persistent": "docker_scheduler:create_scheduler",
        }


@pytest.mark.torchx
def test_torchx_cli_with_no_scheduler_works_as_it_did(
    installed: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    dryrun = _torchx(
        "run", "--dryrun", "--workspace", "", "utils.echo", "--msg", "hi", cwd=tmp_path, env=installed["with"]
    )
    assert dryrun.returncode == 0, dryrun.stderr
    shown = {k: _torchx("runopts", cwd=tmp_path, env=env) for k, env in installed.items()}
    assert shown["with"].returncode == shown["without"].returncode
    headers = {k: re.findall(r"^(\w+):", run.stdout, re.M) for k, run in shown.items()}
    added = ["local_docker_persistent"] if "local_docker_persistent" in headers["with"] else []
    if TORCHX_MAIN:
        assert headers["with"] == [*added, *headers["without"]] and added
    else:  # torchx 0.7 itself stops at a scheduler whose extra is not installed, before ours
        assert headers["with"] == [*headers["without"], *added]
    assert "No module named 'torchx.schedulers" not in shown["with"].stdout + shown["with"].stderr


@pytest.mark.skipif(not TORCHX_MAIN, reason="torchx 0.7 has no plugin namespace; it reads entry points only")
@pytest.mark.torchx
def test_torchx_main_finds_it_in_the_plugin_namespace_alone(
    installed: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    seen = _registration({**installed["with"], "TORCHX_PLUGINS_SOURCE": "1"}, tmp_path)
    assert "local_docker_persistent" in seen["names"] and seen["errors"] == []
    state = str(tmp_path / "state")
    code = "from torchx.schedulers import get_scheduler_factories as f\n"
    code += f"print(type(f()['local_docker_persistent']('s', state_dir={state!r})).__name__)"
    env = {**installed["with"], "TORCHX_PLUGINS_SOURCE": "1"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert run.stdout.strip() == "PersistentDockerScheduler", run.stderr


@pytest.mark.skipif(
    not TORCHX_MAIN, reason="torchx 0.7 has no plugin namespace: the README says why a Runner is the way"
)
@pytest.mark.torchx
def test_readme_plugin_module_registers_a_copied_file(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "torchx_plugins" / "schedulers").mkdir(parents=True)
    shutil.copy(ROOT / "docker_scheduler.py", project / "docker_scheduler.py")
    module = _doc_block("python", 4)
    (project / "torchx_plugins" / "schedulers" / "local_docker_persistent.py").write_text(module)
    code = textwrap.dedent(
        f"""
        import json, docker_scheduler
        from torchx.schedulers import get_scheduler_factories
        factory = get_scheduler_factories()["local_docker_persistent"]
        scheduler = factory("s", state_dir={str(tmp_path / "s")!r})
        print(json.dumps([type(scheduler).__name__, docker_scheduler.__file__]))
        """
    )
    # -S: no .pth files, so the checkout's editable install is not on the path; the copy is.
    path = os.pathsep.join([str(project), sysconfig.get_paths()["purelib"]])
    env = {**os.environ, "PYTHONPATH": path, "TORCHX_PLUGINS_SOURCE": "1"}
    run = subprocess.run(
        [sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == ["PersistentDockerScheduler", str(project / "docker_scheduler.py")]
    # The `torchx` command as a console script runs it: -P, no current directory on the path. As the
    # README says, `PYTHONPATH=.` from the project's root is what puts the copy there.
    cli = [sys.executable, "-S", "-P", "-c", "from torchx.cli.main import main; main()", "run", "--dryrun"]
    cli += ["--workspace", "", "-s", "local_docker_persistent", "utils.echo", "--msg", "hi"]
    purelib = sysconfig.get_paths()["purelib"]
    for pythonpath, works in ((f".{os.pathsep}{purelib}", True), (purelib, False)):
        env = state_env(tmp_path / "s", PYTHONPATH=pythonpath)
        done = subprocess.run(cli, env=env, capture_output=True, text=True, cwd=project)
        assert (done.returncode == 0) is works, done.stderr
        assert works or "invalid choice: 'local_docker_persistent'" in done.stderr


@pytest.mark.torchx
def test_cli_run_status_log_list_cancel(client: docker.DockerClient, image: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    # A file of its own makes the workspace image this run builds its own, so removing it removes
    # no image a user built from the same content.
    (work / f"only-this-run-{uuid.uuid4().hex}").write_text("")
    env = state_env(tmp_path / "state")
    handles: list[str] = []
    try:
        run = _torchx(
            "run",
            "-s",
            "local_docker_persistent",
            "utils.echo",
            "--image",
            "busybox",
            "--msg",
            "hello",
            cwd=work,
            env=env,
        )
        assert run.returncode == 0, run.stderr
        handle = run.stdout.strip().splitlines()[-1]
        handles.append(handle)
        assert handle.startswith("local_docker_persistent://torchx/echo-")
        assert "echo/0 hello" in run.stderr and "job finished: succeeded" in run.stderr.lower()
        status = _torchx("status", handle, cwd=work, env=env)
        assert "State: SUCCEEDED" in status.stdout, status.stderr
        logs = _torchx("log", handle, cwd=work, env=env)
        assert "echo/0 hello" in logs.stdout + logs.stderr
        listed = _torchx("list", "-s", "local_docker_persistent", cwd=work, env=env)
        assert handle in listed.stdout

        # The CLI waits on local_* schedulers; interrupting it must leave the app running.
        exe = Path(sys.executable).with_name("torchx")
        waiting = subprocess.Popen(
            [
                str(exe),
                "run",
                "--workspace",
                "",
                "-s",
                "local_docker_persistent",
                "utils.sh",
                "--image",
                "busybox",
                "sh",
                "-c",
                LONG,
            ],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_signals,  # the SIGINT below must reach it, however pytest was started
        )
        assert waiting.stdout is not None
        long_handle = waiting.stdout.readline().strip()
        assert long_handle.startswith("local_docker_persistent://"), waiting.communicate(timeout=60)
        handles.append(long_handle)
        wait_until(
            lambda: "State: RUNNING" in _torchx("status", long_handle, cwd=work, env=env).stdout,
            "the app to run",
            interval=0.3,
        )
        waiting.send_signal(signal.SIGINT)
        waiting.communicate(timeout=60)
        assert "State: RUNNING" in _torchx("status", long_handle, cwd=work, env=env).stdout
        cancel = _torchx("cancel", long_handle, cwd=work, env=env)
        assert cancel.returncode == 0, cancel.stderr
        assert "State: CANCELLED" in _torchx("status", long_handle, cwd=work, env=env).stdout
    finally:
        built = set()
        for handle in handles:
            app_id = handle.rsplit("/", 1)[-1]
            for c in labelled(client, LABEL_APP_ID, app_id):
                if c.attrs["Config"]["Image"].startswith("sha256:"):
                    built.add(c.attrs["Config"]["Image"])
                c.remove(force=True)
        for image_id in built:  # the workspace image torchx built for this run
            with contextlib.suppress(NotFound):
                client.images.remove(image_id, force=True)


@pytest.mark.torchx
@pytest.mark.smoke
def test_cli_log_and_status_of_a_mistyped_id_end_at_once_naming_it(
    client: docker.DockerClient, tmp_path: Path
) -> None:
    """torchx 0.7's `torchx log` waits for as long as describe() says None; torchx main's ends with
    a warning and exit 0. Both end at once here, naming the id, the session and the state dir."""
    state = tmp_path / "state"
    env = state_env(state)
    handle = "local_docker_persistent://torchx/echo-mistyped0000"
    for command in (["log", handle], ["log", f"{handle}/echo"], ["status", handle]):
        started = time.monotonic()
        done = _torchx(*command, cwd=tmp_path, env=env, timeout=30)
        said = done.stdout + done.stderr
        assert time.monotonic() - started < 5, said  # ends within 5 s; a hang would meet the 30 s timeout
        assert f"session torchx in {state} has no app echo-mistyped0000" in said, said
        if command[0] == "status" or not TORCHX_MAIN:  # torchx main's `log` exits 0 on its own
            assert done.returncode != 0, said


@pytest.mark.torchx
def test_cli_a_cfg_value_not_of_its_type_names_the_option(
    client: docker.DockerClient, tmp_path: Path
) -> None:
    """torchx casts ``-cfg`` values itself and lets ``int('abc')`` out bare; the option is named instead,
    in torchx's own error, and nothing is created."""
    env = state_env(tmp_path / "state")
    run = _torchx(
        "run", "--workspace", "", "-s", "local_docker_persistent",
        "-cfg", "stop_timeout=abc,ulimits=nofile:8", "utils.echo", "--msg", "hi", cwd=tmp_path, env=env,
    )  # fmt: skip
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    named = "`stop_timeout`" if not TORCHX_MAIN else "stop_timeout, must be of type: int, but was: abc"
    assert named in run.stderr, run.stderr
    assert not (tmp_path / "state" / "torchx.pickle").exists()


@pytest.mark.torchx
def test_delete_an_app_the_cli_ran(client: docker.DockerClient, image: str, tmp_path: Path) -> None:
    """`torchx delete` on torchx main; on torchx 0.7, whose CLI has none, the factory's delete()."""
    env = state_env(tmp_path / "state")
    run = _torchx(
        "run", "--workspace", "", "-s", "local_docker_persistent", "-cfg", "image_pull=missing",
        "utils.echo", "--image", "busybox", "--msg", "bye", cwd=tmp_path, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    handle = run.stdout.strip().splitlines()[-1]
    app_id = handle.rsplit("/", 1)[-1]
    try:
        if hasattr(Scheduler, "delete"):
            deleted = _torchx("delete", handle, cwd=tmp_path, env=env)
            assert deleted.returncode == 0, deleted.stderr
        else:
            run_python(
                f"""
                from docker_scheduler import create_scheduler
                create_scheduler("torchx").delete({app_id!r})
                print("null")
                """,
                env["DOCKER_SCHEDULER_STATE_DIR"],
            )
        assert container_names(client, app_id) == []
        assert "State:" not in _torchx("status", handle, cwd=tmp_path, env=env).stdout
        assert handle not in _torchx("list", "-s", "local_docker_persistent", cwd=tmp_path, env=env).stdout
    finally:
        remove_app_containers(client, app_id)


@pytest.mark.torchx
def test_runopts_show_every_option_with_its_help(tmp_path: Path) -> None:
    shown = _torchx("runopts", "local_docker_persistent", cwd=tmp_path, env=dict(os.environ))
    assert shown.returncode == 0, shown.stderr
    for name, words in [
        ("copy_env", "glob patterns"),
        ("env", "environment variables"),
        ("privileged", "elevated permissions"),
        ("image_pull", "when to pull each role's image"),
        ("remove_on_exit", "remove each container once"),
        ("shm_size", "size of /dev/shm"),
        ("ipc_mode", "ipc namespace"),
        ("ulimits", "resource limits"),
        ("stop_timeout", "between sigterm and sigkill"),
        ("image_repo", "image repository"),
        ("quiet", "suppress verbose"),
    ]:
        found = re.search(rf"^\s+{name}=\S+ \(.*\)\n(.*)$", shown.stdout, re.M)
        assert found and words in found.group(1).lower(), (name, shown.stdout)


@pytest.mark.torchx
@pytest.mark.engine
def test_every_run_option_reaches_the_containers(
    make: Callable[..., PersistentDockerScheduler],
    client: docker.DockerClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DS_COPIED_1", "one")
    scheduler = make()
    app = specs.AppDef("opts", roles=[role("r", "env | sort", env={"ROLE_VAR": "r"})])
    cfg = {"image_pull": "never", "copy_env": ["DS_COPIED_*"], "env": {"CFG_VAR": "c"}}
    # This sandbox refuses to start privileged containers: the request shows the option arrived.
    assert (
        scheduler.submit_dryrun(app, {**cfg, "privileged": True}).request.containers[0].kwargs["privileged"]
    )
    app_id = scheduler.schedule(scheduler.submit_dryrun(app, cfg))
    assert client.api.inspect_container(f"{app_id}-r-0")["HostConfig"]["Privileged"] is False
    wait_for(scheduler, app_id)
    out = "".join(scheduler.log_iter(app_id, "r"))
    assert {"DS_COPIED_1=one", "CFG_VAR=c", "ROLE_VAR=r"} <= set(out.split())
    desc = scheduler.describe(app_id)
    assert desc.roles[0].env == {"ROLE_VAR": "r"}  # the role as submitted, on every torchx
    removing = submit(scheduler, role("r", "true"), remove_on_exit=True)
    wait_for(scheduler, removing)
    assert container_names(client, removing) == []
    with pytest.raises(ValueError, match="image_pull='sometimes'"):
        submit(scheduler, role("r", "true"), image_pull="sometimes")


def _doc_command(*words: str) -> list[str]:
    """The first `torchx run ...` line of the README or docs/ holding ``words``, split like a shell would."""
    lines = [line for doc in DOCS for line in (ROOT / doc).read_text().splitlines()]
    return shlex.split(next(x for x in lines if x.startswith("torchx run ") and all(w in x for w in words)))


@pytest.mark.pure
@pytest.mark.parametrize("scheduler", ["kubernetes", "slurm"])
@pytest.mark.torchx
def test_the_readme_appdef_dry_runs_on_cluster_schedulers(scheduler: str) -> None:
    from torchx.runner import get_runner

    words = _doc_command(f"-s {scheduler} ")
    cfg_at = words.index("-cfg")
    component, args = words[cfg_at + 2], words[cfg_at + 3 :]
    with get_runner() as runner:
        cfg = dict(runner.scheduler_run_opts(scheduler).cfg_from_str(words[cfg_at + 1]))
        if scheduler == "kubernetes":
            cfg["validate_spec"] = False  # torchx main asks the cluster to validate; there is none here
        info = runner.dryrun_component(component, args, scheduler=scheduler, cfg=cfg)
    assert component == "utils.echo" and args[args.index("--msg") + 1] == "hello"
    if scheduler == "kubernetes":
        container = info.request.resource["spec"]["tasks"][0]["template"].spec.containers[0]
        assert container.image == args[args.index("--image") + 1]
        assert container.command == ["echo", "hello"]
        assert info.request.resource["spec"]["queue"] == "default"
    else:  # slurm runs no container: the image only fills ${img_root}
        (replica,) = info.request.replicas.values()
        assert (replica.entrypoint, replica.args) == ("echo", ["hello"])
        assert replica.sbatch_opts["partition"] == "gpu"


# ---------------------------------------------------------------------------
# Reliability and security: concurrency, crashes, corruption, Docker faults, bad input
# ---------------------------------------------------------------------------

WRITER = """
import json, sys
from torchx import specs
from docker_scheduler import PersistentDockerScheduler
session, count = sys.argv[1], int(sys.argv[2])
s = PersistentDockerScheduler(session, detach=True)
app = specs.AppDef("w", roles=[specs.Role("r", image="busybox:latest", entrypoint="true")])
for _ in range(count):
    print(s.submit(app, {"image_pull": "missing"}), flush=True)
"""


def start_writer(session: str, count: int, state_dir: str) -> subprocess.Popen[str]:
    """A process that schedules ``count`` apps into ``session``, printing each id once schedule() returned."""
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, session, str(count)],
        cwd=ROOT,
        env=state_env(state_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_concurrent_writers_lose_no_app(
    make: Callable[..., PersistentDockerScheduler], state_dir: str
) -> None:
    session = make().session_name
    procs = [start_writer(session, 10, state_dir) for _ in range(8)]
    scheduled = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        scheduled += out.split()
    assert len(set(scheduled)) == 80
    seen = run_python(
        f"""
        import json
        from docker_scheduler import PersistentDockerScheduler
        s = PersistentDockerScheduler({session!r})
        print(json.dumps({{a: s.describe(a).roles[0].name for a in {scheduled!r}}}))
        """,
        state_dir,
    )
    assert seen == {app_id: "r" for app_id in scheduled}
    assert set(scheduled) <= {a.app_id for a in make(session=session).list()}


# Schedules two apps, then pauses the third's session write at one step of the atomic replace, says
# which, and waits there to be killed.
KILLED_WRITER = """
import os, sys, time
import docker_scheduler as ds
from torchx import specs
session, seam = sys.argv[1], sys.argv[2]
s = ds.PersistentDockerScheduler(session, detach=True)
app = specs.AppDef("w", roles=[specs.Role("r", image="busybox:latest", entrypoint="true")])
for _ in range(2):
    print(s.submit(app, {"image_pull": "missing"}), flush=True)
def pause(*_):
    print(seam, flush=True)
    time.sleep(600)
real = ds._Dir.replace
if seam == "written":  # the temporary file whole, not yet on disk for sure, not in place
    ds.os.fsync = pause
elif seam == "synced":  # on disk, not in place
    ds._Dir.replace = pause
else:  # in place, the lock still held, nothing started
    ds._Dir.replace = lambda *args: (real(*args), pause())
s.submit(app, {"image_pull": "missing"})
"""


@pytest.mark.parametrize("seam", ["written", "synced", "replaced"])
def test_sigkill_while_scheduling_never_corrupts_the_file(
    seam: str, make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient, state_dir: str
) -> None:
    """A writer killed at each step of the session file's replace: the file always loads, holds every
    app whose schedule() returned, and the third app only once its record was in place."""
    session = make().session_name
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, session, seam],
        cwd=ROOT,
        env=state_env(state_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    returned = [proc.stdout.readline().strip() for _ in range(2)]
    assert proc.stdout.readline().strip() == seam, proc.communicate(timeout=60)
    proc.kill()
    proc.communicate(timeout=60)
    temps = [p for p in Path(state_dir).iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == (0 if seam == "replaced" else 1)  # the killed write's, if it was not in place
    fresh = make(session=session)
    listed = {a.app_id: a.state for a in fresh.list()}
    assert set(returned) <= set(listed) and len(listed) == (3 if seam == "replaced" else 2)
    if seam == "replaced":  # recorded, then killed before its container was made: it never ran
        (third,) = set(listed) - set(returned)
        desc = fresh.describe(third)
        assert desc.state == AppState.FAILED and "was never created" in desc.msg
        assert labelled(client, LABEL_APP_ID, third) == []
    assert not [p for p in Path(state_dir).iterdir() if ".corrupt-" in p.name]
    submit(fresh, role("r", "true"))  # the next write sweeps the killed writer's temporary file
    assert not [p for p in Path(state_dir).iterdir() if p.name.endswith(".tmp")]


CORRUPTIONS: dict[str, bytes] = {
    "empty": b"",
    "truncated": pickle.dumps({"format": 1, "session": "x", "apps": {"a": {"replicas": []}}})[:20],
    "random": bytes(range(256)) * 4,
    "wrong_shape": pickle.dumps(["a", "list", "not", "a", "session"]),
    "unknown_version": pickle.dumps({"format": 99, "session": "x", "apps": {}}),
}


RECORD_DAMAGES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "replica-not-a-dict": lambda plain: {**plain, "replicas": [1]},
    "no-roles": lambda plain: {k: v for k, v in plain.items() if k != "roles"},
    "bad-flag": lambda plain: {**plain, "cancelled": "yes"},
    "bad-log-status": lambda plain: {**plain, "replicas": [{**plain["replicas"][0], "logs": "somewhere"}]},
    "wrong-id": lambda plain: {**plain, "app_id": "another-app"},
    "not-a-dict": lambda plain: ["not", "a", "record"],
}


@pytest.mark.pure
@pytest.mark.parametrize("bad", [*sorted(CORRUPTIONS), *RECORD_DAMAGES])
def test_a_corrupt_session_file_or_record_is_moved_aside_and_the_session_rebuilt(
    bad: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ended = _record(exit_code=0, logs="recorded")
    good, adopted = (dataclasses.replace(ended, app_id=app_id) for app_id in ("good-1", "adopted-1"))
    if bad in CORRUPTIONS:
        data = CORRUPTIONS[bad]
    else:
        data = _session_file("s", {good.app_id: RECORD_DAMAGES[bad](docker_scheduler._to_dict(good))})
    path = tmp_path / "s.pickle"
    path.write_bytes(data)
    path.chmod(0o600)
    with docker_scheduler._open_private_dir(str(tmp_path)) as held:
        store = docker_scheduler._SessionStore(held, "s", lambda: {adopted.app_id: adopted})
        with caplog.at_level(logging.WARNING, logger="docker_scheduler"):
            assert store.get(good.app_id) is None
        assert store.get(adopted.app_id) == adopted
    (aside,) = tmp_path.glob("s.pickle.corrupt-*")
    assert aside.read_bytes() == data and str(path) in caplog.text and str(aside) in caplog.text
    assert recorded_in(tmp_path, "s") == {adopted.app_id: adopted}  # the rebuilt file reads back whole


def test_corrupt_session_file_is_moved_aside_and_rebuilt_from_containers(
    make: Callable[..., PersistentDockerScheduler],
    client: docker.DockerClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scheduler = make(detach=True)
    running = submit(scheduler, role("r", LONG), role("s", LONG))
    finished = submit(scheduler, role("r", "echo fine"))
    wait_for(scheduler, running, (AppState.RUNNING,))
    wait_exited(client, finished)
    bad = CORRUPTIONS["random"]
    Path(scheduler.session_file).write_bytes(bad)
    fresh = make(session=scheduler.session_name)
    with caplog.at_level(logging.WARNING, logger="docker_scheduler"):
        desc = fresh.describe(running)
    aside = [p for p in Path(fresh.state_dir).iterdir() if ".pickle.corrupt-" in p.name]
    assert len(aside) == 1 and aside[0].read_bytes() == bad
    assert fresh.session_file in caplog.text and str(aside[0]) in caplog.text
    assert desc.state == AppState.RUNNING and {r.name for r in desc.roles} == {"r", "s"}
    assert fresh.describe(finished).state == AppState.SUCCEEDED
    assert list(fresh.log_iter(finished, "r")) == ["fine\n"]
    fresh.cancel(running)
    assert make(session=scheduler.session_name).describe(running).state == AppState.CANCELLED
    assert {a.app_id for a in fresh.list()} == {running, finished}


@pytest.mark.parametrize(
    "what", ["file_group_writable", "file_other_owner", "dir_world_writable", "dir_other_owner"]
)
def test_state_others_could_write_is_refused(
    what: str, make: Callable[..., PersistentDockerScheduler]
) -> None:
    if os.getuid() != 0 and what.endswith("owner"):
        pytest.skip("changing a file's owner needs root")
    scheduler = make()
    app_id = submit(scheduler, role("r", "true"))
    wait_for(scheduler, app_id)
    target = scheduler.state_dir if what.startswith("dir") else scheduler.session_file
    if what.endswith("owner"):
        os.chown(target, 65534, 65534)
        fix = f"chown {os.getuid()} {target}"
    else:
        os.chmod(target, os.stat(target).st_mode | (0o020 if what.startswith("file") else 0o002))
        fix = f"chmod go-w {target}"
    try:
        with pytest.raises(PermissionError) as raised:
            PersistentDockerScheduler(scheduler.session_name, state_dir=scheduler.state_dir).describe(app_id)
        assert target in str(raised.value) and fix in str(raised.value)
    finally:
        os.chown(target, os.getuid(), os.getgid())
        os.chmod(target, 0o700 if what.startswith("dir") else 0o600)


def test_a_state_dir_swapped_for_a_symlink_after_construction_leads_nowhere(
    make: Callable[..., PersistentDockerScheduler], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    scheduler = make(state_dir=str(state))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    state.rename(tmp_path / "held")
    state.symlink_to(elsewhere)  # what another owner of the parent could do
    app_id = submit(scheduler, role("r", "echo hi"))
    assert wait_for(scheduler, app_id).state == AppState.SUCCEEDED
    assert list(elsewhere.iterdir()) == []  # nothing written where the path now leads
    held = tmp_path / "held"
    assert (held / f"{scheduler.session_name}.pickle").is_file()
    assert (held / f"{scheduler.session_name}.logs" / app_id / "r.0.stdout").read_bytes().endswith(b" hi\n")
    assert list(scheduler.log_iter(app_id, "r")) == ["hi\n"]


@pytest.mark.parametrize("what", ["pickle", "lock", "logs"])
def test_a_symlink_where_the_state_dir_keeps_its_own_file_is_refused(
    what: str, make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient, tmp_path: Path
) -> None:
    scheduler = make()
    session = scheduler.session_name
    done = submit(scheduler, role("r", "echo mine"))
    assert wait_for(scheduler, done).state == AppState.SUCCEEDED
    ended = submit(scheduler, role("r", "echo later"))
    wait_exited(client, ended)  # its logs are not harvested yet
    victim = tmp_path / "victim"
    (victim / done).mkdir(parents=True)
    (victim / done / "r.0.stdout").write_text("theirs\n")
    (victim / "target.pickle").write_bytes(pickle.dumps({"format": 3, "session": session, "apps": {}}))
    link = Path(scheduler.state_dir) / f"{session}.{what}"
    link.rename(link.with_name(link.name + ".aside"))
    link.symlink_to(
        victim / ("target.pickle" if what == "pickle" else "target.lock" if what == "lock" else "")
    )
    fresh = PersistentDockerScheduler(session, state_dir=scheduler.state_dir)
    with pytest.raises(PermissionError) as raised:
        if what == "pickle":
            fresh.describe(done)
        elif what == "lock":
            submit(fresh, role("r", "true"))
        else:
            fresh.delete(done)
    assert f"refusing {link}: it is a symbolic link" in str(raised.value)
    assert "Fix: remove it or move it aside" in str(raised.value)
    assert (victim / done / "r.0.stdout").read_text() == "theirs\n"  # nothing followed through it
    assert sorted(p.name for p in victim.iterdir()) == [done, "target.pickle"]  # no lock file made there
    assert container_names(client, done) == [f"{done}-r-0"]
    if what == "lock":  # nothing started either
        found = labelled(client, LABEL_SESSION, session)
        assert sorted(c.name for c in found) == sorted([f"{done}-r-0", f"{ended}-r-0"])
    if what == "logs":  # a harvest through it is refused too: the exit code is recorded, the logs wait
        desc = fresh.describe(ended)
        assert desc.state == AppState.SUCCEEDED and f"logs not recorded yet (refusing {link}" in desc.msg
        assert sorted(p.name for p in victim.iterdir()) == [done, "target.pickle"]
        assert container_names(client, ended) == [f"{ended}-r-0"]


@pytest.mark.pure
def test_parents_others_could_change_are_refused_and_sticky_ones_allowed(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("giving a directory to another owner needs root")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(PermissionError) as raised:
        PersistentDockerScheduler("s", state_dir=str(shared / "state"))
    message = str(raised.value)
    assert (
        f"{shared}, a parent of the state directory {shared / 'state'}, is writable by group or others"
        in message
    )
    assert "Fix: use a state_dir whose parents are owned by you or root" in message
    assert not (shared / "state").exists()  # refused before anything was made
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(
        PermissionError, match=f"{theirs}, a parent of the state directory .* is owned by uid 65534"
    ):
        PersistentDockerScheduler("s", state_dir=str(theirs / "state"))
    shared.chmod(0o1777)  # sticky, as /tmp: others cannot swap what is yours in it
    assert PersistentDockerScheduler("s", state_dir=str(shared / "state")).state_dir == str(shared / "state")
    with pytest.raises(PermissionError) as raised:
        PersistentDockerScheduler("s", state_dir=str(shared))
    assert f"{shared} is a shared directory (mode 1777)" in str(raised.value)
    assert f"use a private directory under it, e.g. state_dir=$(mktemp -d -p {shared})" in str(raised.value)
    assert "chmod" not in str(raised.value)


PAUSED_HARVEST = """
import os, sys, time
import docker_scheduler
from docker_scheduler import PersistentDockerScheduler
real = docker_scheduler._frames

def paused(blocks):  # stops mid-harvest, once a temporary file holds part of the log
    for i, frame in enumerate(real(blocks)):
        yield frame
        if i == 1000:
            print("mid-harvest", flush=True)
            time.sleep(300)

docker_scheduler._frames = paused
session, state_dir, app_id = sys.argv[1:]
PersistentDockerScheduler(session, state_dir=state_dir).describe(app_id)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_temporary_files_of_a_killed_harvest_are_swept_by_the_next_write(
    sig: signal.Signals, make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    scheduler = make()
    lines = "i=0; while [ $i -lt 5000 ]; do echo line-$i; i=$((i+1)); done"
    app_id = submit(scheduler, role("r", lines))
    wait_exited(client, app_id)
    state = Path(scheduler.state_dir)
    harvester = subprocess.Popen(
        [sys.executable, "-c", PAUSED_HARVEST, scheduler.session_name, str(state), app_id],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=default_signals,
    )
    try:
        assert harvester.stdout is not None and harvester.stdout.readline() == "mid-harvest\n"
        temps = sorted(p.name for p in state.glob(".*.tmp"))
        assert len(temps) == 2  # stdout and stderr, on their way
        submit(scheduler, role("r", "true"))  # a write while the harvester lives leaves its files alone
        assert sorted(p.name for p in state.glob(".*.tmp")) == temps
    finally:
        harvester.send_signal(sig)
        harvester.wait(timeout=30)
    assert sorted(p.name for p in state.glob(".*.tmp")) == temps  # a killed writer cleans nothing up
    desc = scheduler.describe(app_id)  # the next write: this process's harvest
    assert desc.state == AppState.SUCCEEDED and "logs not recorded" not in desc.msg
    assert list(state.glob(".*.tmp")) == []
    logs = list(scheduler.log_iter(app_id, "r"))
    assert len(logs) == 5000 and logs[-1] == "line-4999\n"


@pytest.mark.engine
def test_a_removal_already_in_progress_counts_as_removed(
    make: Callable[..., PersistentDockerScheduler],
    client: docker.DockerClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Eight deletes of one app side by side, round after round, until the engine has answered one
    the way it answers a race: dockerd "removal ... already in progress" (409), Podman, which removes
    one at a time, "no such container" (404). Each round ends with the app gone and no error."""
    race = 404 if is_podman(client) else 409
    scheduler = make()
    api = scheduler._docker_client.api
    remove, answers = api.remove_container, []

    def watched(*args: Any, **kwargs: Any) -> Any:  # the daemon's own answers, counted on the way
        try:
            return remove(*args, **kwargs)
        except docker.errors.APIError as e:
            answers.append(e.status_code)
            raise

    monkeypatch.setattr(api, "remove_container", watched)
    for _ in range(20):
        app_id = submit(scheduler, role("r", "true", replicas=4))
        wait_exited(client, app_id)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(scheduler.delete, [app_id] * 8))
        assert container_names(client, app_id) == [] and scheduler.describe(app_id) is None
        if race in answers:
            return
    pytest.fail(f"no removal raced another in 20 rounds (the engine answered {sorted(set(answers))})")


@pytest.mark.engine
def test_env_values_never_reach_describe_msg(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    scheduler = make()
    secret = "s3cret-token-value"
    # A NUL in a value: Docker creates the container, then fails to start it, echoing the entry as Go
    # quotes it. The value holds a quote, a newline and a long tail too: none of it may show.
    token = f'pre"{secret}\nmore\\{"t" * 3000}\x00'
    app = specs.AppDef("leak", roles=[role("r", "true", env={"TOKEN": token, "OTHER": secret})])
    with pytest.raises(RuntimeError) as raised:
        scheduler.submit(app, CFG)
    (app_id,) = [a.app_id for a in scheduler.list()]
    desc = scheduler.describe(app_id)
    recorded = make(session=scheduler.session_name).describe(app_id).msg  # as the record holds it
    assert desc.state == AppState.FAILED
    for shown in (str(raised.value), desc.msg, recorded):
        assert "TOKEN=***" in shown and "s3cret" not in shown and "more" not in shown and "ttt" not in shown
    assert container_names(client, app_id) == []


SECOND_USER = """
import json, sys
from torchx import specs
from docker_scheduler import PersistentDockerScheduler
session, state_dir, network = sys.argv[1:]
s = PersistentDockerScheduler(session, state_dir=state_dir)
second = specs.Role("r", image="busybox:latest", entrypoint="echo", args=["second"])
app = specs.AppDef("second", roles=[second])
app_id = s.submit(app, {"image_pull": "missing"})
state = s.wait(app_id, timeout=60).state.name
s._docker.ensure_network(network)  # a network nobody made yet: through torchx's lock, root's file
print(json.dumps([app_id, state, list(s.log_iter(app_id, "r"))]))
"""


@pytest.fixture
def second_user(client: docker.DockerClient, tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """A real second local user in the ``docker`` group, a directory of theirs, and the command that
    runs this interpreter as them (read-only bind mounts lend them it and its packages)."""
    needs_system("adding a local user and bind-mounting this interpreter")
    if os.getuid() != 0 or not shutil.which("useradd") or not shutil.which("runuser"):
        if CI:
            pytest.fail("CI=true and a second user cannot be made: run as root with useradd and runuser")
        pytest.skip("making a second local user needs root, useradd and runuser")
    if is_podman(client):
        pytest.skip("the second user reaches dockerd's socket through the docker group; Podman's is root's")
    name = f"ds{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "-M", "-G", "docker", "-d", "/nonexistent", name], check=True)
    base = Path(tempfile.mkdtemp(prefix="docker-scheduler-second-", dir="/tmp"))
    mounts: list[Path] = []
    try:
        base.chmod(0o755)
        lent = {"python": Path(sys.base_prefix), "site": Path(sysconfig.get_paths()["purelib"])}
        for where, source in lent.items():
            (base / where).mkdir()
            subprocess.run(["mount", "--bind", str(source), str(base / where)], check=True)
            mounts.append(base / where)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(base / where)], check=True)
        (base / "pkg").mkdir()
        shutil.copy(ROOT / "docker_scheduler.py", base / "pkg")
        home = base / "home"
        home.mkdir(mode=0o700)
        shutil.chown(home, name, name)
        python = base / "python" / "bin" / Path(sys.executable).resolve().name
        env = [
            f"PYTHONPATH={base / 'pkg'}:{base / 'site'}",
            f"LD_LIBRARY_PATH={base / 'python' / 'lib'}",
            f"HOME={home}",
            "PATH=/usr/bin:/bin",
        ]
        yield name, home, ["runuser", "-u", name, "--", "env", "-i", *env, str(python)]
    finally:
        for mount in reversed(mounts):
            subprocess.run(["umount", str(mount)], check=False)
        shutil.rmtree(base, ignore_errors=True)
        subprocess.run(["userdel", name], check=False)


def test_a_second_local_user_submits_after_root_and_cannot_swap_roots_state(
    second_user: tuple[str, Path, list[str]],
    make: Callable[..., PersistentDockerScheduler],
    client: docker.DockerClient,
) -> None:
    name, home, run_as = second_user
    lock = Path(tempfile.gettempdir()) / "torchx_docker_network_lock"
    made_lock = not lock.exists()
    if made_lock:  # as torchx leaves it after root's first run
        lock.touch(mode=0o644)
    session, network = f"second-{uuid.uuid4().hex[:8]}", f"docker-scheduler-test-{uuid.uuid4().hex[:8]}"
    try:
        assert lock.stat().st_uid == 0 and stat.S_IMODE(lock.stat().st_mode) == 0o644
        root_app = submit(make(), role("r", "echo root"))  # root runs first
        done = subprocess.run(
            [*run_as, "-c", SECOND_USER, session, str(home / "state"), network],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stderr
        app_id, state, logs = json.loads(done.stdout.strip().splitlines()[-1])
        assert state == "SUCCEEDED" and logs == ["second\n"]
        assert container_names(client, app_id) == [f"{app_id}-r-0"]
        assert [n.name for n in client.networks.list(names=[network])] == [network]
        assert (home / "state").stat().st_uid == pwd.getpwnam(name).pw_uid
        # Root refuses a state directory under one the second user owns: they could swap it.
        with pytest.raises(PermissionError, match=f"{home}, a parent of the state directory"):
            PersistentDockerScheduler("s", state_dir=str(home / "state" / "root"))
        assert not (home / "state" / "root").exists()
        wait_exited(client, root_app)
    finally:
        remove_session_containers(client, session)
        for net in client.networks.list(names=[network]):
            if net.name == network:
                net.remove()
        if made_lock:
            lock.unlink()


@pytest.mark.parametrize("endpoint", ["unix:///nonexistent/docker.sock", "tcp://127.0.0.1:9"])
def test_docker_unreachable_fails_clearly_and_records_stay_readable(
    endpoint: str, make: Callable[..., PersistentDockerScheduler]
) -> None:
    scheduler = make()
    done = submit(scheduler, role("r", "echo kept; exit 5"))
    running = submit(scheduler, role("r", LONG))
    wait_for(scheduler, done)
    wait_for(scheduler, running, (AppState.RUNNING,))
    seen = run_python(
        f"""
        import json
        from torchx import specs
        from docker_scheduler import DockerUnavailableError, PersistentDockerScheduler
        s = PersistentDockerScheduler({scheduler.session_name!r})  # creating it needs no daemon
        errors = []
        app = specs.AppDef("x", roles=[specs.Role("r", image="busybox", entrypoint="true")])
        for call in (lambda: s.submit(app, {{}}), lambda: s.cancel({running!r})):
            try:
                call()
                errors.append(None)
            except DockerUnavailableError as e:
                errors.append(str(e))
        d = s.describe({done!r})
        print(json.dumps([errors, d.state.name, d.msg, list(s.log_iter({done!r}, "r"))]))
        """,
        scheduler.state_dir,
        env={"DOCKER_HOST": endpoint},
    )
    errors, state, msg, logs = seen
    assert all(e and endpoint in e and "start it" in e for e in errors), errors
    assert (state, logs) == ("FAILED", ["kept\n"]) and "code 5" in msg
    assert scheduler.describe(running).state == AppState.RUNNING  # the failed cancel recorded nothing


DOCKERD = "unix:///var/run/docker.sock"


@pytest.mark.engine
def test_an_app_belongs_to_the_engine_that_ran_it(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    """Scheduled on dockerd, then listed, described, waited on and cancelled through Podman (CI's
    Podman leg runs both engines), and back on dockerd reconciled as usual."""
    podman_host = os.environ.get("DOCKER_HOST", "")
    if not (is_podman(client) and podman_host != DOCKERD):
        pytest.skip(
            "needs two engines: runs where DOCKER_HOST is Podman's and dockerd answers too (the Podman leg)"
        )
    dockerd = docker.DockerClient(base_url=DOCKERD)
    try:
        dockerd.ping()
    except DockerException as e:
        if CI:
            pytest.fail(f"CI=true and dockerd does not answer at {DOCKERD} beside Podman: {e}")
        pytest.skip(f"dockerd does not answer at {DOCKERD} beside Podman: {e}")
    provision_busybox(dockerd)
    scheduler = make()
    script = textwrap.dedent(
        f"""
        import json, sys
        from torchx import specs
        from docker_scheduler import PersistentDockerScheduler
        s = PersistentDockerScheduler({scheduler.session_name!r})
        """
    )
    app_id = run_python(
        script
        + textwrap.dedent(
            f"""
        r = specs.Role("r", image={IMAGE!r}, entrypoint="sh", args=["-c", {LONG!r}])
        print(json.dumps(s.submit(specs.AppDef("engines", roles=[r]), {{"image_pull": "missing"}})))
        """
        ),
        scheduler.state_dir,
        env={"DOCKER_HOST": DOCKERD},
    )
    try:
        desc = scheduler.describe(app_id)  # through Podman
        assert desc.state == AppState.SUBMITTED and f"runs on the Docker engine at {DOCKERD}" in desc.msg
        assert f"this scheduler talks to the one at {podman_host}" in desc.msg
        assert [(a.app_id, a.state) for a in scheduler.list()] == [(app_id, AppState.SUBMITTED)]
        for call in (scheduler.cancel, scheduler.delete, lambda a: scheduler.wait(a, 5)):
            with pytest.raises(
                docker_scheduler.OtherEngineError, match=f"set DOCKER_HOST={DOCKERD} to reach it"
            ):
                call(app_id)
        assert len(dockerd.containers.list(filters={"label": f"{LABEL_APP_ID}={app_id}"})) == 1
        # The session file lost, and rebuilt from labels by a process on dockerd: the rebuilt record
        # belongs to dockerd, so from Podman it is still never recorded ended.
        Path(scheduler.session_file).write_bytes(b"lost")
        rebuilt = script + f"print(json.dumps(s.describe({app_id!r}).state.name))"
        assert run_python(rebuilt, scheduler.state_dir, env={"DOCKER_HOST": DOCKERD}) == "RUNNING"
        desc = scheduler.describe(app_id)
        assert desc.state == AppState.UNKNOWN and f"runs on the Docker engine at {DOCKERD}" in desc.msg
        back = run_python(
            script
            + textwrap.dedent(
                f"""
                before = s.describe({app_id!r}).state.name
                s.cancel({app_id!r})
                print(json.dumps([before, s.describe({app_id!r}).state.name]))
                """
            ),
            scheduler.state_dir,
            env={"DOCKER_HOST": DOCKERD},
        )
        assert back == ["RUNNING", "CANCELLED"]
    finally:
        for c in labelled(dockerd, LABEL_APP_ID, app_id):
            c.remove(force=True)
        dockerd.close()


LIFECYCLE = """
import json, sys
from torchx import specs
from docker_scheduler import PersistentDockerScheduler
s = PersistentDockerScheduler(sys.argv[1])
step, app_id = sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None
if step == "submit":
    r = specs.Role("r", image="busybox:latest", entrypoint="sh", args=["-c", sys.argv[4]])
    print(json.dumps(s.submit(specs.AppDef("far", roles=[r]), {"image_pull": "missing", "stop_timeout": 0})))
elif step == "describe":
    d = s.describe(app_id)
    print(json.dumps([d.state.name, d.msg]))
elif step == "cancel":
    s.cancel(app_id)
    print(json.dumps(s.describe(app_id).state.name))
"""


def lifecycle(session: str, state_dir: str, env: dict[str, str | None], *args: str) -> Any:
    """One step of an app's life in a new process with ``env`` (None values unset)."""
    return run_python(LIFECYCLE, state_dir, env, (session, *args))


@pytest.mark.engine
def test_an_app_scheduled_through_a_docker_context_belongs_to_that_context(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient, tmp_path: Path
) -> None:
    """A context made by the docker CLI at Podman: the record names the context, and a process
    without it, talking to dockerd, never reconciles the app and says which context reaches it."""
    podman_host = os.environ.get("DOCKER_HOST", "")
    if not (is_podman(client) and podman_host != DOCKERD) or shutil.which("docker") is None:
        pytest.skip(
            "needs two engines and the docker CLI: runs where DOCKER_HOST is Podman's (the Podman leg)"
        )
    config = tmp_path / "docker-config"  # the CLI's config, and so its contexts, kept in the test's directory
    cli = {**os.environ, "DOCKER_CONFIG": str(config)}
    cli.pop("DOCKER_HOST")
    context = f"ds-{uuid.uuid4().hex[:6]}"
    for command in (
        ["context", "create", context, "--docker", f"host={podman_host}"],
        ["context", "use", context],
    ):
        subprocess.run(["docker", *command], env=cli, check=True, capture_output=True, timeout=30)
    scheduler = make()
    session, state_dir = scheduler.session_name, scheduler.state_dir
    through_context = {"DOCKER_HOST": None, "DOCKER_CONFIG": str(config)}
    on_dockerd = {"DOCKER_HOST": DOCKERD, "DOCKER_CONFIG": str(tmp_path / "no-config")}
    app_id = lifecycle(session, state_dir, through_context, "submit", "", LONG)
    try:
        wait_until(
            lambda: lifecycle(session, state_dir, through_context, "describe", app_id)[0] == "RUNNING",
            "RUNNING",
        )
        record = recorded(scheduler)[app_id]
        assert (record.engine_endpoint, record.engine_context) == (podman_host, context)
        state, msg = lifecycle(session, state_dir, on_dockerd, "describe", app_id)
        print(f"through {context}: RUNNING; from dockerd: {state}: {msg}")  # shown by -s, quoted in docs
        # Not FAILED: its running state is not recorded, and from here it cannot be seen.
        assert state == "UNKNOWN" and f"set DOCKER_CONTEXT={context} to reach it" in msg
        assert f"runs on the Docker engine at {podman_host} (Docker context {context!r})" in msg
        assert not recorded(scheduler)[app_id].settled  # nothing recorded from dockerd
        assert lifecycle(session, state_dir, through_context, "cancel", app_id) == "CANCELLED"
    finally:
        remove_app_containers(client, app_id)


def docker_cli_env(monkeypatch: pytest.MonkeyPatch, config: Path, context: str | None = None) -> None:
    """This process's environment as a Docker CLI user's whose config is ``config``, without DOCKER_HOST."""
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    if context:
        monkeypatch.setenv("DOCKER_CONTEXT", context)


def write_context(config: Path, name: str, meta: bytes) -> Path:
    """A context's meta.json where the Docker CLI keeps it under ``config``."""
    path = config / "contexts" / "meta" / hashlib.sha256(name.encode()).hexdigest() / "meta.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(meta)
    return path


def test_contexts_are_read_where_the_docker_cli_reads_them_and_their_errors_name_the_file(
    make: Callable[..., PersistentDockerScheduler],
    client: docker.DockerClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scheduler = make()
    running = start_long(scheduler)
    # A context in ./contexts of a directory the user is in chooses nothing: no config.json says so.
    monkeypatch.chdir(tmp_path)
    write_context(tmp_path, "here", json.dumps({"Endpoints": {"docker": {"Host": DOCKERD}}}).encode())
    docker_cli_env(monkeypatch, tmp_path / "no-config", "here")
    with pytest.raises(DockerUnavailableError, match="DOCKER_CONTEXT=here names no Docker context"):
        submit(make(session=scheduler.session_name), role("r", "true"))
    # config.json's current context, missing: the message says which setting named it.
    config = tmp_path / "config"
    config.mkdir()
    (config / "config.json").write_text(json.dumps({"currentContext": "gone"}))
    docker_cli_env(monkeypatch, config)
    monkeypatch.delenv("DOCKER_CONTEXT")
    with pytest.raises(
        DockerUnavailableError, match=f"currentContext 'gone' in {config}/config.json names no"
    ):
        submit(make(session=scheduler.session_name), role("r", "true"))
    # Its meta.json malformed: list() falls back to the session file, describe() says what to fix.
    (config / "config.json").write_text(json.dumps({"currentContext": "broken"}))
    meta = write_context(config, "broken", b"{")
    broken = make(session=scheduler.session_name)
    with caplog.at_level(logging.WARNING, logger="docker_scheduler"):
        assert [a.app_id for a in broken.list()] == [running]
    assert f"listing from the session file only: cannot read {meta}" in caplog.text
    with pytest.raises(DockerUnavailableError, match=f"cannot read {meta}, a Docker CLI file .*fix it"):
        broken.describe(running)
    assert container_names(client, running) == [f"{running}-r-0"]


@pytest.fixture
def tls_engine(tmp_path: Path, client: docker.DockerClient) -> Iterator[tuple[str, Path, list[int]]]:
    """dockerd behind TLS on 127.0.0.1: a proxy with a self-signed certificate for 127.0.0.1 in front
    of its socket. Yields its URL, the certificate, and a list that grows with each TLS handshake."""
    if os.environ.get("DOCKER_HOST", DOCKERD) != DOCKERD:
        pytest.skip(f"runs where the engine is dockerd at {DOCKERD} (CI's first leg)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = "req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1"
    subprocess.run(["openssl", *made.split(), "-keyout", key, "-out", cert], check=True, capture_output=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server = socket.create_server(("127.0.0.1", 0))
    handshakes: list[int] = []

    def pump(conn: socket.socket) -> None:
        with conn, socket.socket(socket.AF_UNIX) as engine:
            try:
                secure = tls.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):
                return  # not TLS: refused, as a TLS engine refuses it
            handshakes.append(1)
            engine.connect(DOCKERD.removeprefix("unix://"))
            with contextlib.suppress(OSError):
                while True:
                    ready = [secure] if secure.pending() else select.select([secure, engine], [], [], 60)[0]
                    for source in ready:
                        data = source.recv(1 << 16)
                        if not data:
                            return
                        (engine if source is secure else secure).sendall(data)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                threading.Thread(target=pump, args=(server.accept()[0],), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield f"tcp://127.0.0.1:{server.getsockname()[1]}", cert, handshakes
    server.close()


def test_a_tls_context_is_spoken_to_as_the_docker_cli_speaks_to_it(
    make: Callable[..., PersistentDockerScheduler],
    tls_engine: tuple[str, Path, list[int]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Contexts made by the docker CLI: one that skips verifying (TLS all the same), one with a CA."""
    if shutil.which("docker") is None:
        if CI:
            pytest.fail("CI=true and no docker CLI: apt-get install docker.io")
        pytest.skip("needs the docker CLI to make the contexts")
    url, cert, handshakes = tls_engine
    config = tmp_path / "docker-config"
    for name, options in (("skip", "skip-tls-verify=true"), ("verified", f"ca={cert}")):
        made = [
            "docker",
            "--config",
            str(config),
            "context",
            "create",
            name,
            "--docker",
            f"host={url},{options}",
        ]
        subprocess.run(made, check=True, capture_output=True, timeout=30)
        cli = ["docker", "--config", str(config), "--context", name, "version"]
        assert subprocess.run(cli, capture_output=True, timeout=30).returncode == 0  # the CLI gets there
        docker_cli_env(monkeypatch, config, name)
        before = len(handshakes)
        scheduler = make()
        app_id = submit(scheduler, role("r", "echo over tls"))
        assert scheduler.wait(app_id, timeout=60).state == AppState.SUCCEEDED
        assert list(scheduler.log_iter(app_id, "r")) == ["over tls\n"]
        assert recorded(scheduler)[app_id].engine_endpoint == url and len(handshakes) > before


@contextlib.contextmanager
def ssh_engine(d: Path) -> Iterator[dict[str, str]]:
    """A real sshd on 127.0.0.1 that lets root in with a key made in ``d``, and the environment in
    which this machine's engine is ``ssh://root@ds-test:<port>``: an ``ssh`` on PATH that is the
    system's, given ``d``'s config. The sshd is ended, and what was made outside ``d`` removed, on
    the way out."""
    (d / "bin").mkdir(parents=True)
    for key in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    shutil.copy(d / "client.pub", d / "authorized_keys")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n"
    )
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {(d / 'host.pub').read_text()}")
    (d / "ssh_config").write_text(
        f"Host ds-test\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {d / 'client'}\n"
        f"  IdentitiesOnly yes\n  UserKnownHostsFile {d / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
    )
    wrapper = d / "bin" / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {d / "ssh_config"} "$@"\n')
    wrapper.chmod(0o755)
    made_run_dir = not os.path.exists("/run/sshd")  # sshd's privilege separation directory
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    server = subprocess.Popen(
        [shutil.which("sshd") or "sshd", "-D", "-E", str(d / "sshd.log"), "-f", str(d / "sshd_config")],
        preexec_fn=default_signals,
    )
    # docker-py passes ssh a port of its own (22 unless the URL names one), so the URL names it.
    env = {"PATH": f"{d / 'bin'}:{os.environ['PATH']}", "DOCKER_HOST": f"ssh://root@ds-test:{port}"}
    try:
        answers = ["ssh", "ds-test", "docker", "version", "--format", "{{.Server.Version}}"]
        wait_until(
            lambda: subprocess.run(answers, env={**os.environ, **env}, capture_output=True).returncode == 0,
            "sshd to let the key in",
            timeout=30,
        )
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)
        if made_run_dir:
            shutil.rmtree("/run/sshd", ignore_errors=True)


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[dict[str, str]]:
    """:py:func:`ssh_engine` in the test's own directory."""
    needs_system("running sshd")
    if os.getuid() != 0 or shutil.which("sshd") is None or shutil.which("ssh") is None:
        if CI:
            pytest.fail("CI=true and no root, sshd or ssh: .ci/run installs openssh-server and runs as root")
        pytest.skip("runs a real sshd on 127.0.0.1 as root: needs root and openssh-server")
    with ssh_engine(tmp_path / "ssh") as env:
        yield env


def test_the_whole_lifecycle_works_over_ssh(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient, sshd: dict[str, str]
) -> None:
    """DOCKER_HOST=ssh://... through the system's ssh: submit, describe, wait (events), log_iter live
    and harvested, cancel and delete, and the record names the ssh endpoint."""
    if is_podman(client):
        pytest.skip("the sshd here reaches dockerd (`docker system dial-stdio`): the dockerd legs run it")
    scheduler = make()
    code = f"""
        import json
        from torchx import specs
        from docker_scheduler import PersistentDockerScheduler
        s = PersistentDockerScheduler({scheduler.session_name!r})
        def app(script):
            r = specs.Role("r", image={IMAGE!r}, entrypoint="sh", args=["-c", script])
            return s.submit(specs.AppDef("far", roles=[r]), {{"image_pull": "missing"}})
        ended = app("echo out; sleep 0.3; echo err >&2; exit 3")  # apart, so their stamps keep the order
        done = s.wait(ended, timeout=60)
        running = app("echo started; {LONG}")
        live = next(iter(s.log_iter(running, "r", should_tail=True)))
        state = s.describe(running).state.name
        s.cancel(running)
        seen = [done.state.name, done.msg, list(s.log_iter(ended, "r")), live, state]
        seen += [s.describe(running).state.name, s.describe_native(ended).request.app_id == ended]
        s.delete(ended)
        print(json.dumps(seen + [s.describe(ended) is None, ended, running]))
        """
    seen = run_python(code, scheduler.state_dir, env=sshd)
    ended, running = seen[-2:]
    assert seen[:-2] == [
        "FAILED",
        "r/0 exited with code 3",
        ["out\n", "err\n"],
        "started\n",
        "RUNNING",
        "CANCELLED",
        True,
        True,
    ]
    assert container_names(client, ended) == []
    assert recorded(scheduler)[running].engine_endpoint == sshd["DOCKER_HOST"]


def ssh_processes_of(pid: int) -> list[int]:
    """The live ``ssh`` children of process ``pid``."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
            with contextlib.suppress(OSError):
                stat_ = Path(f"/proc/{child}/stat").read_text()
                if stat_.split(" (")[1].startswith("ssh)") and stat_.rsplit(") ", 1)[1][0] != "Z":
                    found.append(int(child))
    return found


def test_over_ssh_a_scheduler_makes_one_connection_and_one_more_once_it_drops(
    make: Callable[..., PersistentDockerScheduler],
    client: docker.DockerClient,
    sshd: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Submit, describe, list and wait, here and in a second short-lived process, each ride one ssh
    connection; after sshd drops it, the next describe connects again, says so once, and reads right.
    Connections are counted in sshd's own log; close ends the master, and its directory goes. The
    temporary directory's path here is too long for a socket's, so the master's goes under /tmp."""
    if is_podman(client):
        pytest.skip("the sshd here reaches dockerd (`docker system dial-stdio`): the dockerd legs run it")
    for key, value in sshd.items():
        monkeypatch.setenv(key, value)
    log_file, sshd_pid = tmp_path / "ssh" / "sshd.log", int((tmp_path / "ssh" / "sshd.pid").read_text())
    accepted = lambda: log_file.read_text().count("Accepted publickey")  # noqa: E731
    masters = lambda: set(Path("/tmp").glob("docker-scheduler-ssh-*"))  # noqa: E731
    long_tmp = tmp_path / ("t" * 60)  # too long for the master's socket path: it goes under /tmp
    long_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_tmp))
    before, dirs = accepted(), masters()
    scheduler = make()
    running = submit(scheduler, role("r", LONG, replicas=3))
    ended = submit(scheduler, role("r", "sleep 0.5; exit 3", replicas=2))
    assert scheduler.describe(running).state in (AppState.SUBMITTED, AppState.RUNNING)
    assert {a.app_id for a in scheduler.list()} == {running, ended}
    assert scheduler.wait(ended, timeout=60).state == AppState.FAILED
    assert list(scheduler.log_iter(running, "r", 2)) == []
    assert accepted() - before == 1 and len(masters() - dirs) == 1 and not any(long_tmp.iterdir())
    code = f"""
        import json
        from docker_scheduler import PersistentDockerScheduler
        s = PersistentDockerScheduler({scheduler.session_name!r})
        print(json.dumps([s.describe({running!r}).state.name, len(s.list())]))
        """
    assert run_python(code, scheduler.state_dir) == ["RUNNING", 2]
    assert accepted() - before == 2
    for child in Path(f"/proc/{sshd_pid}/task/{sshd_pid}/children").read_text().split():
        os.kill(int(child), signal.SIGKILL)  # sshd's side of every connection: they drop
    wait_until(lambda: not ssh_processes_of(os.getpid()), "the dropped connection's ssh processes to end")
    with caplog.at_level(logging.INFO, logger="docker_scheduler"):
        assert scheduler.describe(running).state == AppState.RUNNING
        scheduler.cancel(running)
    assert scheduler.describe(running).state == AppState.CANCELLED
    assert [r.getMessage() for r in caplog.records if "ssh" in r.getMessage()] == [
        f"the ssh connection to {sshd['DOCKER_HOST'].removeprefix('ssh://')} was lost: connecting again"
    ]
    assert accepted() - before == 3
    scheduler.close()
    assert masters() == dirs and not ssh_processes_of(os.getpid())


def has_nvidia_runtime(client: docker.DockerClient) -> bool:
    """Whether the engine reports an NVIDIA runtime (`docker info`), which GPU containers need."""
    info = client.info()
    return "nvidia" in (info.get("Runtimes") or {}) or info.get("DefaultRuntime") == "nvidia"


def gpu_app(gpus: int, image: str = IMAGE) -> specs.AppDef:
    resource = specs.Resource(cpu=1, gpu=gpus, memMB=256)
    role = specs.Role("r", image=image, entrypoint="sh", args=["-c", "nvidia-smi -L"], resource=resource)
    return specs.AppDef("gpu", roles=[role])


@pytest.mark.torchx
@pytest.mark.engine
def test_a_gpu_role_is_recorded_as_asked_and_a_host_without_gpus_says_what_it_needs(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    if has_nvidia_runtime(client):
        pytest.skip("the engine has an NVIDIA runtime: test_a_gpu_container_lists_the_gpus_it_asked_for runs")
    scheduler = make()
    info = scheduler.submit_dryrun(gpu_app(2), dict(CFG))
    app_id = info.request.app_id
    if is_podman(client):  # its Docker API takes the request and runs the container without GPUs
        scheduler.schedule(info)
        assert "r/0 exited with code 127" in wait_for(scheduler, app_id).msg  # sh: nvidia-smi: not found
    else:
        with pytest.raises(RuntimeError) as failed:
            scheduler.schedule(info)
        assert 'could not select device driver ""' in str(failed.value)
        assert "asks for 2 GPU(s)" in str(failed.value) and "NVIDIA Container Toolkit" in str(failed.value)
        desc = scheduler.describe(app_id)
        assert desc.state == AppState.FAILED and str(failed.value).split(". Removed")[0] in desc.msg
        assert container_names(client, app_id) == []
    (request,) = scheduler.describe_native(app_id).request.containers[0].kwargs["device_requests"]
    assert isinstance(request, docker.types.DeviceRequest)
    assert (request.count, request.capabilities) == (2, [["compute", "utility"]])


def test_a_gpu_container_lists_the_gpus_it_asked_for(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    """Where the engine has an NVIDIA runtime: a role with gpu=N sees N devices (`nvidia-smi -L`).
    The image (DOCKER_SCHEDULER_GPU_IMAGE) must hold a libc for the nvidia-smi the runtime mounts."""
    if not has_nvidia_runtime(client):
        pytest.skip("the engine reports no NVIDIA runtime (`docker info` lists none): no GPU here")
    gpus = int(os.environ.get("DOCKER_SCHEDULER_GPUS", "1"))
    image = os.environ.get("DOCKER_SCHEDULER_GPU_IMAGE", "ubuntu:22.04")
    scheduler = make()
    app_id = scheduler.submit(gpu_app(gpus, image), dict(CFG))
    assert wait_for(scheduler, app_id).state == AppState.SUCCEEDED
    assert len([line for line in scheduler.log_iter(app_id, "r") if line.startswith("GPU ")]) == gpus


def test_every_directory_and_file_it_makes_is_private_whatever_the_umask(
    make: Callable[..., PersistentDockerScheduler], tmp_path: Path
) -> None:
    session = make().session_name  # for the clean-up of this session's containers
    xdg = tmp_path / "home" / ".local" / "state"
    seen = run_python(
        f"""
        import json, os
        os.umask(0)
        from torchx import specs
        from docker_scheduler import PersistentDockerScheduler
        s = PersistentDockerScheduler({session!r})
        app = specs.AppDef("modes", roles=[specs.Role("r", image={IMAGE!r}, entrypoint="echo", args=["hi"])])
        app_id = s.submit(app, {{"image_pull": "missing"}})
        s.wait(app_id, timeout=60)
        print(json.dumps([s.state_dir, app_id]))
        """,
        "",
        env={"DOCKER_SCHEDULER_STATE_DIR": "", "XDG_STATE_HOME": str(xdg)},
    )
    state_dir, app_id = Path(seen[0]), seen[1]
    assert state_dir == xdg / "docker_scheduler"
    made = [tmp_path / "home", tmp_path / "home" / ".local", xdg, state_dir]
    made += [state_dir / f"{session}.logs", state_dir / f"{session}.logs" / app_id]
    assert {str(p): stat.S_IMODE(p.stat().st_mode) for p in made} == {str(p): 0o700 for p in made}
    files = [p for p in state_dir.rglob("*") if p.is_file()]
    logs = state_dir / f"{session}.logs" / app_id
    own = [state_dir / "state_dir.id", state_dir / f"{session}.pickle", state_dir / f"{session}.lock"]
    assert sorted(files) == sorted([*own, logs / ".started", logs / "r.0.stdout", logs / "r.0.stderr"])
    assert {str(p): stat.S_IMODE(p.stat().st_mode) for p in files} == {str(p): 0o600 for p in files}


@pytest.mark.parametrize(
    "labels",
    [
        {"torchx.pytorch.org/role-name": "../../../victim/pwn", "torchx.pytorch.org/replica-id": "0"},
        {"torchx.pytorch.org/role-name": "r", "torchx.pytorch.org/replica-id": "zero"},
    ],
    ids=["role-with-a-path", "replica-not-a-number"],
)
def test_a_container_whose_labels_no_app_could_have_is_ignored(
    labels: dict[str, str],
    make: Callable[..., PersistentDockerScheduler],
    client: docker.DockerClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scheduler = make()
    app_id = f"forged-{uuid.uuid4().hex[:10]}"
    identity = (Path(scheduler.state_dir) / docker_scheduler.IDENTITY_FILE).read_text().strip()
    ours = {LABEL_SESSION: scheduler.session_name, docker_scheduler.LABEL_STATE_DIR: identity}
    forged = {**ours, LABEL_APP_ID: app_id, **labels}
    client.containers.run(IMAGE, ["echo", "forged"], name=f"{app_id}-x-0", labels=forged, detach=True)
    with caplog.at_level(logging.WARNING, logger="docker_scheduler"):
        assert scheduler.list() == [] and scheduler.describe(app_id) is None
        scheduler.cancel(app_id)
        assert scheduler.list() == []
        Path(scheduler.session_file).write_bytes(b"corrupt")  # the rebuild ignores it too
        assert scheduler.list() == []
    said = [r.getMessage() for r in caplog.records if "ignoring container" in r.getMessage()]
    assert len(said) == 1 and f"{app_id}-x-0" in said[0]
    assert not (Path(scheduler.state_dir).parent / "victim").exists()
    assert not (Path(scheduler.state_dir) / f"{scheduler.session_name}.logs").exists()


@pytest.mark.engine
def test_container_killed_behind_the_schedulers_back_reads_failed(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    scheduler = make()
    app_id = start_long(scheduler)
    for name in container_names(client, app_id):
        client.api.kill(name)
    desc = wait_for(scheduler, app_id)
    assert desc.state == AppState.FAILED and "code 137" in desc.msg


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie nobody reaped yet does not."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return not re.search(r"^State:\s*Z", status, re.MULTILINE)


def test_daemon_restart_mid_run_never_reads_succeeded(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    if is_podman(client):
        pytest.skip(
            "restarts dockerd, which a Podman engine does not have: Podman's containers are "
            "supervised by conmon, not by the API service"
        )
    if os.environ.get("DOCKER_SCHEDULER_TEST_RESTART_DAEMON") != "1":
        pytest.skip(
            "restarts dockerd: set DOCKER_SCHEDULER_TEST_RESTART_DAEMON=1 where this run started the "
            "daemon (.ci/run does when it starts it)"
        )
    scheduler = make()
    app_id = start_long(scheduler, replicas=2)
    pid = int(Path("/var/run/docker.pid").read_text())
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not _alive(pid), "dockerd to stop")
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / "docker_scheduler-ci" / "dockerd-restarted.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        subprocess.Popen(argv, stdout=out, stderr=out, start_new_session=True, preexec_fn=default_signals)

    def answers() -> bool:
        with contextlib.suppress(Exception):
            return bool(client.ping())
        return False

    wait_until(answers, f"dockerd to come back (see {log_path})", interval=0.5)
    desc = wait_for(scheduler, app_id)
    assert desc.state == AppState.FAILED
    assert all(r.state == AppState.FAILED for r in desc.roles_statuses[0].replicas)


@pytest.mark.engine
def test_partial_schedule_removes_started_containers_and_records_failed(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    scheduler = make()
    missing = "sha256:" + "0" * 64  # skips the pull: the failure is Docker's create
    app = specs.AppDef(
        "partial",
        roles=[role("ok", LONG, replicas=3), specs.Role("broken", image=missing, entrypoint="true")],
    )
    with pytest.raises(RuntimeError) as raised:
        scheduler.submit(app, CFG)
    assert missing in str(raised.value) and "'broken'" in str(raised.value)
    (app_id,) = [a.app_id for a in scheduler.list()]
    assert container_names(client, app_id) == []
    desc = make(session=scheduler.session_name).describe(app_id)
    assert desc.state == AppState.FAILED and missing in desc.msg


@pytest.mark.parametrize(
    "app, message",
    [
        (specs.AppDef("none", roles=[]), "has no roles"),
        (specs.AppDef("a", roles=[specs.Role("r", image="", entrypoint="true")]), "empty image"),
        (
            specs.AppDef("a", roles=[specs.Role("r", image=IMAGE, entrypoint="true", num_replicas=0)]),
            "num_replicas=0",
        ),
        (
            specs.AppDef("a", roles=[specs.Role("bad name!", image=IMAGE, entrypoint="true")]),
            "cannot be part of a Docker container name",
        ),
        (
            specs.AppDef("a", roles=[specs.Role("r", image=IMAGE, entrypoint="true")] * 2),
            "repeats another role",
        ),
        (specs.AppDef("sp ace", roles=[specs.Role("r", image=IMAGE, entrypoint="true")]), "Docker refuses"),
        (
            specs.AppDef("../../" + "x" * 40, roles=[specs.Role("r", image=IMAGE, entrypoint="true")]),
            "Docker refuses",
        ),
        (
            specs.AppDef("long", roles=[specs.Role("r" * 247, image=IMAGE, entrypoint="true")]),
            "too long to name its replicas' log files",
        ),
        (
            specs.AppDef("many", roles=[specs.Role("r", image=IMAGE, entrypoint="true", num_replicas=257)]),
            "asks for 257 replicas; at most 256",
        ),
        (
            specs.AppDef("n" * 300, roles=[specs.Role("r", image=IMAGE, entrypoint="true")]),
            r"\(300 characters\) is too long: its app id names a directory",
        ),
    ],
)
@pytest.mark.torchx
def test_bad_input_is_a_value_error_before_anything_is_created(
    app: specs.AppDef,
    message: str,
    make: Callable[..., PersistentDockerScheduler],
    client: docker.DockerClient,
) -> None:
    scheduler = make()
    with pytest.raises(ValueError, match=message):
        scheduler.submit(app, CFG)
    assert_nothing_created(client, scheduler)


def test_a_thousand_apps_load_describe_and_list(make: Callable[..., PersistentDockerScheduler]) -> None:
    scheduler = make()
    real = submit(scheduler, role("r", "echo real"))
    wait_for(scheduler, real)
    template = recorded(scheduler)[real]
    with docker_scheduler._open_private_dir(scheduler.state_dir) as held:  # the store's own writes
        store = docker_scheduler._SessionStore(held, scheduler.session_name, dict)
        with store.update() as apps:
            for i in range(999):
                replicas = tuple(dataclasses.replace(rep, exit_code=i % 3) for rep in template.replicas)
                record = dataclasses.replace(template, app_id=f"synthetic-{i:04d}", replicas=replicas)
                apps[record.app_id] = record
    assert os.path.getsize(scheduler.session_file) < 1000 * 1024  # well under 1 KiB an app
    fresh = make(session=scheduler.session_name)
    assert fresh.describe("synthetic-0004").state == AppState.FAILED
    assert fresh.describe("synthetic-0006").state == AppState.SUCCEEDED
    assert list(fresh.log_iter(real, "r")) == ["real\n"]
    listed = {a.app_id: a.state for a in fresh.list()}
    assert len(listed) == 1000 and listed[real] == AppState.SUCCEEDED
    assert sum(s == AppState.FAILED for s in listed.values()) == 666


@pytest.mark.engine
def test_retries_show_restarts_and_fail_only_after_the_last(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    scheduler = make()
    app_id = submit(scheduler, role("r", "echo try; sleep 0.5; exit 1", max_retries=2))
    seen = []

    def ended() -> Any:
        desc = scheduler.describe(app_id)
        seen.append(desc.state)
        return desc if desc.state in TERMINAL else None

    desc = wait_until(ended, "the retried app to end", interval=0.1)
    assert desc.state == AppState.FAILED and desc.num_restarts == 2
    # Between retries it never reads ended; it reads FAILED only once the last retry failed.
    assert set(seen[:-1]) <= {AppState.SUBMITTED, AppState.PENDING, AppState.RUNNING}, seen
    (name,) = container_names(client, app_id)
    assert client.api.inspect_container(name)["RestartCount"] == 2
    assert list(scheduler.log_iter(app_id, "r")) == ["try\n"] * 3


# -- degrade, never break: unreadable logs, full and read-only disks, crashes, pruning


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Mounts a tiny tmpfs as a state directory: a real full (or, remounted, read-only) disk."""
    needs_system("mounting a tmpfs")
    mounted: list[str] = []

    def mount(size: str = "512k") -> str:
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            if CI:
                pytest.fail(f"CI=true and mounting a tmpfs failed: {done.stderr}")
            pytest.skip(f"mounting a tmpfs needs root: {done.stderr.strip()}")
        mounted.append(str(path))
        return str(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", path], check=False)


def remount(path: str, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", path], check=True)


def fill(path: str) -> None:
    """Writes into ``path`` until the disk is full."""
    with contextlib.suppress(OSError), open(os.path.join(path, "filler"), "wb") as f:
        while True:
            f.write(b"x" * 4096)
            f.flush()


@pytest.mark.engine
def test_unreadable_logs_never_break_describe_list_cancel_or_close(
    make: Callable[..., PersistentDockerScheduler],
    client: docker.DockerClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scheduler = make()
    app = specs.AppDef("nolog", roles=[role("r", "echo unseen; exit 3")])
    info = scheduler.submit_dryrun(app, {**CFG, "remove_on_exit": True})
    for c in info.request.containers:  # Docker's `none` driver: logs that cannot be read back
        c.kwargs["log_config"] = docker.types.LogConfig(type="none")
    app_id = scheduler.schedule(info)
    wait_exited(client, app_id)
    with caplog.at_level(logging.WARNING, logger="docker_scheduler"):
        for _ in range(3):
            desc = scheduler.describe(app_id)
            assert desc.state == AppState.FAILED and "r/0 exited with code 3" in desc.msg
            assert "logs not recorded yet (Docker cannot read them back" in desc.msg
        assert [(a.app_id, a.state) for a in scheduler.list()] == [(app_id, AppState.FAILED)]
        scheduler.cancel(app_id)
    warnings = [r.getMessage() for r in caplog.records if "could not record the logs" in r.getMessage()]
    assert len(warnings) == 1 and "logging driver Docker can read" in warnings[0]
    assert container_names(client, app_id) == [f"{app_id}-r-0"]  # kept, even with remove_on_exit
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="docker_scheduler"):
        assert list(scheduler.log_iter(app_id, "r")) == []
    assert "Docker cannot serve the logs" in caplog.text
    scheduler.close()  # it scheduled the app: close keeps the container whose logs are not recorded
    assert container_names(client, app_id) == [f"{app_id}-r-0"]
    assert make(session=scheduler.session_name).describe(app_id).state == AppState.FAILED


def test_a_full_disk_keeps_the_state_and_the_container_until_logs_fit(
    make: Callable[..., PersistentDockerScheduler],
    client: docker.DockerClient,
    small_disk: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    disk = small_disk("512k")
    scheduler = make(state_dir=disk)
    big = "i=0; while [ $i -lt 20000 ]; do echo line-$i-padding-padding-padding; i=$((i+1)); done; exit 3"
    app_id = submit(scheduler, role("r", big), remove_on_exit=True)
    wait_exited(client, app_id)
    with caplog.at_level(logging.WARNING, logger="docker_scheduler"):
        desc = scheduler.describe(app_id)
        assert desc.state == AppState.FAILED and "code 3" in desc.msg and "No space left" in desc.msg
        assert [a.state for a in scheduler.list()] == [AppState.FAILED]
    assert "No space left on device" in caplog.text and "free space there" in caplog.text
    assert [p for p in Path(disk).rglob("*") if p.name.endswith(".tmp")] == []  # no partial copy left
    assert container_names(client, app_id) == [f"{app_id}-r-0"]
    assert make(session=scheduler.session_name, state_dir=disk).describe(app_id).state == AppState.FAILED
    live = list(scheduler.log_iter(app_id, "r"))  # served from Docker while the container is kept
    assert len(live) == 20000 and live[-1] == "line-19999-padding-padding-padding\n"

    remount(disk, "size=16m")  # the cause is gone: the next describe records the logs
    desc = scheduler.describe(app_id)
    assert "logs not recorded" not in desc.msg
    assert container_names(client, app_id) == []  # remove_on_exit, now that they are recorded
    assert list(scheduler.log_iter(app_id, "r")) == live


def test_schedule_on_a_full_or_read_only_disk_starts_nothing(
    make: Callable[..., PersistentDockerScheduler],
    client: docker.DockerClient,
    small_disk: Callable[..., str],
) -> None:
    full = small_disk("64k")
    scheduler = make(state_dir=full)
    fill(full)
    with pytest.raises(OSError, match="No space left") as raised:
        submit(scheduler, role("r", "true"))
    assert full in str(raised.value) and "nothing was started" in str(raised.value)
    readonly = small_disk("512k")
    other = make(state_dir=readonly)
    remount(readonly, "ro")
    with pytest.raises(OSError, match="Read-only file system") as raised:
        submit(other, role("r", "true"))
    assert readonly in str(raised.value) and "nothing was started" in str(raised.value)
    for s in (scheduler, other):
        labelled = {"label": f"{LABEL_SESSION}={s.session_name}"}
        assert client.containers.list(all=True, filters=labelled) == []
    logs = Path(full) / f"{scheduler.session_name}.logs"
    assert not logs.exists() or list(logs.iterdir()) == []  # no half-made app directory either


def test_an_unwritable_state_dir_still_reports_the_exit_code_from_docker(
    make: Callable[..., PersistentDockerScheduler],
    client: docker.DockerClient,
    small_disk: Callable[..., str],
) -> None:
    disk = small_disk("1m")
    scheduler = make(state_dir=disk)
    app_id = start_long(scheduler)
    remount(disk, "ro")
    client.api.kill(f"{app_id}-r-0", signal="SIGTERM")
    wait_exited(client, app_id)
    desc = scheduler.describe(app_id)
    assert desc.state == AppState.FAILED and "r/0 exited with code 143" in desc.msg
    assert [a.state for a in scheduler.list()] == [AppState.FAILED]
    remount(disk, "rw")
    assert scheduler.describe(app_id).state == AppState.FAILED
    assert recorded(scheduler)[app_id].replicas[0].exit_code == 143


CRASHER = """
import os, signal, sys
from torchx import specs
from docker_scheduler import PersistentDockerScheduler
session, when = sys.argv[1], sys.argv[2]
import docker_scheduler
start_all = docker_scheduler._Docker.start_all
def crash(self, containers):
    if when == "slow":  # recorded and holding the start lock: wait for the test's go-ahead
        print("recorded", flush=True)
        sys.stdin.readline()
    if when in ("after", "slow"):
        start_all(self, containers)
    os.kill(os.getpid(), signal.SIGKILL)  # between the record and its update
docker_scheduler._Docker.start_all = crash
app = specs.AppDef("crash", roles=[specs.Role("r", image="busybox:latest", entrypoint="sleep", args=["300"])])
PersistentDockerScheduler(session, detach=True).submit(app, {"image_pull": "missing", "stop_timeout": 0})
"""


def _crash_while_scheduling(scheduler: PersistentDockerScheduler, when: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CRASHER, scheduler.session_name, when],
        cwd=ROOT,
        env=state_env(scheduler.state_dir),
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _only_app(scheduler: PersistentDockerScheduler, timeout: float = 30) -> str:
    wait_until(lambda: recorded(scheduler), "the crashing process to record its app", timeout, 0.05)
    (app_id,) = recorded(scheduler)
    return app_id


def test_a_crash_between_record_and_start_is_reconciled(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    never = make()
    proc = _crash_while_scheduling(never, "before")
    assert proc.wait(timeout=60) == -signal.SIGKILL
    app_id = _only_app(never)
    assert recorded(never)[app_id].starting
    desc = make(session=never.session_name).describe(app_id)
    assert desc.state == AppState.FAILED and "was never created" in desc.msg
    assert container_names(client, app_id) == []

    adopted = make()
    proc = _crash_while_scheduling(adopted, "slow")
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "recorded", proc.stderr
    app_id = _only_app(adopted)
    reader = make(session=adopted.session_name)
    assert reader.describe(app_id).state == AppState.SUBMITTED  # its start is under way: left alone
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    desc = reader.describe(app_id)
    assert desc.state == AppState.RUNNING, desc.msg
    assert not recorded(reader)[app_id].starting
    reader.cancel(app_id)
    assert reader.describe(app_id).state == AppState.CANCELLED


@pytest.mark.parametrize("read", ["describe", "list"])
def test_a_start_that_ends_while_a_reader_lists_is_never_recorded_ended(
    make: Callable[..., PersistentDockerScheduler], read: str
) -> None:
    """The race at its seams: the starter holds its start lock before it creates the containers until
    the reader has listed none; the reader decides only once the start is over."""
    starter = make()
    reader = make(session=starter.session_name)
    listed = threading.Event()
    start_all, containers = starter._docker.start_all, reader._docker.containers

    def start_once_listed(*args: Any) -> Any:
        assert listed.wait(30)
        return start_all(*args)

    starter._docker.start_all = start_once_listed
    with ThreadPoolExecutor(1) as pool:
        submitted = pool.submit(submit, starter, role("r", LONG))
        app_id = wait_until(lambda: list(recorded(starter)), "the record, written before the start")[0]

        def listing_then_start_ends(*args: Any) -> Any:
            found = containers(*args)
            listed.set()
            submitted.result(timeout=30)  # the start ends between the listing and the decision
            return found

        reader._docker.containers = listing_then_start_ends
        first = reader.describe(app_id).state if read == "describe" else reader.list()[0].state
    assert first == AppState.SUBMITTED
    assert not any(rep.final for rep in recorded(reader)[app_id].replicas)
    fresh = make(session=starter.session_name)
    assert fresh.describe(app_id).state == AppState.RUNNING
    fresh.cancel(app_id)
    assert fresh.describe(app_id).state == AppState.CANCELLED


def test_processes_pruning_at_once_each_report_the_apps_they_removed(
    make: Callable[..., PersistentDockerScheduler],
) -> None:
    """Three schedulers list the same ended apps, then all prune them (a barrier after each one's
    listing): every app is reported once, by the one that removed it."""
    first = make()
    apps = [submit(first, role("r", "true")) for _ in range(6)]
    for app_id in apps:
        wait_for(first, app_id)
    pruners = [make(session=first.session_name) for _ in range(3)]
    listed = threading.Barrier(3)
    for pruner in pruners:
        summaries = pruner._store.summaries

        def summaries_then_wait(summaries: Callable[[], Any] = summaries) -> Any:
            found = summaries()
            listed.wait(30)
            return found

        pruner._store.summaries = summaries_then_wait
    with ThreadPoolExecutor(3) as pool:
        pruned = list(pool.map(lambda p: p.prune(timedelta(0)), pruners))
    assert sorted(app_id for ids in pruned for app_id in ids) == sorted(apps)
    assert first.list() == []


def test_prune_deletes_old_ended_apps_of_this_session_only(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    scheduler, other = make(), make()
    ended = submit(scheduler, role("r", "echo old"))
    failed = submit(scheduler, role("r", "exit 2"))
    elsewhere = submit(other, role("r", "true"))
    for s, app_id in ((scheduler, ended), (scheduler, failed), (other, elsewhere)):
        wait_for(s, app_id)
    running = start_long(scheduler)
    finished = client.api.inspect_container(f"{ended}-r-0")["State"]["FinishedAt"]
    ended_at = recorded(scheduler)[ended].replicas[0].ended
    base, fraction = re.match(r"([^.Z+]{19})(?:\.(\d+))?", finished).groups()
    expected = datetime.fromisoformat(base + "+00:00").timestamp() + float("0." + (fraction or "0"))
    assert abs(ended_at - expected) < 0.01

    assert scheduler.prune(timedelta(hours=1)) == []
    assert scheduler.prune(timedelta(0)) == [ended, failed]
    assert [a.app_id for a in scheduler.list()] == [running]
    assert container_names(client, ended) == container_names(client, failed) == []
    assert scheduler.describe(running).state == AppState.RUNNING
    assert other.describe(elsewhere).state == AppState.SUCCEEDED


# ---------------------------------------------------------------------------
# Image pulls (against a real registry on loopback) and the Docker footprint
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def registry(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real registry (Debian's docker-registry) on 127.0.0.1, which Docker trusts without TLS."""
    needs_system("running a registry")
    exe = shutil.which("docker-registry")
    if exe is None:
        if CI:
            pytest.fail("CI=true and docker-registry is missing: apt-get install docker-registry")
        pytest.skip("docker-registry is not installed: apt-get install docker-registry")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path_factory.mktemp("registry")
    config = root / "config.yml"
    config.write_text(
        f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    with open(root / "registry.log", "wb") as out:
        proc = subprocess.Popen(
            [exe, "serve", str(config)], stdout=out, stderr=subprocess.STDOUT, preexec_fn=default_signals
        )
    try:

        def answers() -> bool:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2).close()
            except OSError:
                assert proc.poll() is None, (root / "registry.log").read_text()
                return False
            return True

        wait_until(answers, "the registry to answer", 30)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def push(client: docker.DockerClient, source: str, ref: str) -> None:
    """Pushes ``source`` as ``ref`` and drops the local ``ref`` tag again."""
    repository, _, tag = ref.rpartition(":")
    client.images.get(source).tag(repository, tag)  # Podman takes no tag inside the repository
    for event in client.api.push(ref, stream=True, decode=True):
        assert "error" not in event, event
    client.images.remove(ref)


@pytest.fixture
def pushed(client: docker.DockerClient, registry: str) -> Iterator[str]:
    """A busybox only the registry holds, under a fresh name."""
    ref = f"{registry}/busybox:{uuid.uuid4().hex[:10]}"
    push(client, IMAGE, ref)
    yield ref
    with contextlib.suppress(NotFound):
        client.images.remove(ref)


@pytest.mark.engine
def test_image_pull_never_refuses_a_missing_image(
    make: Callable[..., PersistentDockerScheduler], pushed: str, client: docker.DockerClient
) -> None:
    scheduler = make()
    app = specs.AppDef("never", roles=[specs.Role("r", image=pushed, entrypoint="true")])
    with pytest.raises(ValueError, match=f"image '{re.escape(pushed)}' is not on this Docker host"):
        scheduler.submit(app, {"image_pull": "never"})
    with pytest.raises(ValueError, match="image_pull='sometimes' is not one of always, missing, never"):
        scheduler.submit(app, {"image_pull": "sometimes"})
    assert_nothing_created(client, scheduler)


@pytest.mark.engine
def test_image_pull_missing_pulls_only_what_docker_lacks(
    make: Callable[..., PersistentDockerScheduler], pushed: str, caplog: pytest.LogCaptureFixture
) -> None:
    scheduler = make()
    app = specs.AppDef("missing", roles=[specs.Role("r", image=pushed, entrypoint="echo", args=["pulled"])])
    with caplog.at_level(logging.INFO, logger="docker_scheduler"):
        first = scheduler.submit(app, {"image_pull": "missing"})
    assert f"pulled image {pushed}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="docker_scheduler"):
        second = scheduler.submit(app, {"image_pull": "missing"})
    assert "pulling" not in caplog.text
    assert wait_for(scheduler, first).state == wait_for(scheduler, second).state == AppState.SUCCEEDED
    assert list(scheduler.log_iter(second, "r")) == ["pulled\n"]


@pytest.mark.engine
def test_image_pull_always_pulls_and_falls_back_to_a_local_copy(
    make: Callable[..., PersistentDockerScheduler],
    pushed: str,
    registry: str,
    client: docker.DockerClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scheduler = make()
    with caplog.at_level(logging.INFO, logger="docker_scheduler"):
        pulled = submit(scheduler, specs.Role("r", image=pushed, entrypoint="true"), image_pull="always")
    assert f"pulled image {pushed}" in caplog.text
    local_only = f"{registry}/busybox:local-only-{uuid.uuid4().hex[:8]}"
    client.images.get(IMAGE).tag(*local_only.rsplit(":", 1))
    try:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="docker_scheduler"):
            fallback = submit(
                scheduler, specs.Role("r", image=local_only, entrypoint="true"), image_pull="always"
            )
        assert f"failed to pull image {local_only}, falling back to the local copy" in caplog.text
        assert wait_for(scheduler, pulled).state == wait_for(scheduler, fallback).state == AppState.SUCCEEDED
    finally:
        client.images.remove(local_only)


@pytest.fixture
def big_pushed(client: docker.DockerClient, registry: str) -> Iterator[str]:
    """An image with a 30 MB layer of its own, held only by the registry."""
    tag = f"{registry}/big:{uuid.uuid4().hex[:10]}"
    dockerfile = f"FROM {IMAGE}\nRUN head -c 30000000 /dev/urandom > /blob\n".encode()
    built, _ = client.images.build(fileobj=io.BytesIO(dockerfile), tag=tag, rm=True)
    push(client, built.id, tag)  # dropping its only tag deletes the image: the pull must download
    assert not client.images.list(name=tag)
    yield tag
    with contextlib.suppress(NotFound):
        client.images.remove(tag, force=True)


@pytest.mark.engine
def test_long_pulls_log_progress(
    make: Callable[..., PersistentDockerScheduler],
    big_pushed: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(docker_scheduler, "PULL_PROGRESS_INTERVAL", 0.0)  # every event counts as "long"
    scheduler = make()
    with caplog.at_level(logging.INFO, logger="docker_scheduler"):
        app_id = submit(scheduler, specs.Role("r", image=big_pushed, entrypoint="true"), image_pull="missing")
    progress = [r for r in caplog.records if r.getMessage().startswith(f"pulling {big_pushed}: ")]
    assert progress and all(r.levelno == logging.INFO for r in progress)
    assert any(re.search(r"Download|Pull complete", r.getMessage()) for r in progress), progress
    assert wait_for(scheduler, app_id).state == AppState.SUCCEEDED


@pytest.mark.engine
def test_remove_on_exit_removes_containers_once_recorded(
    make: Callable[..., PersistentDockerScheduler], client: docker.DockerClient
) -> None:
    scheduler = make()
    removed = submit(scheduler, role("r", "echo gone; exit 3", replicas=2), remove_on_exit=True)
    kept = submit(scheduler, role("r", "echo kept"))
    assert wait_for(scheduler, removed).state == AppState.FAILED
    assert wait_for(scheduler, kept).state == AppState.SUCCEEDED
    assert container_names(client, removed) == []
    assert len(container_names(client, kept)) == 1
    fresh = make(session=scheduler.session_name)
    assert fresh.describe(removed).state == AppState.FAILED
    assert list(fresh.log_iter(removed, "r", 1)) == ["gone\n"]
