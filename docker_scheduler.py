"""A torchx scheduler for local Docker that keeps a durable record of every app.

torchx's ``local_docker`` scheduler asks Docker for everything, so once a
container is gone its exit code and logs are gone too. This module's
:py:class:`PersistentDockerScheduler` records each app in a pickled session
file: the roles as submitted, every replica's exit code and, once a replica
ends, its stdout and stderr. ``describe``, ``log_iter`` and ``list`` answer from
that record after the containers are removed, from any process.

It depends on ``docker`` and ``torchx`` only; copy this file into a project or
``pip install`` it. Run it directly::

    from torchx import specs
    from docker_scheduler import PersistentDockerScheduler

    app = specs.AppDef(
        name="hello",
        roles=[specs.Role("echo", image="busybox", entrypoint="echo", args=["hello"])],
    )
    scheduler = PersistentDockerScheduler("demo")
    app_id = scheduler.submit(app, {})
    # ... later, from this or any other process:
    print(scheduler.describe(app_id).state)
    print("".join(scheduler.log_iter(app_id, "echo", should_tail=True)))
    scheduler.close()  # stops what still runs, keeps the record, removes the containers

or through a torchx ``Runner``::

    from torchx.runner import Runner
    from docker_scheduler import create_scheduler

    with Runner("demo", scheduler_factories={"local_docker_persistent": create_scheduler}) as runner:
        handle = runner.run(app, scheduler="local_docker_persistent")
        print(runner.wait(handle, wait_interval=1))
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import dataclasses
import fcntl
import heapq
import io
import logging
import os
import pickle
import re
import shutil
import struct
import tempfile
import threading
import time
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, TypedDict, cast

import docker
import docker.types
import requests
import torchx.schedulers.docker_scheduler as _torchx_docker
from docker.errors import DockerException, NotFound
from torchx.schedulers.api import (
    DescribeAppResponse,
    ListAppResponse,
    Stream,
    filter_regex,
)
from torchx.schedulers.docker_scheduler import (
    CONTAINER_STATE,
    LABEL_APP_ID,
    LABEL_REPLICA_ID,
    LABEL_ROLE_NAME,
    DockerContainer,
    DockerJob,
    DockerScheduler,
    ensure_network,
)
from torchx.specs.api import (
    AppDef,
    AppDryRunInfo,
    AppState,
    CfgVal,
    ReplicaStatus,
    Role,
    RoleStatus,
    runopts,
)

if TYPE_CHECKING:
    from docker import DockerClient

__all__ = ["DockerUnavailableError", "PersistentDockerScheduler", "create_scheduler", "log"]

log: logging.Logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Labels and constants
# ---------------------------------------------------------------------------

#: Label that ties a container to its session, beside torchx's app/role/replica labels.
LABEL_SESSION = "docker-scheduler/session"

#: Bumped whenever the session file's shape changes; older formats stay readable.
FORMAT_VERSION = 2
_READABLE_FORMATS = (1, 2)

#: Environment variable naming the state directory when ``state_dir`` is not given.
STATE_DIR_ENV = "DOCKER_SCHEDULER_STATE_DIR"

#: Seconds Docker waits after SIGTERM before SIGKILL, as ``docker stop`` does.
STOP_TIMEOUT = 10

#: The ``image_pull`` policies.
IMAGE_PULL_POLICIES = ("always", "missing", "never")

#: Seconds between two progress lines of a long image pull.
PULL_PROGRESS_INTERVAL = 3.0

# Docker refuses container names outside this pattern.
_CONTAINER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")
# A listed container's Status reads e.g. "Exited (137) 3 seconds ago".
_EXITED_STATUS = re.compile(r"Exited \((-?\d+)\)")
_ACTIVE = (AppState.SUBMITTED, AppState.PENDING, AppState.RUNNING)
# Container states as dockerd names them (torchx's map) and as Podman's API adds them.
_CONTAINER_STATES: dict[str, AppState] = {
    **CONTAINER_STATE,
    "configured": AppState.SUBMITTED,
    "initialized": AppState.PENDING,
    "stopping": AppState.RUNNING,
    # Podman's, between a process's end and either a restart or its clean-up to "exited".
    "stopped": AppState.PENDING,
}
# States of a container that is done: its exit code is final.
_ENDED = frozenset({"exited", "dead"})
# A record's state from before schedule() starts its containers until a reader sees them.
_STARTING = AppState.SUBMITTED.name
# The file in an app's log directory that says schedule() started all its containers.
_STARTED = ".started"
# At most this many containers are created and started at once.
_START_WORKERS = 8


# Records are plain dicts so that the pickle holds builtin types only:
# upgrading torchx or docker never breaks reading a session file.


class RoleRecord(TypedDict):
    """A role as submitted."""

    name: str
    image: str
    entrypoint: str
    args: list[str]
    env: dict[str, str]
    num_replicas: int
    max_retries: int


class ContainerRequest(TypedDict):
    """What ``docker create`` was given for one replica; docker-py's helper types as plain dicts."""

    image: str
    command: list[str]
    kwargs: dict[str, Any]


class ReplicaEnd(TypedDict, total=False):
    """What is learnt when a replica ends, merged into its :py:class:`ReplicaRecord`."""

    exit_code: int | None
    restarts: int
    lost: bool
    logs: bool
    error: str
    ended: float | None
    log_error: str


class ReplicaRecord(TypedDict):
    """One replica (one container) and what is known of its end."""

    role: str
    id: int
    name: str
    exit_code: int | None
    restarts: int
    lost: bool
    logs: bool  # stdout and stderr are in the log directory
    error: str
    request: ContainerRequest | None  # None in records of format 1 and for apps only Docker knew
    ended: float | None  # when the replica's end was seen (Docker's finish time where it has one)
    log_error: str  # why its logs are not recorded yet; the container is kept until they are


class AppRecord(TypedDict):
    """One app of a session, as pickled in the session file."""

    app_id: str
    created: float
    state: str | None  # set when cancelled, or when schedule() failed
    msg: str
    remove_on_exit: bool
    roles: list[RoleRecord]
    replicas: list[ReplicaRecord]


class DockerUnavailableError(RuntimeError):
    """The Docker daemon did not answer at the endpoint in use."""


def _docker_endpoint() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def _unavailable(cause: BaseException) -> DockerUnavailableError:
    return DockerUnavailableError(
        f"cannot reach the Docker daemon at {_docker_endpoint()} ({cause}); "
        "start it (e.g. `dockerd` or `systemctl start docker`) or point DOCKER_HOST at one that runs"
    )


@contextlib.contextmanager
def _reaching_docker() -> Iterator[None]:
    """Turns a connection failure into one error that names the endpoint."""
    try:
        yield
    except requests.exceptions.ConnectionError as e:
        raise _unavailable(e) from e


def _check_session_name(session_name: str) -> None:
    bad = [sep for sep in ("/", os.sep, os.altsep, "\0") if sep]
    if not session_name or ".." in session_name or any(s in session_name for s in bad):
        raise ValueError(
            f"invalid session name {session_name!r}: it names the session file, so it must be "
            "non-empty and hold no path separator or '..' (e.g. 'my_experiments')"
        )


def _check_private(path: str, st: os.stat_result) -> None:
    """Refuses state that someone else could have written: it is unpickled."""
    if st.st_uid != os.getuid():
        raise PermissionError(
            f"{path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()}); refusing to read it. "
            f"Fix: `chown {os.getuid()} {path}`, or use another state_dir"
        )
    if st.st_mode & 0o022:
        raise PermissionError(
            f"{path} is writable by group or others (mode {st.st_mode & 0o777:o}); refusing to read it. "
            f"Fix: `chmod go-w {path}`"
        )


def _resolve_state_dir(state_dir: str | None) -> str:
    base = state_dir or os.environ.get(STATE_DIR_ENV)
    if not base:
        xdg = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
        base = os.path.join(xdg, "docker_scheduler")
    path = os.path.abspath(os.path.expanduser(base))
    os.makedirs(path, mode=0o700, exist_ok=True)
    _check_private(path, os.stat(path))
    return path


# ---------------------------------------------------------------------------
# Run options, and the one place that knows torchx versions apart
# ---------------------------------------------------------------------------
# torchx 0.7 declares a scheduler's options as ``runopts`` and hands ``cfg`` over
# as a dict; torchx main (``torchx-nightly``) declares them as a dataclass
# extending its ``StructuredOpts`` and hands ``cfg`` over as that dataclass.
# Both read with ``cfg.get(name)``. Everything version-dependent is below.

# torchx main's ``local_docker`` options (copy_env, env, privileged); None on 0.7.
_TorchxDockerOpts: Any = getattr(_torchx_docker, "Opts", None)


def _option(default: Any, type_: Any, help: str) -> Any:
    """A run option: a dataclass field that carries its runopts type and help."""
    return dataclasses.field(default=default, metadata={"type": type_, "help": help})


@dataclasses.dataclass
class PersistentDockerOpts(_TorchxDockerOpts or object):  # type: ignore[misc]
    """The run options this scheduler adds to ``local_docker``'s.

    On torchx main this is the scheduler's options type (``cfg`` arrives as an
    instance, with ``local_docker``'s fields inherited); on torchx 0.7 its fields
    are added to ``local_docker``'s ``runopts``.
    """

    image_pull: str = _option(
        "always",
        str,
        "when to pull each role's image: `always` (as local_docker; falls back to a local copy "
        "when the pull fails), `missing` (only when Docker lacks it) or `never` "
        "(a missing image is an error)",
    )
    remove_on_exit: bool = _option(
        False, bool, "remove each container once its exit code and logs are recorded in the session"
    )
    shm_size: str | None = _option(
        None,
        str,
        "size of /dev/shm in every container, in Docker's size syntax (`256m`, `16g`, or bytes), as "
        "`docker run --shm-size`; PyTorch DataLoader workers and NCCL need more than Docker's 64m. "
        "Overrides the size local_docker derives from a role's memMB; unset, that stays",
    )
    ipc_mode: str | None = _option(
        None,
        str,
        "IPC namespace of every container, as `docker run --ipc`: `private`, `shareable`, `host`, "
        "`none` or `container:<name>`",
    )
    ulimits: list[str] | None = _option(
        None,
        typing.List[str],  # noqa: UP006  torchx 0.7 parses an option typed exactly so as a list
        "resource limits of every container, each `name=soft[:hard]` as `docker run --ulimit` "
        "(one value sets both; -1 is unlimited), e.g. nofile=1024:2048. Within torchx's -cfg string, "
        "where `=` and `,` separate options, write `name:soft[:hard]`: "
        "ulimits=memlock:-1,stack:67108864",
    )

    @classmethod
    def get_docstrings(cls) -> dict[str, str]:
        # torchx main takes help from attribute docstrings; ours sits in each field's metadata.
        helps = {f.name: f.metadata["help"] for f in dataclasses.fields(cls) if "help" in f.metadata}
        return {**_TorchxDockerOpts.get_docstrings(), **helps}


# ``AppDryRunInfo[DockerJob]`` on torchx 0.7, ``AppDryRunInfo[DockerJob, Opts]`` on main
# (its second parameter, the cfg type, is invariant): one annotation cannot name both.
_DryRun = Any


def _runopts(torchx_opts: runopts) -> runopts:
    """``local_docker``'s run options (as torchx 0.7 declares them) and ours."""
    if _TorchxDockerOpts is not None:
        return PersistentDockerOpts.as_runopts()  # type: ignore[no-any-return]
    for f in dataclasses.fields(PersistentDockerOpts):
        default = cast(CfgVal, f.default)
        torchx_opts.add(f.name, type_=f.metadata["type"], default=default, help=f.metadata["help"])
    return torchx_opts


def _opts_type() -> type | None:
    """The type torchx main converts ``cfg`` to before handing it over; None on torchx 0.7."""
    return PersistentDockerOpts if _TorchxDockerOpts is not None else None


def _submitted(info: _DryRun) -> tuple[AppDef | None, dict[str, Any]]:
    """The AppDef and resolved ``cfg`` that ``submit_dryrun`` attached to ``info``.

    torchx main sets the public ``app`` and ``cfg``; torchx 0.7 the private
    ``_app`` and ``_cfg``. A hand-made ``AppDryRunInfo`` has neither.
    """
    app = getattr(info, "app", None) or getattr(info, "_app", None)
    cfg = getattr(info, "cfg", None) or getattr(info, "_cfg", None) or {}
    return app, {key: cfg[key] for key in cfg}


# ---------------------------------------------------------------------------
# Session store
# ---------------------------------------------------------------------------


class _RestrictedUnpickler(pickle.Unpickler):
    """Loads builtin types and datetimes only, so a crafted file cannot run code."""

    _ALLOWED = frozenset({("datetime", "datetime"), ("datetime", "timezone"), ("datetime", "timedelta")})

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: session files hold builtin types only")


class _CorruptSession(Exception):
    pass


_Stamp = tuple[int, int, int, int]


def _stamp(st: os.stat_result) -> _Stamp:
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


def _decode(app_id: str, blob: Any) -> AppRecord:
    if not isinstance(blob, bytes):
        raise _CorruptSession(f"malformed record for {app_id!r}")
    try:
        record = _RestrictedUnpickler(io.BytesIO(blob)).load()
    except Exception as e:
        raise _CorruptSession(f"record for {app_id!r}: {type(e).__name__}: {e}") from e
    if not isinstance(record, dict) or not isinstance(record.get("replicas"), list):
        raise _CorruptSession(f"malformed record for {app_id!r}")
    for rep in record["replicas"]:  # format 1 kept none of these
        rep.setdefault("request", None)
        rep.setdefault("ended", None)
        rep.setdefault("log_error", "")
    return cast(AppRecord, record)


def _check_shape(data: Any, session_name: str) -> dict[str, bytes]:
    if not isinstance(data, dict) or data.get("format") not in _READABLE_FORMATS:
        version = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise _CorruptSession(f"format {version!r}, expected one of {_READABLE_FORMATS}")
    apps = data.get("apps")
    if data.get("session") != session_name or not isinstance(apps, dict):
        raise _CorruptSession("not a session file of this session")
    return apps


class _SessionStore:
    """The session file: re-read only when it changed, replaced atomically under a lock.

    Each app's record is pickled on its own inside the file, so a write pickles
    only the records that changed. Records handed out are shared with the
    cache: callers copy one before changing it, and that copy is what changed.
    """

    def __init__(
        self, directory: str, session_name: str, rebuild: Callable[[], dict[str, AppRecord]]
    ) -> None:
        self.path = os.path.join(directory, f"{session_name}.pickle")
        self._lock_path = os.path.join(directory, f"{session_name}.lock")
        self._session_name = session_name
        self._rebuild = rebuild
        self._stamp: _Stamp | None = None
        self._apps: dict[str, AppRecord] = {}
        self._blobs: dict[str, bytes] = {}
        self._held = threading.local()
        self._temp_name = re.compile(re.escape(f".{session_name}.") + r"[a-z0-9_]{8}\.tmp")

    def apps(self) -> dict[str, AppRecord]:
        """The session's apps by id, as of the last write by any process."""
        try:
            stamp: _Stamp | None = _stamp(os.stat(self.path))
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            try:
                self._load()
            except _CorruptSession as e:
                with self._locked():
                    try:  # another process may have replaced it meanwhile
                        self._load()
                    except _CorruptSession:
                        self._quarantine(e)
        return self._apps

    @contextlib.contextmanager
    def update(self) -> Iterator[dict[str, AppRecord]]:
        """Yields the freshest apps under the lock, and writes them back."""
        with self._locked():
            apps = dict(self.apps())
            yield apps
            self._write(apps)

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                _check_private(self.path, st)
                try:
                    data = _RestrictedUnpickler(f).load()
                except Exception as e:  # any byte string can come in: each failure means corrupt
                    raise _CorruptSession(f"{type(e).__name__}: {e}") from e
        except FileNotFoundError:
            self._stamp, self._apps, self._blobs = None, {}, {}
            return
        blobs = _check_shape(data, self._session_name)
        apps = {app_id: _decode(app_id, blob) for app_id, blob in blobs.items()}
        self._stamp, self._apps, self._blobs = _stamp(st), apps, blobs

    def _quarantine(self, error: Exception) -> None:
        aside = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        os.replace(self.path, aside)
        log.warning(
            "session file %s could not be read (%s); moved it to %s and rebuilt the session "
            "from the containers labelled with it",
            self.path,
            error,
            aside,
        )
        try:
            apps = self._rebuild()
        except Exception as e:
            log.warning("could not rebuild session %s from Docker: %s", self._session_name, e)
            apps = {}
        self._write(apps)

    def _write(self, apps: dict[str, AppRecord]) -> None:
        blobs = {
            app_id: self._blobs[app_id]
            if record is self._apps.get(app_id)
            else pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
            for app_id, record in apps.items()
        }
        data = {"format": FORMAT_VERSION, "session": self._session_name, "apps": blobs}
        directory = os.path.dirname(self.path)
        self._remove_stale_temp_files(directory)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self._session_name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._stamp, self._apps, self._blobs = _stamp(os.stat(self.path)), apps, blobs

    def _remove_stale_temp_files(self, directory: str) -> None:
        # Writers hold the lock, so a temp file seen under it was left by one that died.
        for entry in os.scandir(directory):
            if self._temp_name.fullmatch(entry.name):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # flock is per open file, so a thread that already holds it must not take it again.
        if getattr(self._held, "depth", 0):
            self._held.depth += 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._held.depth = 1
            try:
                yield
            finally:
                self._held.depth = 0
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------
# Log harvest
# ---------------------------------------------------------------------------
# A harvested log is what `docker logs --timestamps` prints for one stream:
# each line starts with Docker's fixed-width RFC 3339 UTC timestamp and a space,
# so since/until compare as bytes and two streams merge in time order.


def _log_file(log_dir: str, rep: ReplicaRecord, stream: str) -> str:
    return os.path.join(log_dir, f"{rep['role']}.{rep['id']}.{stream}")


# dockerd prints RFC 3339 with 9 fixed fraction digits in UTC; Podman trims the
# fraction (or prints none) and may print an offset. Harvested lines are rewritten
# to dockerd's form so that they compare as bytes.
_TIMESTAMP = re.compile(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d) ")


def _fixed_stamp(line: bytes) -> bytes:
    """``line`` with its leading timestamp in dockerd's fixed-width UTC form."""
    if line[19:20] == b"." and line[29:31] == b"Z ":
        return line  # dockerd's own
    match = _TIMESTAMP.match(line)
    if match is None:
        return line
    base, fraction, zone = match.groups()
    if zone != b"Z":
        utc = datetime.fromisoformat((base + zone).decode()).astimezone(timezone.utc)
        base = utc.strftime("%Y-%m-%dT%H:%M:%S").encode()
    return b"%s.%sZ %s" % (base, (fraction or b"").ljust(9, b"0"), line[match.end() :])


# Docker's multiplexed log stream: frames of an 8-byte header (stream id, 3 zero
# bytes, big-endian payload size) and a payload; a TTY container's log is raw.
_FRAME_HEADER = struct.Struct(">BxxxL")
_STDOUT, _STDERR = 1, 2
_READ_SIZE = 1 << 20


def _log_response(
    api: Any,
    name: str,
    streams: Iterable[str],
    *,
    timestamps: bool,
    follow: bool,
    since: float | None = None,
    until: float | None = None,
) -> requests.Response:
    """One ``GET /containers/<name>/logs`` for the given streams, its body left to read.

    docker-py reads such a body a frame at a time; reading it in large blocks
    is what makes a harvest as fast as ``docker logs``.
    """
    params: dict[str, Any] = {
        "stdout": int("stdout" in streams),
        "stderr": int("stderr" in streams),
        "timestamps": int(timestamps),
        "follow": int(follow),
        "tail": "all",
    }
    if since is not None:
        params["since"] = since
    if until is not None:
        params["until"] = until
    # No read timeout: a followed log may stay quiet for as long as its replica runs.
    response: requests.Response = api._get(
        api._url("/containers/{0}/logs", name), params=params, stream=True, timeout=None
    )
    api._raise_for_status(response)
    return response


def _frames(blocks: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """(stream id, payload) for each frame of a log body read in blocks of any size."""
    data, pos, multiplexed = b"", 0, None
    for block in blocks:
        if multiplexed is None:
            multiplexed = block[:1] in (b"\0", b"\1", b"\2") and block[1:4] == b"\0\0\0"
        if not multiplexed:  # a TTY container: one stream, no frames
            yield _STDOUT, block
            continue
        data = data[pos:] + block if pos < len(data) else block
        pos, size = 0, len(data)
        while pos + 8 <= size:
            stream, length = _FRAME_HEADER.unpack_from(data, pos)
            end = pos + 8 + length
            if end > size:
                break
            yield stream, data[pos + 8 : end]
            pos = end


def _harvest_frames(frames: Iterable[tuple[int, bytes]], dests: dict[int, str]) -> None:
    """Writes each stream's frames to its file in ``dests``; each file appears whole or not at all."""
    files: dict[int, Any] = {}
    temps: dict[int, str] = {}
    try:
        for stream, dest in dests.items():
            fd, temps[stream] = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".harvest.")
            files[stream] = os.fdopen(fd, "wb", buffering=_READ_SIZE)
        continued = dict.fromkeys(dests, False)
        for stream, payload in frames:
            out = files.get(stream)
            if out is None:
                continue
            # A line Docker split into frames keeps its first timestamp only.
            payload = payload.partition(b" ")[2] if continued[stream] else _fixed_stamp(payload)
            out.write(payload)
            continued[stream] = not payload.endswith(b"\n")
        for stream, out in files.items():
            out.close()
            os.replace(temps.pop(stream), dests[stream])
    finally:
        for out in files.values():
            out.close()
        for tmp in temps.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _as_utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt


def _epoch(dt: datetime | None) -> float | None:
    """``dt`` as Docker's API takes it (naive datetimes are UTC), or None when it filters nothing."""
    if dt is None:
        return None
    seconds = _as_utc(dt).timestamp()
    return seconds if seconds > 0 else None


def _docker_time(dt: datetime | None) -> bytes | None:
    """``dt`` as Docker prints log timestamps, or None when it filters nothing."""
    if dt is None or _epoch(dt) is None:
        return None
    return _as_utc(dt).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f000Z").encode()


def _read_harvested(
    path: str, since: datetime | None, until: datetime | None
) -> Iterator[tuple[bytes, bytes]]:
    low, high = _docker_time(since), _docker_time(until)
    try:
        with open(path, "rb") as f:
            for raw in f:
                ts, _, text = raw.partition(b" ")
                if low is not None and ts < low:
                    continue
                if high is not None and ts > high:
                    break
                yield ts, text
    except FileNotFoundError:  # this stream never wrote a line
        return


def _harvested_lines(paths: list[str], since: datetime | None, until: datetime | None) -> Iterator[bytes]:
    streams = [_read_harvested(p, since, until) for p in paths]
    for _, text in heapq.merge(*streams, key=lambda entry: entry[0]):
        yield text


def _whole_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Joins Docker's chunks into lines that keep their newline, like torchx's split_lines."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        if b"\n" not in chunk:
            continue
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line + b"\n"
    if pending:
        yield pending


class _PullProgress:
    """Layers done and bytes downloaded, from the events of ``docker pull``."""

    _LAYER_STATUSES = frozenset(
        {
            "Pulling fs layer",
            "Waiting",
            "Downloading",
            "Verifying Checksum",
            "Download complete",
            "Extracting",
            "Pull complete",
            "Already exists",
        }
    )

    def __init__(self) -> None:
        self.layers: dict[str, tuple[int, int]] = {}
        self.done: set[str] = set()

    def update(self, event: dict[str, Any]) -> None:
        layer, status = event.get("id"), event.get("status")
        if not layer or status not in self._LAYER_STATUSES:
            return
        current, total = self.layers.get(layer, (0, 0))
        detail = event.get("progressDetail") or {}
        if status == "Downloading":
            current, total = int(detail.get("current", current)), int(detail.get("total") or total)
        elif status in ("Download complete", "Pull complete", "Already exists"):
            current = total
        self.layers[layer] = (current, total)
        if status in ("Pull complete", "Already exists"):
            self.done.add(layer)

    def __str__(self) -> str:
        have = sum(current for current, _ in self.layers.values())
        total = sum(total for _, total in self.layers.values())
        return f"{len(self.done)}/{len(self.layers)} layers done, {have / 1e6:.1f}/{total / 1e6:.1f} MB"


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------


def _role_record(role: Role) -> RoleRecord:
    return {
        "name": role.name,
        "image": role.image,
        "entrypoint": role.entrypoint,
        "args": [str(a) for a in role.args],
        "env": {str(k): str(v) for k, v in role.env.items()},
        "num_replicas": role.num_replicas,
        "max_retries": role.max_retries,
    }


def _replica_record(
    role: str, replica_id: int, name: str, request: ContainerRequest | None = None
) -> ReplicaRecord:
    return {
        "role": role,
        "id": replica_id,
        "name": name,
        "exit_code": None,
        "restarts": 0,
        "lost": False,
        "logs": False,
        "error": "",
        "request": request,
        "ended": None,
        "log_error": "",
    }


def _new_record(app_id: str, roles: list[RoleRecord], replicas: list[ReplicaRecord]) -> AppRecord:
    return {
        "app_id": app_id,
        "created": time.time(),
        "state": None,
        "msg": "",
        "remove_on_exit": False,
        "roles": roles,
        "replicas": replicas,
    }


# docker-py's helper types are dicts underneath: kept as plain dicts, rebuilt on the way out.
_DOCKER_TYPES: dict[str, type[dict[str, Any]]] = {
    "mounts": docker.types.Mount,
    "device_requests": docker.types.DeviceRequest,
    "ulimits": docker.types.Ulimit,
    "log_config": docker.types.LogConfig,
}


def _plain(value: Any) -> Any:
    """``value`` with builtin types only, as the restricted unpickler reads them."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool, bytes)):
        return value
    return str(value)


def _docker_typed(cls: type[dict[str, Any]], value: dict[str, Any]) -> Any:
    typed = cls.__new__(cls)  # their constructors take other spellings than the dicts they build
    typed.update(value)
    return typed


def _container_kwargs(plain: dict[str, Any]) -> dict[str, Any]:
    """The kwargs of a recorded request, with docker-py's helper types rebuilt."""
    kwargs = copy.deepcopy(plain)
    for key, cls in _DOCKER_TYPES.items():
        value = kwargs.get(key)
        if isinstance(value, list):
            kwargs[key] = [_docker_typed(cls, v) if isinstance(v, dict) else v for v in value]
        elif isinstance(value, dict):
            kwargs[key] = _docker_typed(cls, value)
    return kwargs


def _request_record(c: DockerContainer) -> ContainerRequest:
    return {"image": c.image, "command": [str(a) for a in c.command], "kwargs": _plain(c.kwargs)}


def _record_from_job(job: DockerJob, app: AppDef | None) -> AppRecord:
    replicas = []
    for c in job.containers:
        labels: dict[str, str] = c.kwargs["labels"]  # type: ignore[assignment]
        replicas.append(
            _replica_record(
                labels[LABEL_ROLE_NAME],
                int(labels[LABEL_REPLICA_ID]),
                str(c.kwargs["name"]),
                _request_record(c),
            )
        )
    if app is not None:
        roles = [_role_record(r) for r in app.roles]
    else:  # a hand-made AppDryRunInfo: the containers are all there is
        roles = _roles_from_replicas(
            replicas, {r["name"]: (c.image, c.command) for r, c in zip(replicas, job.containers, strict=True)}
        )
    return _new_record(job.app_id, roles, replicas)


def _roles_from_replicas(
    replicas: list[ReplicaRecord], commands: dict[str, tuple[str, list[str]]]
) -> list[RoleRecord]:
    roles: dict[str, RoleRecord] = {}
    for rep in replicas:
        image, command = commands.get(rep["name"], ("", []))
        role = roles.setdefault(
            rep["role"],
            {
                "name": rep["role"],
                "image": image,
                "entrypoint": command[0] if command else "",
                "args": list(command[1:]),
                "env": {},
                "num_replicas": 0,
                "max_retries": 0,
            },
        )
        role["num_replicas"] += 1
    return list(roles.values())


def _job_from_record(record: AppRecord) -> DockerJob:
    """The request as scheduled; for records of format 1, what they kept of it."""
    roles = {r["name"]: r for r in record["roles"]}
    containers = []
    for rep in record["replicas"]:
        request = rep["request"]
        if request is None:
            role = roles[rep["role"]]
            request = {
                "image": role["image"],
                "command": [role["entrypoint"], *role["args"]],
                "kwargs": {"name": rep["name"], "environment": dict(role["env"])},
            }
        containers.append(
            DockerContainer(request["image"], list(request["command"]), _container_kwargs(request["kwargs"]))
        )
    return DockerJob(app_id=record["app_id"], containers=containers)


def _container_name(container: dict[str, Any]) -> str:
    return str(container["Names"][0]).lstrip("/")


def _listed_exit_code(container: dict[str, Any]) -> int | None:
    match = _EXITED_STATUS.match(container.get("Status") or "")
    return int(match.group(1)) if match else None


def _listed_state(container: dict[str, Any]) -> AppState:
    if container["State"] == "exited":
        code = _listed_exit_code(container)
        if code is None:
            return AppState.UNKNOWN
        return AppState.SUCCEEDED if code == 0 else AppState.FAILED
    return _CONTAINER_STATES.get(container["State"], AppState.UNKNOWN)


def _records_from_containers(containers: list[dict[str, Any]]) -> dict[str, AppRecord]:
    """Records for apps known only from their containers (none of their exits seen yet)."""
    by_app: dict[str, list[dict[str, Any]]] = {}
    for c in containers:
        by_app.setdefault(c["Labels"][LABEL_APP_ID], []).append(c)
    records = {}
    for app_id, group in by_app.items():
        group.sort(key=lambda c: (c["Labels"][LABEL_ROLE_NAME], int(c["Labels"][LABEL_REPLICA_ID])))
        replicas = [
            _replica_record(
                c["Labels"][LABEL_ROLE_NAME], int(c["Labels"][LABEL_REPLICA_ID]), _container_name(c)
            )
            for c in group
        ]
        commands = {_container_name(c): (c["Image"], str(c.get("Command", "")).split()) for c in group}
        records[app_id] = _new_record(app_id, _roles_from_replicas(replicas, commands), replicas)
    return records


def _is_final(rep: ReplicaRecord) -> bool:
    return rep["exit_code"] is not None or bool(rep["lost"])


def _logs_pending(rep: ReplicaRecord) -> bool:
    """Whether the replica ended but its logs could not be recorded yet (they are retried)."""
    return _is_final(rep) and not rep["logs"] and bool(rep["log_error"])


def _with_ends(record: AppRecord, ended: dict[str, ReplicaEnd]) -> AppRecord:
    """A copy of ``record`` with what was learnt of ended replicas, out of the starting state."""
    fresh = copy.deepcopy(record)
    fresh["replicas"] = [
        {**rep, **ended[rep["name"]]}
        if rep["name"] in ended and (not _is_final(rep) or _logs_pending(rep))
        else rep
        for rep in fresh["replicas"]
    ]
    if fresh["state"] == _STARTING:
        fresh["state"] = None
    return fresh


def _finished_at(stamp: Any) -> float:
    """Docker's ``State.FinishedAt`` as epoch seconds; now when it is missing or unreadable."""
    try:
        finished = datetime.fromisoformat(str(stamp)[:19]).replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return time.time()
    return finished if finished > 0 else time.time()


def _harvest_failure(error: BaseException, log_dir: str) -> tuple[str, str]:
    """Why logs could not be recorded, and what fixes it."""
    if isinstance(error, OSError) and not isinstance(error, requests.exceptions.RequestException):
        return f"{error.strerror or error} in {log_dir}", "free space there or make it writable"
    if isinstance(error, docker.errors.APIError) and (
        error.status_code == 501 or "log driver" in str(error.explanation)  # Podman: 500, "'none' log driver"
    ):
        return (
            f"Docker cannot read them back: {error.explanation}",
            "run it with a logging driver Docker can read (json-file, local, journald) or turn on the "
            "daemon's dual logging; until then `docker logs` cannot show them either",
        )
    return f"{type(error).__name__}: {error}", "check that the Docker daemon answers"


def _asks_docker(record: AppRecord) -> bool:
    """Whether Docker has something for the record: a replica still going, or logs to record."""
    return not _settled(record) or any(_logs_pending(rep) for rep in record["replicas"])


def _ended_at(record: AppRecord) -> float:
    """When the last replica's end was seen; records of format 1 fall back to their creation."""
    return max((rep["ended"] or record["created"] for rep in record["replicas"]), default=record["created"])


def _settled(record: AppRecord) -> bool:
    """Whether nothing about the app can change any more."""
    return all(_is_final(r) for r in record["replicas"])


def _failed(rep: ReplicaRecord) -> bool:
    return rep["exit_code"] not in (None, 0)


def _replica_state(rep: ReplicaRecord, live: dict[str, AppState], cancelled: bool = False) -> AppState:
    if rep["exit_code"] is not None:
        if rep["exit_code"] == 0:
            return AppState.SUCCEEDED
        # An app is only marked cancelled while none of its replicas had failed.
        return AppState.CANCELLED if cancelled else AppState.FAILED
    if rep["lost"]:  # its exit code is gone: never SUCCEEDED, and terminal, so waits end
        return AppState.CANCELLED if cancelled else AppState.FAILED
    return live.get(rep["name"], AppState.UNKNOWN)


def _app_state(recorded: str | None, states: list[AppState]) -> AppState:
    if recorded:
        return AppState[recorded]
    if AppState.FAILED in states:
        return AppState.FAILED
    if states and all(s == AppState.SUCCEEDED for s in states):
        return AppState.SUCCEEDED
    active = [s for s in states if s in _ACTIVE]
    return min(active) if active else AppState.UNKNOWN


def _record_state(record: AppRecord, live: dict[str, AppState]) -> AppState:
    cancelled = record["state"] == AppState.CANCELLED.name
    return _app_state(record["state"], [_replica_state(rep, live, cancelled) for rep in record["replicas"]])


def _describe_record(record: AppRecord, live: dict[str, AppState]) -> DescribeAppResponse:
    roles = [
        Role(
            name=r["name"],
            image=r["image"],
            entrypoint=r["entrypoint"],
            args=list(r["args"]),
            env=dict(r["env"]),
            num_replicas=r["num_replicas"],
            max_retries=r["max_retries"],
        )
        for r in record["roles"]
    ]
    statuses = {r["name"]: RoleStatus(r["name"], []) for r in record["roles"]}
    states = []
    cancelled = record["state"] == AppState.CANCELLED.name
    problems = [record["msg"]] if record["msg"] else []
    if cancelled:
        problems.append("cancelled")
    for rep in record["replicas"]:
        state = _replica_state(rep, live, cancelled)
        states.append(state)
        statuses.setdefault(rep["role"], RoleStatus(rep["role"], [])).replicas.append(
            ReplicaStatus(id=rep["id"], state=state, role=rep["role"], hostname=rep["name"])
        )
        if _failed(rep):
            verb = "was stopped" if cancelled else "exited"
            problems.append(f"{rep['role']}/{rep['id']} {verb} with code {rep['exit_code']}{rep['error']}")
        elif rep["lost"]:
            why = rep["error"] or "vanished before its exit code could be read"
            problems.append(f"{rep['role']}/{rep['id']}: container {rep['name']} {why}")
        if _logs_pending(rep):
            problems.append(f"{rep['role']}/{rep['id']}: logs not recorded yet ({rep['log_error']})")
    return DescribeAppResponse(
        app_id=record["app_id"],
        state=_app_state(record["state"], states),
        num_restarts=max((rep["restarts"] for rep in record["replicas"]), default=0),
        msg="; ".join(problems),
        roles=roles,
        roles_statuses=list(statuses.values()),
    )


_IPC_MODE = re.compile(r"private|shareable|host|none|container:[a-zA-Z0-9][a-zA-Z0-9_.-]*")
_ULIMIT = re.compile(r"([a-z]+)[=:](-?\d+)(?::(-?\d+))?")
# The rlimits Docker knows by name (`docker run --ulimit`).
_ULIMIT_NAMES = frozenset(
    {"as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile", "nproc", "rss"}
    | {"rtprio", "rttime", "sigpending", "stack"}
)


def _shm_size(value: Any) -> str:
    example = "use Docker's size syntax, e.g. shm_size=256m or shm_size=16g"
    try:
        size = docker.utils.parse_bytes(str(value))
    except DockerException as e:
        raise ValueError(f"shm_size={value!r} is not a size ({e}): {example}") from e
    if size <= 0:
        raise ValueError(f"shm_size={value!r} must be more than 0 bytes: {example}")
    return str(value)


def _ulimit(entry: str) -> docker.types.Ulimit:
    example = "e.g. nofile=1024:2048 or memlock=-1 (within -cfg: nofile:1024:2048)"
    match = _ULIMIT.fullmatch(entry.strip())
    if match is None:
        raise ValueError(f"ulimits entry {entry!r} is not name=soft[:hard] with whole numbers: {example}")
    name, soft, hard = match.group(1), int(match.group(2)), int(match.group(3) or match.group(2))
    if name not in _ULIMIT_NAMES:
        raise ValueError(
            f"ulimits entry {entry!r} names no limit Docker knows: "
            f"use one of {', '.join(sorted(_ULIMIT_NAMES))}, {example}"
        )
    if hard != -1 and (soft == -1 or soft > hard):
        raise ValueError(f"ulimits entry {entry!r} has a soft limit above its hard limit: {example}")
    return docker.types.Ulimit(name=name, soft=soft, hard=hard)


def _container_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``docker create`` kwargs that shm_size, ipc_mode and ulimits ask for, checked first.

    Raises:
        ValueError: naming the option, the value and a valid example.
    """
    kwargs: dict[str, Any] = {}
    if cfg.get("shm_size") not in (None, ""):
        kwargs["shm_size"] = _shm_size(cfg["shm_size"])
    ipc_mode = cfg.get("ipc_mode")
    if ipc_mode not in (None, ""):
        if not isinstance(ipc_mode, str) or not _IPC_MODE.fullmatch(ipc_mode):
            raise ValueError(
                f"ipc_mode={ipc_mode!r} is not one of private, shareable, host, none or container:<name>: "
                "e.g. ipc_mode=host"
            )
        kwargs["ipc_mode"] = ipc_mode
    ulimits = cfg.get("ulimits")
    if ulimits:
        entries = [ulimits] if isinstance(ulimits, str) else list(ulimits)
        kwargs["ulimits"] = [_ulimit(str(entry)) for entry in entries]
    return kwargs


def _validate_app(app: AppDef) -> None:
    if not app.roles:
        raise ValueError(f"app {app.name!r} has no roles: add at least one specs.Role")
    seen = set()
    for role in app.roles:
        if not _CONTAINER_NAME.fullmatch(f"x{role.name}"):
            raise ValueError(
                f"role name {role.name!r} cannot be part of a Docker container name: "
                "use letters, digits, '_', '.' and '-' only"
            )
        if role.name[:30] in seen:
            raise ValueError(
                f"role name {role.name!r} repeats another role's (the first 30 characters name the "
                "container): give every role a distinct name"
            )
        seen.add(role.name[:30])
        if not role.image:
            raise ValueError(f"role {role.name!r} has an empty image: set Role.image, e.g. 'busybox'")
        if role.num_replicas < 1:
            raise ValueError(f"role {role.name!r} has num_replicas={role.num_replicas}: it needs at least 1")


# ---------------------------------------------------------------------------
# Scheduler
# ---------------------------------------------------------------------------


class PersistentDockerScheduler(DockerScheduler):
    """
    A torchx scheduler that runs apps as local Docker containers and keeps a
    durable record of each one in a session file.

    It takes the same AppDefs, run options and workspaces as ``local_docker``
    (it subclasses :py:class:`torchx.schedulers.docker_scheduler.DockerScheduler`),
    and differs where that one forgets:

    * ``describe`` reports CANCELLED for cancelled apps, FAILED when any replica
      failed or its container vanished before its exit code was seen (a terminal
      state, so waits end), SUCCEEDED only when every replica succeeded, and
      ``None`` for an app id nobody knows.
    * When a replica ends, its exit code goes into the session file and its
      stdout and stderr into files beside it; ``describe``, ``log_iter`` and
      ``list`` serve them from there after the containers are gone, in any process.
    * Side paths degrade, never break: logs that cannot be recorded (a logging
      driver Docker cannot read back, a full or read-only disk) leave the exit
      code recorded and the container in place, and are retried; ``schedule``
      records the app before it creates anything. :py:meth:`delete` and
      :py:meth:`prune` forget apps.

    State lives in ``state_dir``: the ``state_dir`` argument, else the
    ``DOCKER_SCHEDULER_STATE_DIR`` environment variable, else
    ``${XDG_STATE_HOME:-~/.local/state}/docker_scheduler``. The session file
    ``<session_name>.pickle`` holds builtin types only, is written atomically
    under a lock with mode 0600 and is read with an unpickler that refuses
    anything else.

    Args:
        session_name: names the session file; non-empty, no path separator, no ``..``.
        state_dir: the directory for session files and harvested logs.
        detach: when True, :py:meth:`close` leaves apps running and containers in place.

    **Config Options**

    .. runopts::
        class: docker_scheduler.create_scheduler

    .. compatibility::
        type: scheduler
        features:
            cancel: true
            logs: true
            distributed: true
            describe: |
                Full support: the roles as submitted (name, image, entrypoint,
                args, env, num_replicas) and every replica's state, after the
                containers are removed too.
            workspaces: true
            mounts: true
            elasticity: false
    """

    def __init__(self, session_name: str, *, state_dir: str | None = None, detach: bool = False) -> None:
        _check_session_name(session_name)
        super().__init__(session_name)
        self.detach = detach
        self.state_dir: str = _resolve_state_dir(state_dir)
        self._store = _SessionStore(self.state_dir, session_name, self._rebuild_from_docker)
        self._client: DockerClient | None = None
        self._scheduled: list[str] = []
        self._warned: set[tuple[str, str]] = set()
        self._closed = False

    @property
    def session_file(self) -> str:
        """The path of this session's pickled session file."""
        return self._store.path

    @property
    def _docker_client(self) -> DockerClient:
        if self._client is None:
            try:
                self._client = docker.from_env()
            except DockerException as e:
                raise _unavailable(e) from e
        return self._client

    # -- submit -----------------------------------------------------------

    def _run_opts(self) -> runopts:
        return _runopts(super()._run_opts())

    @classmethod
    def _opts_type(cls) -> Any:
        return _opts_type()

    def _submit_dryrun(self, app: AppDef, cfg: Mapping[str, Any]) -> _DryRun:
        _validate_app(app)
        policy = cfg.get("image_pull") or "always"
        if policy not in IMAGE_PULL_POLICIES:
            raise ValueError(f"image_pull={policy!r} is not one of {', '.join(IMAGE_PULL_POLICIES)}")
        options = _container_options(cfg)
        info = super()._submit_dryrun(app, cast(Any, cfg))
        job = info.request
        for name in [job.app_id, *(str(c.kwargs["name"]) for c in job.containers)]:
            if not _CONTAINER_NAME.fullmatch(name):
                raise ValueError(
                    f"app name {app.name!r} gives the name {name!r}, which Docker refuses for a container: "
                    "use letters, digits, '_', '.' and '-', starting with a letter or digit"
                )
        for c in job.containers:
            c.kwargs["labels"][LABEL_SESSION] = self.session_name  # type: ignore[index]
            c.kwargs.update(copy.deepcopy(options))
        return info

    def schedule(self, dryrun_info: _DryRun) -> str:
        """Records the app, then starts every replica's container.

        The record is written first, in state SUBMITTED: when it cannot be
        written, nothing is created and the error names the state directory.
        When a container cannot start, the ones already started are removed,
        the app is recorded FAILED with the reason, and the error is raised.
        Once the start lock is released, the next ``describe`` or ``list``, in
        any process, reconciles the record with the app's containers: the
        ones that exist are adopted, the ones that never came are FAILED. So
        a process that dies in between leaves nothing unrecorded, and a
        schedule that succeeds writes the session file once.
        """
        job: DockerJob = dryrun_info.request
        app, cfg = _submitted(dryrun_info)
        record = _record_from_job(job, app)
        record["remove_on_exit"] = bool(cfg.get("remove_on_exit", False))
        record["state"] = _STARTING
        with _reaching_docker():
            client = self._docker_client
            self._prepare_images({c.image for c in job.containers}, cfg.get("image_pull") or "always")
            ensure_network(client)
        with self._starting(job.app_id):
            try:
                self._save(copy.deepcopy(record))  # the store shares what it holds: keep ours apart
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.rmdir(self._log_dir(job.app_id))
                raise self._nothing_started(e, f"record app {job.app_id} in {self.state_dir}") from e
            with _reaching_docker():
                self._start_all(job, record)
            with contextlib.suppress(OSError):  # without it, a vanished replica reads "never created"
                os.close(
                    os.open(
                        os.path.join(self._log_dir(job.app_id), _STARTED), os.O_CREAT | os.O_WRONLY, 0o600
                    )
                )
        self._scheduled.append(job.app_id)
        return job.app_id

    @contextlib.contextmanager
    def _starting(self, app_id: str) -> Iterator[None]:
        """Holds the app's start lock: readers leave a record in state SUBMITTED alone while it is held.

        The lock is a ``flock`` on the app's log directory, so it dies with the
        process that holds it.
        """
        log_dir = self._log_dir(app_id)
        try:
            os.makedirs(log_dir, mode=0o700, exist_ok=True)
            fd = os.open(log_dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise self._nothing_started(e, f"create {log_dir}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _nothing_started(self, error: OSError, what: str) -> OSError:
        return type(error)(
            error.errno,
            f"cannot {what} ({error.strerror}), so nothing was started: free space in {self.state_dir}, "
            "make it writable, or pass another state_dir",
        )

    def _start_in_progress(self, app_id: str) -> bool:
        try:
            fd = os.open(self._log_dir(app_id), os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def _start_all(self, job: DockerJob, record: AppRecord) -> None:
        client = self._docker_client

        def start(c: DockerContainer) -> None:
            client.containers.create(c.image, c.command, **c.kwargs).start()

        workers = max(1, min(_START_WORKERS, len(job.containers)))
        with ThreadPoolExecutor(workers, thread_name_prefix="docker-scheduler-start") as pool:
            futures = [(c, pool.submit(start, c)) for c in job.containers]
        failed = [(c, f.exception()) for c, f in futures if f.exception() is not None]
        if not failed:
            return
        container, error = failed[0]
        self._remove([str(c.kwargs["name"]) for c in job.containers])
        if isinstance(error, requests.exceptions.ConnectionError):
            raise error
        labels: dict[str, str] = container.kwargs["labels"]  # type: ignore[assignment]
        reason = (
            f"could not start replica {labels[LABEL_REPLICA_ID]} of role {labels[LABEL_ROLE_NAME]!r} "
            f"from image {container.image!r}: {error}"
        )
        record["state"], record["msg"] = AppState.FAILED.name, reason
        for rep in record["replicas"]:
            rep["lost"], rep["ended"], rep["error"] = (
                True,
                time.time(),
                "was removed: the app could not start",
            )
        self._save_or_warn(record, "it could not start")
        raise RuntimeError(
            f"{reason}. Removed the app's other containers; it is recorded as FAILED"
        ) from error

    def _save_or_warn(self, record: AppRecord, what: str) -> None:
        """Saves a record whose earlier version is written; if this fails, the next reader reconciles."""
        try:
            self._save(record)
        except OSError as e:
            log.warning(
                "app %s: could not record that %s in %s (%s); the next describe or list reconciles "
                "its record with its containers",
                record["app_id"],
                what,
                self.state_dir,
                e,
            )

    def _prepare_images(self, images: Iterable[str], policy: str) -> None:
        for image in sorted(images):
            if image.startswith("sha256:"):
                continue
            if policy == "always":
                try:
                    self._pull(image)
                except DockerException as e:
                    log.warning("failed to pull image %s, falling back to the local copy: %s", image, e)
            elif not self._has_image(image):
                if policy == "never":
                    raise ValueError(
                        f"image {image!r} is not on this Docker host and image_pull=never forbids "
                        "pulling it: "
                        f"run `docker pull {image}` first, or use image_pull=missing"
                    )
                try:
                    self._pull(image)
                except DockerException as e:
                    raise RuntimeError(
                        f"image {image!r} is not on this Docker host and pulling it failed: {e}"
                    ) from e

    def _has_image(self, image: str) -> bool:
        try:
            self._docker_client.api.inspect_image(image)
        except NotFound:
            return False
        return True

    def _pull(self, image: str) -> None:
        """Pulls ``image``, logging progress at most every few seconds."""
        log.info("pulling image %s", image)
        progress = _PullProgress()
        last = time.monotonic()
        for event in self._docker_client.api.pull(image, stream=True, decode=True):
            if "error" in event:
                raise DockerException(event["error"])
            progress.update(event)
            if time.monotonic() - last >= PULL_PROGRESS_INTERVAL:
                last = time.monotonic()
                log.info("pulling %s: %s", image, progress)
        log.info("pulled image %s", image)

    # -- record -----------------------------------------------------------

    def _save(self, record: AppRecord) -> None:
        with self._store.update() as apps:
            apps[record["app_id"]] = record

    def _rebuild_from_docker(self) -> dict[str, AppRecord]:
        return _records_from_containers(self._containers(LABEL_SESSION, self.session_name))

    def _containers(self, label: str, value: str) -> builtins.list[dict[str, Any]]:
        with _reaching_docker():
            found: list[dict[str, Any]] = self._docker_client.api.containers(
                all=True, filters={"label": f"{label}={value}"}
            )
        return found

    def _observe(
        self, record: AppRecord, containers: builtins.list[dict[str, Any]] | None = None
    ) -> tuple[AppRecord, dict[str, AppState]]:
        """Looks at an unfinished app's containers with one Docker request.

        Replicas that ended get their exit code and logs harvested and recorded;
        replicas whose container vanished are recorded lost; logs that could not
        be recorded before are tried again. A record left in state SUBMITTED by
        a process that died while starting it is reconciled with the containers
        that exist. Returns the fresh record and the live states of the
        replicas still going. Harvesting logs never raises.
        """
        app_id = record["app_id"]
        if containers is None:
            containers = self._containers(LABEL_APP_ID, app_id)
        by_name = {_container_name(c): c for c in containers}
        live: dict[str, AppState] = {}
        starting = record["state"] == _STARTING
        if starting and self._start_in_progress(app_id):
            for name, listed in by_name.items():
                live[name] = _CONTAINER_STATES.get(listed["State"], AppState.UNKNOWN)
            return record, live
        ended: dict[str, ReplicaEnd] = {}
        harvest: list[ReplicaRecord] = []
        for rep in record["replicas"]:
            c = by_name.get(rep["name"])
            if _logs_pending(rep) and c is None:
                ended[rep["name"]] = self._logs_lost(rep)
            elif _logs_pending(rep):
                harvest.append(rep)
            elif _is_final(rep):
                continue
            elif c is None:
                never = starting and not os.path.exists(os.path.join(self._log_dir(app_id), _STARTED))
                why = "was never created: the process starting the app ended first" if never else ""
                ended[rep["name"]] = {"lost": True, "ended": time.time(), "error": why}
            elif c["State"] not in _ENDED:
                live[rep["name"]] = _CONTAINER_STATES.get(c["State"], AppState.UNKNOWN)
            else:
                harvest.append(rep)
        for rep, end in zip(harvest, self._harvest_all(app_id, harvest), strict=True):
            if end is None:  # restarted since it was listed
                live[rep["name"]] = AppState.PENDING
            else:
                ended[rep["name"]] = end
        if ended or starting:
            record = self._record_ends(record, ended)
        return record, live

    def _harvest_all(
        self, app_id: str, reps: builtins.list[ReplicaRecord]
    ) -> builtins.list[ReplicaEnd | None]:
        """Harvests replicas that ended together side by side, as many at once as start does."""

        def one(rep: ReplicaRecord) -> ReplicaEnd | None:
            return self._harvest_logs(app_id, rep) if _logs_pending(rep) else self._harvest(app_id, rep)

        if len(reps) < 2:
            return [one(rep) for rep in reps]
        workers = min(_START_WORKERS, len(reps))
        with ThreadPoolExecutor(workers, thread_name_prefix="docker-scheduler-harvest") as pool:
            return builtins.list(pool.map(one, reps))

    def _harvest(self, app_id: str, rep: ReplicaRecord) -> ReplicaEnd | None:
        """Reads an ended replica's exit code, then streams its logs to files.

        Returns None when the container turns out to be going again (restarted since it was listed).
        """
        try:
            inspected = self._docker_client.api.inspect_container(rep["name"])
        except NotFound:
            return {"lost": True, "ended": time.time()}
        state = inspected["State"]
        if state.get("Status") not in _ENDED or state.get("Running") or state.get("Restarting"):
            return None
        end: ReplicaEnd = {
            "exit_code": int(state["ExitCode"]),
            "restarts": int(inspected.get("RestartCount") or 0),
            "error": " (out of memory)" if state.get("OOMKilled") else "",
            "ended": _finished_at(state.get("FinishedAt")),
        }
        if state.get("Error"):
            end["error"] += f" ({state['Error']})"
        end.update(self._harvest_logs(app_id, rep))
        return end

    def _harvest_logs(self, app_id: str, rep: ReplicaRecord) -> ReplicaEnd:
        """Streams an ended replica's stdout and stderr to files; a failure is returned, not raised."""
        api, log_dir = self._docker_client.api, self._log_dir(app_id)
        dests = {_STDOUT: _log_file(log_dir, rep, "stdout"), _STDERR: _log_file(log_dir, rep, "stderr")}
        try:
            os.makedirs(log_dir, mode=0o700, exist_ok=True)
            streams = ("stdout", "stderr")
            with contextlib.closing(
                _log_response(api, rep["name"], streams, timestamps=True, follow=False)
            ) as r:
                _harvest_frames(_frames(r.iter_content(_READ_SIZE)), dests)
        except NotFound:
            return self._logs_lost(rep)
        except (DockerException, OSError, requests.exceptions.RequestException) as e:
            reason, fix = _harvest_failure(e, log_dir)
            self._warn_once(
                rep["name"],
                reason,
                "could not record the logs of container %s (%s): its exit code is recorded and the "
                "container is kept until they are; %s. The next describe, list, log_iter or close "
                "tries again",
                rep["name"],
                reason,
                fix,
            )
            return {"logs": False, "log_error": reason}
        return {"logs": True, "log_error": ""}

    def _logs_lost(self, rep: ReplicaRecord) -> ReplicaEnd:
        log.warning("container %s was removed before its logs were recorded; they are lost", rep["name"])
        return {"logs": False, "log_error": ""}

    def _warn_once(self, subject: str, cause: str, message: str, *args: Any) -> None:
        if (subject, cause) not in self._warned:
            self._warned.add((subject, cause))
            log.warning(message, *args)

    def _log_dir(self, app_id: str) -> str:
        if not _CONTAINER_NAME.fullmatch(app_id):  # it names a directory: no separators, no '..'
            raise ValueError(f"app id {app_id!r} cannot name a log directory")
        return os.path.join(self.state_dir, f"{self.session_name}.logs", app_id)

    def _record_ends(self, seen: AppRecord, ended: dict[str, ReplicaEnd]) -> AppRecord:
        """Records what was learnt of ended replicas; when that write fails, answers from it unrecorded."""
        app_id = seen["app_id"]
        try:
            with self._store.update() as apps:
                if app_id not in apps:  # deleted meanwhile
                    return _with_ends(seen, ended)
                record = _with_ends(apps[app_id], ended)
                apps[app_id] = record
        except OSError as e:
            self._warn_once(
                app_id,
                str(e),
                "could not record the end of app %s in %s (%s); its state comes from Docker until it can",
                app_id,
                self.state_dir,
                e,
            )
            record = _with_ends(seen, ended)
        if record["remove_on_exit"]:
            self._remove([r["name"] for r in record["replicas"] if r["name"] in ended and r["logs"]])
        return record

    def _remove(self, names: builtins.list[str]) -> None:
        api = self._docker_client.api
        for name in names:
            with contextlib.suppress(NotFound):
                api.remove_container(name, force=True)

    # -- query ------------------------------------------------------------

    def describe(self, app_id: str) -> DescribeAppResponse | None:
        """Describes ``app_id`` from the session file, asking Docker only while it runs.

        Returns ``None`` when neither the session file nor Docker knows the app.
        """
        record = self._store.apps().get(app_id)
        if record is None:
            containers = self._containers(LABEL_APP_ID, app_id)
            if not containers:
                return None
            record = _records_from_containers(containers)[app_id]
            return _describe_record(record, {_container_name(c): _listed_state(c) for c in containers})
        live: dict[str, AppState] = {}
        if not _settled(record):
            record, live = self._observe(record)
        elif _asks_docker(record):
            with contextlib.suppress(DockerUnavailableError):  # only its logs are missing: retry later
                record, live = self._observe(record)
        return _describe_record(record, live)

    def describe_native(self, app_id: str) -> AppDryRunInfo[DockerJob] | None:
        """The request ``app_id`` was scheduled with, rebuilt from the session file.

        For each container: its image, command and ``docker create`` kwargs
        (environment, labels, hostname, network, mounts, devices, privileged,
        restart policy, limits), with docker-py's ``Mount``, ``DeviceRequest``
        and similar types rebuilt. It needs no container, so it answers after
        they are removed and in any process. Returns ``None`` for an app id the
        session file does not hold.
        """
        record = self._store.apps().get(app_id)
        if record is None:
            return None
        return AppDryRunInfo(_job_from_record(record), repr)

    def list(self, cfg: Mapping[str, Any] | None = None) -> builtins.list[ListAppResponse]:
        """This session's apps with their states, oldest first.

        Containers labelled with this session that the session file lacks are
        listed too; other sessions' apps are not. ``cfg`` is accepted as torchx
        main passes it, and not needed.
        """
        apps = self._store.apps()
        try:
            containers: list[dict[str, Any]] | None = self._containers(LABEL_SESSION, self.session_name)
        except DockerUnavailableError as e:
            log.warning("listing from the session file only: %s", e)
            containers = None
        by_app: dict[str, list[dict[str, Any]]] = {}
        for c in containers or []:
            by_app.setdefault(c["Labels"][LABEL_APP_ID], []).append(c)
        found = []
        for app_id, record in sorted(apps.items(), key=lambda item: item[1].get("created", 0)):
            live: dict[str, AppState] = {}
            if containers is not None and _asks_docker(record):
                record, live = self._observe(record, by_app.get(app_id, []))
            found.append(ListAppResponse(app_id=app_id, state=_record_state(record, live)))
        for app_id, group in by_app.items():
            if app_id not in apps:
                states = [_listed_state(c) for c in group]
                found.append(ListAppResponse(app_id=app_id, state=_app_state(None, states)))
        return found

    def log_iter(
        self,
        app_id: str,
        role_name: str,
        k: int = 0,
        regex: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        should_tail: bool = False,
        streams: Stream | None = None,
    ) -> Iterable[str]:
        """Lines of one replica's log, each ending in a newline (but maybe the last).

        Served live from Docker while the container exists and from the
        harvested files once the replica ended, with the same meaning for every
        parameter: ``since``/``until`` are inclusive and naive datetimes are UTC,
        ``should_tail`` follows until the replica exits, ``streams`` picks stdout,
        stderr or both (the default), ``regex`` keeps matching lines.

        Raises:
            ValueError: for an unknown app, role or replica index; it names the valid ones.
        """
        rep = self._find_replica(app_id, role_name, k)
        wanted = [
            s for s, on in (("stdout", streams != Stream.STDERR), ("stderr", streams != Stream.STDOUT)) if on
        ]
        if _logs_pending(rep):  # recording them failed before: try again first
            with contextlib.suppress(DockerUnavailableError):
                rep = self._refreshed(app_id, rep)
        lines: Iterator[bytes] | None = None
        if not rep["logs"]:
            try:
                lines = self._live_lines(rep["name"], wanted, since, until, should_tail)
            except NotFound:  # the container went away: maybe another process harvested it first
                rep = self._refreshed(app_id, rep)
            except docker.errors.APIError as e:  # e.g. a logging driver Docker cannot read back
                log.warning("Docker cannot serve the logs of %s: %s", rep["name"], e.explanation or e)
                lines = iter(())
        if lines is None and rep["logs"]:
            log_dir = self._log_dir(app_id)
            lines = _harvested_lines([_log_file(log_dir, rep, s) for s in wanted], since, until)
        if lines is None:
            log.warning(
                "the logs of %s are lost: its container was removed before they were read", rep["name"]
            )
            lines = iter(())
        text = (line.decode("utf-8", "replace") for line in lines)
        return filter_regex(regex, text) if regex else text

    def _find_replica(self, app_id: str, role_name: str, k: int) -> ReplicaRecord:
        record = self._store.apps().get(app_id) or self._records_for(app_id)
        if record is None:
            raise ValueError(f"no app {app_id!r} in session {self.session_name!r} or in Docker")
        roles = {r["name"]: r["num_replicas"] for r in record["roles"]}
        if role_name not in roles:
            raise ValueError(f"app {app_id!r} has no role {role_name!r}; its roles are {sorted(roles)}")
        for rep in record["replicas"]:
            if rep["role"] == role_name and rep["id"] == k:
                return rep
        raise ValueError(
            f"role {role_name!r} of app {app_id!r} has no replica {k}; "
            f"valid replica indices are 0 to {roles[role_name] - 1}"
        )

    def _live_lines(
        self,
        name: str,
        wanted: builtins.list[str],
        since: datetime | None,
        until: datetime | None,
        follow: bool,
    ) -> Iterator[bytes]:
        with _reaching_docker():
            response = _log_response(
                self._docker_client.api,
                name,
                wanted,
                timestamps=False,
                follow=follow,
                since=_epoch(since),
                until=_epoch(until),
            )
        return _whole_lines(payload for _, payload in _frames(response.iter_content(_READ_SIZE)))

    def _refreshed(self, app_id: str, rep: ReplicaRecord) -> ReplicaRecord:
        """``rep`` as recorded after looking at the app's containers again."""
        record = self._store.apps().get(app_id)
        if record is None:
            return rep
        record, _ = self._observe(record)
        return next(r for r in record["replicas"] if r["name"] == rep["name"])

    # -- cancel, delete and close -----------------------------------------

    def cancel(self, app_id: str) -> None:
        """Stops ``app_id``'s containers; from then on every process sees CANCELLED.

        An app that already ended keeps its state; an unknown app id is logged and ignored.
        """
        if not self.exists(app_id):
            log.warning(
                "cancel: no app %r in session %r or in Docker; nothing to do", app_id, self.session_name
            )
            return
        self._cancel_existing(app_id)

    def _cancel_existing(self, app_id: str) -> None:
        recorded = self._store.apps().get(app_id)
        if recorded is not None and _settled(recorded):
            log.info("cancel: app %s already ended; nothing to do", app_id)
            return
        with self._store.update() as apps:
            # An app known to Docker only is adopted, so that its cancel is recorded.
            record = apps.get(app_id) or self._records_for(app_id)
            if record is None:
                log.info("cancel: app %s has no containers left; nothing to do", app_id)
                return
            if record["state"] is None and not any(_failed(r) for r in record["replicas"]):
                record = copy.deepcopy(record)  # an app that already failed stays FAILED
                record["state"] = AppState.CANCELLED.name
                apps[app_id] = record
        self._stop([r["name"] for r in record["replicas"] if not _is_final(r)])
        self._observe(record)

    def delete(self, app_id: str) -> None:
        """Forgets ``app_id``: stops what still runs, then removes its containers,
        its harvested logs and, last, its record in the session file.

        Afterwards ``describe`` returns ``None``, ``list`` omits the app and
        ``log_iter`` raises ``ValueError``; the session's other apps are
        untouched. An unknown app id is logged at debug level and ignored.
        (``torchx delete`` calls this on torchx main.)
        """
        recorded = self._store.apps().get(app_id)
        containers = self._containers(LABEL_APP_ID, app_id)
        if recorded is None and not containers:
            log.debug(
                "delete: no app %r in session %r or in Docker; nothing to do", app_id, self.session_name
            )
            return
        self._stop(
            [_container_name(c) for c in containers if c["State"] not in _ENDED | {"created", "configured"}]
        )
        with _reaching_docker():
            self._remove([_container_name(c) for c in containers])
        # The record goes last: until then a crash leaves the app listed, and delete can run again.
        if _CONTAINER_NAME.fullmatch(app_id):
            shutil.rmtree(self._log_dir(app_id), ignore_errors=True)
        with self._store.update() as apps:
            apps.pop(app_id, None)
        log.info("deleted app %s from session %s", app_id, self.session_name)

    def prune(self, older_than: timedelta) -> builtins.list[str]:
        """Deletes, as :py:meth:`delete` does, this session's apps that ended longer ago than ``older_than``.

        An app's end is when its last replica's end was recorded. Apps still
        pending or running, and other sessions' apps, are never touched.

        Returns:
            The ids of the apps deleted, oldest first.
        """
        cutoff = time.time() - older_than.total_seconds()
        pruned = []
        for app_id, record in sorted(self._store.apps().items(), key=lambda item: item[1]["created"]):
            if not _settled(record):
                record, _ = self._observe(record)
            if _settled(record) and _ended_at(record) < cutoff:
                self.delete(app_id)
                pruned.append(app_id)
        return pruned

    def _records_for(self, app_id: str) -> AppRecord | None:
        """A record for ``app_id`` built from its containers, or None when Docker has none."""
        return _records_from_containers(self._containers(LABEL_APP_ID, app_id)).get(app_id)

    def _stop(self, names: builtins.list[str]) -> None:
        api = self._docker_client.api

        def stop(name: str) -> None:
            with contextlib.suppress(NotFound):
                api.stop(name, timeout=STOP_TIMEOUT)

        with _reaching_docker(), ThreadPoolExecutor(max(1, min(_START_WORKERS, len(names)))) as pool:
            list(pool.map(stop, names))

    def close(self) -> None:
        """Ends this instance; idempotent, never raises.

        Unless ``detach=True``, the apps this instance scheduled that still run
        are stopped and recorded CANCELLED, every exit code and log is
        harvested, and this instance's containers are removed. Garbage
        collection and interpreter exit never stop anything.
        """
        if self._closed:
            return
        self._closed = True
        if not self.detach:
            for app_id in self._scheduled:
                try:
                    self._shut_down(app_id)
                except Exception as e:
                    log.warning("close: could not shut down app %s: %s", app_id, e)
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()

    def _shut_down(self, app_id: str) -> None:
        record = self._store.apps().get(app_id)
        if record is None:
            return
        if _asks_docker(record):
            record, _ = self._observe(record)
        if not _settled(record):
            self._cancel_existing(app_id)
            record = self._store.apps()[app_id]
        done = [
            r["name"] for r in record["replicas"] if r["lost"] or (r["exit_code"] is not None and r["logs"])
        ]
        kept = [r["name"] for r in record["replicas"] if r["name"] not in done]
        if kept:
            log.warning("close: keeping containers %s: their logs could not be recorded", kept)
        self._remove(done)


# ---------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------


def create_scheduler(
    session_name: str, state_dir: str | None = None, detach: bool = True, **kwargs: Any
) -> PersistentDockerScheduler:
    """The torchx scheduler factory (entry point ``local_docker_persistent``).

    ``detach`` defaults to True here, unlike the class: torchx's CLI and
    ``Runner`` close their schedulers when they exit, and an app started with
    ``torchx run`` must outlive the CLI. Other keyword arguments are ignored.
    """
    if kwargs:
        log.debug("create_scheduler ignores %s", sorted(kwargs))
    return PersistentDockerScheduler(session_name, state_dir=state_dir, detach=detach)
