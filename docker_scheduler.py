"""A torchx scheduler for local Docker that keeps a durable record of every app.

torchx's ``local_docker`` asks Docker for everything, so once a container is gone its exit code and
logs are gone too. :py:class:`PersistentDockerScheduler` records each app in a pickled session file
(the roles as submitted, every replica's exit code) and each ended replica's stdout and stderr in files
beside it, so ``describe``, ``log_iter`` and ``list`` answer after the containers are removed, in any
process. It depends on ``docker`` and ``torchx`` only: copy this file into a project, or ``pip install``
it. The README shows how to use it.

The module reads top to bottom in the order data flows, one concern a section: labels and constants;
run options; input checks; records and the rules on them; the state directory; the session store; the
Docker adapter; logs (harvested and served); ownership; reconciliation; the scheduler, a thin torchx
surface over them; and the factory.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import dataclasses
import errno
import fcntl
import functools
import hashlib
import heapq
import io
import itertools
import json
import logging
import math
import os
import pickle
import re
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import typing
import urllib.parse
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, TypeVar, cast

import docker
import docker.tls
import docker.types
import requests
import torchx.schedulers.docker_scheduler as _torchx_docker
from docker.errors import DockerException, NotFound
from torchx.schedulers.api import DescribeAppResponse, ListAppResponse, Stream, filter_regex
from torchx.schedulers.docker_scheduler import (
    CONTAINER_STATE,
    LABEL_APP_ID,
    LABEL_REPLICA_ID,
    LABEL_ROLE_NAME,
    NETWORK,
    DockerContainer,
    DockerJob,
    DockerScheduler,
)
from torchx.specs.api import (
    AppDef,
    AppDryRunInfo,
    AppState,
    CfgVal,
    ReplicaStatus,
    Role,
    RoleStatus,
    is_terminal,
    runopts,
)
from torchx.util.types import to_dict

try:  # docker-py reaches ssh only with paramiko installed, through the ssh command too
    from docker.transport.sshconn import SSHConnection, SSHConnectionPool, SSHHTTPAdapter, SSHSocket
except ImportError:
    SSHConnection = SSHConnectionPool = SSHHTTPAdapter = SSHSocket = object

if TYPE_CHECKING:
    from docker import DockerClient

__all__ = [
    "DockerUnavailableError",
    "OtherEngineError",
    "PersistentDockerScheduler",
    "UnsafeStateError",
    "create_scheduler",
    "log",
]

log: logging.Logger = logging.getLogger(__name__)


def _warn_once(seen: set[tuple[str, str]], key: tuple[str, str], message: str) -> None:
    """Logs a warning the first time ``key`` (a subject and a cause) comes up in ``seen``."""
    if key not in seen:
        seen.add(key)
        log.warning(message)


# == Labels and constants =====================================================

#: Label that ties a container to its session, beside torchx's app/role/replica labels.
LABEL_SESSION = "docker-scheduler/session"
#: Label that ties a container to its state directory, by the identity kept in :py:data:`IDENTITY_FILE`.
LABEL_STATE_DIR = "docker-scheduler/state-dir"
#: The file in a state directory that holds its identity, apart from any session file.
IDENTITY_FILE = "state_dir.id"
#: The session file's shape; a file of any other is moved aside and the session rebuilt from Docker.
FORMAT_VERSION = 3
#: Environment variable naming the state directory when ``state_dir`` is not given.
STATE_DIR_ENV = "DOCKER_SCHEDULER_STATE_DIR"
#: Seconds Docker waits after SIGTERM before SIGKILL, as ``docker stop`` does.
STOP_TIMEOUT = 10
#: The ``image_pull`` policies, and the one taken when none is given (``local_docker`` always pulls).
IMAGE_PULL_POLICIES = ("always", "missing", "never")
DEFAULT_IMAGE_PULL = "always"
#: Seconds between two progress lines of a long image pull.
PULL_PROGRESS_INTERVAL = 3.0
#: At most this many replicas in one app, over all its roles (each is a container on this machine).
MAX_REPLICAS = 256
#: Seconds after starting an app in which :py:meth:`PersistentDockerScheduler.describe` waits for it to end.
SETTLE_TIME = 0.25

# Docker refuses container names outside this pattern; app ids and log directories follow it too.
_CONTAINER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")
_ACTIVE = (AppState.SUBMITTED, AppState.PENDING, AppState.RUNNING)
# The file in an app's log directory that says schedule() started all its containers.
_STARTED = ".started"
# At most this many Docker requests of one kind (create, stop, remove, harvest) run at once.
_DOCKER_WORKERS = 8
# Log bodies are read, and log files written, in blocks of this many bytes.
_READ_SIZE = 1 << 20
# Where docker-py, and the Docker CLI, look for the engine when nothing else names one.
_DEFAULT_SOCKET = "unix:///var/run/docker.sock"


# == Run options, and the one place that knows torchx versions apart ==========
# torchx 0.7 declares a scheduler's options as ``runopts`` and hands ``cfg`` over as a dict; torchx main
# (``torchx-nightly``) declares them as a dataclass extending its ``StructuredOpts`` and hands ``cfg``
# over as that dataclass. Both read with ``cfg.get(name)``. Everything version-dependent is below.

# torchx main's ``local_docker`` options (copy_env, env, privileged); None on 0.7.
_TorchxDockerOpts: Any = getattr(_torchx_docker, "Opts", None)


def _option(default: Any, type_: Any, help: str) -> Any:
    """A run option: a dataclass field that carries its runopts type and help."""
    return dataclasses.field(default=default, metadata={"type": type_, "help": help})


@dataclasses.dataclass
class PersistentDockerOpts(_TorchxDockerOpts or object):  # type: ignore[misc]
    """The run options this scheduler adds to ``local_docker``'s: on torchx main, the scheduler's options
    type (``cfg`` arrives as an instance, ``local_docker``'s fields inherited); on torchx 0.7 its fields
    are added to ``local_docker``'s ``runopts``."""

    image_pull: str = _option(
        DEFAULT_IMAGE_PULL, str, "when to pull each role's image: always (as local_docker), missing or never"
    )
    remove_on_exit: bool = _option(
        False, bool, "remove each container once its exit code and logs are recorded in the session"
    )
    shm_size: str | None = _option(
        None, str, "size of /dev/shm in every container, e.g. 256m or 16g (docker run --shm-size)"
    )
    ipc_mode: str | None = _option(
        None, str, "IPC namespace of every container: private, shareable, host, none or container:<name>"
    )
    ulimits: list[str] | None = _option(
        None,
        typing.List[str],  # noqa: UP006  torchx 0.7 parses an option typed exactly so as a list
        "resource limits of every container, name=soft[:hard] each (docker run --ulimit); within -cfg, "
        "where = and , separate options, write name:soft[:hard]: ulimits=nofile:1024:2048,memlock:-1",
    )
    stop_timeout: int = _option(
        STOP_TIMEOUT, int, "seconds between SIGTERM and SIGKILL when a container is stopped (Docker's: 10)"
    )

    @classmethod
    def get_docstrings(cls) -> dict[str, str]:
        # torchx main takes help from attribute docstrings; ours sits in each field's metadata.
        helps = {f.name: f.metadata["help"] for f in dataclasses.fields(cls) if "help" in f.metadata}
        return {**_TorchxDockerOpts.get_docstrings(), **helps}


# ``AppDryRunInfo[DockerJob]`` on torchx 0.7, ``AppDryRunInfo[DockerJob, Opts]`` on main
# (its second parameter, the cfg type, is invariant): one annotation cannot name both.
_DryRun = Any


class _RunOpts(runopts):
    """Run options that keep a ``-cfg`` value as given when it does not cast to its option's type
    (``stop_timeout=abc``), so that torchx's type check names the option where its CLI reports errors;
    torchx's own parsing lets ``int('abc')``'s ValueError out, naming nothing, before its CLI can."""

    def cfg_from_str(self, cfg_str: str) -> dict[str, CfgVal]:
        try:
            return super().cfg_from_str(cfg_str)
        except ValueError:
            cfg: dict[str, CfgVal] = {}
            for key, value in to_dict(cfg_str).items():
                try:
                    cfg.update(super().cfg_from_str(f"{key}={value}"))
                except ValueError:
                    cfg[key] = value
            return cfg


def _runopts(torchx_opts: runopts) -> runopts:
    """``local_docker``'s run options (as torchx 0.7 declares them) and ours."""
    opts = _RunOpts()
    if _TorchxDockerOpts is not None:
        opts.update(PersistentDockerOpts.as_runopts())
        return opts
    for f in dataclasses.fields(PersistentDockerOpts):
        default = cast(CfgVal, f.default)
        torchx_opts.add(f.name, type_=f.metadata["type"], default=default, help=f.metadata["help"])
    opts.update(torchx_opts)
    return opts


def _waits_for_ever(caller: types.FrameType) -> bool:
    """Whether torchx 0.7's ``torchx log`` asked (``get_logs`` through ``Runner.status``): it waits for as
    long as describe() answers None, so an app id nobody knows would keep it waiting for ever."""
    asker = caller.f_back
    where = (asker.f_globals.get("__name__"), asker.f_code.co_name) if asker else None
    return where == ("torchx.cli.cmd_log", "get_logs")


def _submitted(info: _DryRun) -> tuple[AppDef | None, dict[str, Any]]:
    """The AppDef and ``cfg`` that ``submit_dryrun`` attached (torchx main: app, 0.7: _app), or none."""
    app = getattr(info, "app", None) or getattr(info, "_app", None)
    cfg = getattr(info, "cfg", None) or getattr(info, "_cfg", None) or {}
    return app, {key: cfg[key] for key in cfg}


# == Input checks: run options and AppDefs, before anything is created ========


def _image_pull(cfg: Mapping[str, Any]) -> str:
    policy = cfg.get("image_pull") or DEFAULT_IMAGE_PULL
    if policy not in IMAGE_PULL_POLICIES:
        raise ValueError(f"image_pull={policy!r} is not one of {', '.join(IMAGE_PULL_POLICIES)}")
    return str(policy)


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


def _stop_timeout(cfg: Mapping[str, Any]) -> int:
    value = cfg.get("stop_timeout")
    if value is None:
        return STOP_TIMEOUT
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"stop_timeout={value!r} is not a whole number of seconds, 0 or more: e.g. stop_timeout=30 "
            f"(Docker's default is {STOP_TIMEOUT})"
        )
    return value


def _container_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``docker create`` kwargs that shm_size, ipc_mode and ulimits ask for, checked (ValueError)."""
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
        # A replica's log file is <role>.<replica>.stdout, and a file name holds at most 255 bytes.
        if len(f"{role.name}.{role.num_replicas - 1}.stdout".encode()) > 255:
            raise ValueError(
                f"role name {role.name[:40]!r}... ({len(role.name)} characters) is too long to name its "
                "replicas' log files: keep it under 240 characters"
            )
    replicas = sum(role.num_replicas for role in app.roles)
    if replicas > MAX_REPLICAS:
        raise ValueError(
            f"app {app.name!r} asks for {replicas} replicas; at most {MAX_REPLICAS} run in one app on one "
            "Docker host: split it into several apps, or run it on a cluster scheduler"
        )


def _check_container_names(app: AppDef, app_id: str, names: Iterable[str]) -> None:
    suffix = len(app_id.encode()) - len(app.name.encode())
    if len(app_id.encode()) > 255:  # the app id names its log directory: at most 255 bytes
        raise ValueError(
            f"app name {app.name[:40]!r}... ({len(app.name)} characters) is too long: its app id names a "
            f"directory of the state directory; keep the name under {255 - suffix} characters"
        )
    for name in [app_id, *names]:
        if not _CONTAINER_NAME.fullmatch(name):
            raise ValueError(
                f"app name {app.name!r} gives the name {name!r}, which Docker refuses for a container: "
                "use letters, digits, '_', '.' and '-', starting with a letter or digit"
            )


# == Records ==================================================================
# Records are frozen dataclasses: a change is a new record (``dataclasses.replace``), so the store can tell
# what changed by identity and no edit is ever lost. On disk each is a plain dict of builtin types, so that
# upgrading torchx or docker never breaks reading a session file, checked field by field when read back.

#: Where a replica's stdout and stderr are: still in its container, recorded in the log directory, failed
#: to record (retried; the container is kept), or gone with a container removed before they were read.
LogStatus = Literal["in_container", "recorded", "retry", "lost"]


#: A record's fields that name the engine it belongs to: see :py:meth:`_Docker.engine`.
class _Engine(typing.TypedDict):
    engine_endpoint: str
    engine_context: str
    engine_id: str


#: The ``since`` and ``until`` of a log read (None: unbounded).
_Window = tuple["datetime | None", "datetime | None"]


class _CorruptSession(Exception):
    """A session file, or a record in it, that does not have the expected shape."""


_T = TypeVar("_T")
_R = TypeVar("_R")


def _from_dict(cls: type[_T], data: Any) -> _T:
    """A record of ``cls`` from its plain dict, each field checked against its annotation."""
    if not isinstance(data, dict):
        raise _CorruptSession(f"{cls.__name__} is {type(data).__name__}, not a dict")
    hints, values = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            values[f.name] = _as_type(hints[f.name], data[f.name])
        elif f.default is dataclasses.MISSING:  # a field added later has a default; others must be there
            raise _CorruptSession(f"{cls.__name__} has no field {f.name!r}")
    return cls(**values)


def _to_dict(value: Any) -> Any:
    """A record as builtin types: its fields as a dict, but those at their defaults (read back so)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ((f.name, getattr(value, f.name), f.default) for f in dataclasses.fields(value))
        return {name: _to_dict(v) for name, v, default in fields if v is not default and v != default}
    if isinstance(value, tuple):
        return tuple(_to_dict(v) for v in value)
    return value


def _as_type(hint: Any, value: Any) -> Any:
    """``value`` if it is of type ``hint`` (lists become tuples, dicts nested records); else raises."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value)  # type: ignore[arg-type]
    if origin is typing.Union or origin is types.UnionType:
        return _as_type(args[0], value) if value is not None else _as_type(args[1], value)
    if origin is Literal and value in args:
        return value
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(_as_type(args[0], v) for v in value)
    if origin is Mapping and isinstance(value, dict):
        return {_as_type(args[0], k): _as_type(args[1], v) for k, v in value.items()}
    if hint is Any or (origin is None and isinstance(value, hint) and not (hint is int and value is True)):
        return float(value) if hint is float else value
    if hint is float and isinstance(value, int):
        return float(value)
    raise _CorruptSession(f"{type(value).__name__} {value!r:.60} is not {hint}")


@dataclasses.dataclass(frozen=True)
class RoleRecord:
    """A role as submitted."""

    #: the role's name, unique within the app
    name: str
    #: the image its replicas ran
    image: str
    #: the command, and its arguments
    entrypoint: str
    args: tuple[str, ...]
    #: the environment the role asked for (not what torchx or ``env``/``copy_env`` added)
    env: Mapping[str, str]
    num_replicas: int
    max_retries: int

    @classmethod
    def of(cls, role: Role) -> RoleRecord:
        env = {str(k): str(v) for k, v in role.env.items()}
        args = tuple(str(a) for a in role.args)
        return cls(role.name, role.image, role.entrypoint, args, env, role.num_replicas, role.max_retries)

    def to_role(self) -> Role:
        role = Role(
            self.name, self.image, entrypoint=self.entrypoint, args=list(self.args), env=dict(self.env)
        )
        role.num_replicas, role.max_retries = self.num_replicas, self.max_retries
        return role


@dataclasses.dataclass(frozen=True)
class ContainerRequest:
    """What ``docker create`` was given for one replica; docker-py's helper types as plain dicts."""

    image: str
    command: tuple[str, ...]
    #: the keyword arguments, builtin types only (see :py:func:`_builtins_only`)
    kwargs: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class ReplicaRecord:
    """One replica (one container) and what is known of its end."""

    role: str
    id: int
    #: the container's name (and hostname)
    name: str
    #: None for apps adopted from their containers (known only from Docker's labels)
    request: ContainerRequest | None = None
    #: set once the container ended and its exit code was read
    exit_code: int | None = None
    #: what Docker said beside the exit code, e.g. "out of memory"
    exit_note: str = ""
    restarts: int = 0
    #: why the exit code can never be read (one of the ``_GONE_*`` reasons); empty while it can be
    vanished: str = ""
    #: when the end was seen, in epoch seconds (Docker's finish time where it has one)
    ended: float | None = None
    logs: LogStatus = "in_container"
    #: why the logs could not be recorded, while ``logs`` is "retry"
    log_error: str = ""

    @property
    def final(self) -> bool:
        """Whether its end is known: an exit code, or the knowledge that there will be none."""
        return self.exit_code is not None or bool(self.vanished)

    @property
    def failed(self) -> bool:
        return self.exit_code not in (None, 0)

    @property
    def logs_pending(self) -> bool:
        """Whether it ended but its logs could not be recorded yet (they are retried)."""
        return self.final and self.logs == "retry"


# Why a replica's exit code can never be read (:py:attr:`ReplicaRecord.vanished`).
_GONE_BEFORE_READ = "vanished before its exit code could be read"
_GONE_NEVER_CREATED = "was never created: the process starting the app ended first"
_GONE_START_FAILED = "was removed: the app could not start"


@dataclasses.dataclass(frozen=True)
class _Change:
    """What was learnt of one replica, to set on its record; a field left None stays as it was."""

    exit_code: int | None = None
    exit_note: str | None = None
    restarts: int | None = None
    vanished: str | None = None
    ended: float | None = None
    logs: LogStatus | None = None
    log_error: str | None = None

    @classmethod
    def gone(cls, why: str, now: float) -> _Change:
        """The container is gone: its exit code and its logs with it."""
        return cls(vanished=why, ended=now, logs="lost")

    @classmethod
    def of_logs(cls, status: LogStatus, error: str = "") -> _Change:
        return cls(logs=status, log_error=error)

    def __or__(self, later: _Change) -> _Change:
        """This change with ``later``'s fields over it."""
        return dataclasses.replace(self, **later._set())

    def applied(self, rep: ReplicaRecord) -> ReplicaRecord:
        return dataclasses.replace(rep, **self._set())

    def _set(self) -> dict[str, Any]:
        return {name: value for name, value in vars(self).items() if value is not None}


@dataclasses.dataclass(frozen=True)
class AppRecord:
    """One app of a session, as the session file keeps it."""

    app_id: str
    #: when it was scheduled, in epoch seconds
    created: float
    roles: tuple[RoleRecord, ...]
    replicas: tuple[ReplicaRecord, ...]
    remove_on_exit: bool = False
    #: recorded by schedule() before it creates anything; cleared by the first reader after
    starting: bool = False
    cancelled: bool = False
    #: why schedule() could not start the app (which then reads FAILED)
    start_error: str = ""
    #: seconds between SIGTERM and SIGKILL when its containers are stopped
    stop_timeout: int = STOP_TIMEOUT
    #: the Docker endpoint, the context that named it (if one did) and the engine's ID it was
    #: scheduled on (for an adopted app, the engine whose containers it was adopted from)
    engine_endpoint: str = ""
    engine_context: str = ""
    engine_id: str = ""

    @property
    def settled(self) -> bool:
        """Whether every replica's end is known."""
        return all(rep.final for rep in self.replicas)

    @property
    def asks_docker(self) -> bool:
        """Whether Docker has something for it: a replica still going, or logs to record."""
        return not self.settled or any(rep.logs_pending for rep in self.replicas)

    @property
    def ended_at(self) -> float:
        """When the last replica's end was seen (its creation while none was)."""
        return max((rep.ended or self.created for rep in self.replicas), default=self.created)

    def with_changes(self, changes: Mapping[str, _Change]) -> AppRecord:
        """This record with what was learnt of its replicas (by container name); a replica whose end
        is recorded already (by another process, meanwhile) takes only a second try at its logs."""
        replicas = tuple(
            changes[rep.name].applied(rep)
            if rep.name in changes and (not rep.final or rep.logs_pending)
            else rep
            for rep in self.replicas
        )
        return dataclasses.replace(self, replicas=replicas)

    def with_cancel(self) -> AppRecord:
        """This record once a cancel was asked for: CANCELLED, unless it failed already (it stays FAILED)."""
        if self.start_error or any(rep.failed for rep in self.replicas):
            return self
        return dataclasses.replace(self, cancelled=True)


# -- building records ---------------------------------------------------------

# docker-py's helper types are dicts underneath: kept as plain dicts, rebuilt on the way out.
_DOCKER_TYPES: dict[str, type[dict[str, Any]]] = {
    "mounts": docker.types.Mount,
    "device_requests": docker.types.DeviceRequest,
    "ulimits": docker.types.Ulimit,
    "log_config": docker.types.LogConfig,
}


def _builtins_only(value: Any) -> Any:
    """``value`` with builtin types only, as the restricted unpickler reads them."""
    if isinstance(value, dict):
        return {str(k): _builtins_only(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_builtins_only(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool, bytes)):
        return value
    return str(value)


def _container_kwargs(plain: Mapping[str, Any]) -> dict[str, Any]:
    """The kwargs of a recorded request, with docker-py's helper types rebuilt."""
    kwargs = copy.deepcopy(dict(plain))
    for key, cls in _DOCKER_TYPES.items():
        value = kwargs.get(key)
        if isinstance(value, list):
            kwargs[key] = [_docker_typed(cls, v) if isinstance(v, dict) else v for v in value]
        elif isinstance(value, dict):
            kwargs[key] = _docker_typed(cls, value)
    return kwargs


def _docker_typed(cls: type[dict[str, Any]], value: dict[str, Any]) -> Any:
    typed = cls.__new__(cls)  # their constructors take other spellings than the dicts they build
    typed.update(value)
    return typed


def _record_from_job(
    job: DockerJob, app: AppDef | None, cfg: Mapping[str, Any], engine: _Engine
) -> AppRecord:
    """The record schedule() writes before it creates anything: starting, no end seen."""
    replicas = []
    for c in job.containers:
        labels: dict[str, str] = c.kwargs["labels"]  # type: ignore[assignment]
        request = ContainerRequest(c.image, tuple(str(a) for a in c.command), _builtins_only(c.kwargs))
        role, replica_id = labels[LABEL_ROLE_NAME], int(labels[LABEL_REPLICA_ID])
        replicas.append(ReplicaRecord(role, replica_id, str(c.kwargs["name"]), request))
    if app is not None:
        roles = tuple(RoleRecord.of(r) for r in app.roles)
    else:  # a hand-made AppDryRunInfo: the containers are all there is
        commands = {c.kwargs["name"]: (c.image, c.command) for c in job.containers}
        roles = _roles_from_replicas(replicas, commands)
    remove, stop = bool(cfg.get("remove_on_exit")), _stop_timeout(cfg)
    return AppRecord(
        job.app_id, time.time(), roles, tuple(replicas), remove, starting=True, stop_timeout=stop, **engine
    )


def _roles_from_replicas(
    replicas: Sequence[ReplicaRecord], commands: Mapping[Any, tuple[str, Sequence[str]]]
) -> tuple[RoleRecord, ...]:
    roles: dict[str, RoleRecord] = {}
    for rep in replicas:
        image, command = commands.get(rep.name, ("", []))
        known = roles.get(rep.role)
        if known is not None:
            roles[rep.role] = dataclasses.replace(known, num_replicas=known.num_replicas + 1)
        else:
            entrypoint, args = (command[0], tuple(command[1:])) if command else ("", ())
            roles[rep.role] = RoleRecord(rep.role, image, entrypoint, args, {}, 1, 0)
    return tuple(roles.values())


def _container_name(container: Mapping[str, Any]) -> str:
    return str(container["Names"][0]).lstrip("/")


def _by_app(containers: Iterable[Mapping[str, Any]]) -> dict[str, builtins.list[Mapping[str, Any]]]:
    """Listed containers grouped by the app id label."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for c in containers:
        groups.setdefault(c["Labels"][LABEL_APP_ID], []).append(c)
    return groups


def _records_from_containers(
    containers: Iterable[Mapping[str, Any]], engine: Callable[[], _Engine]
) -> dict[str, tuple[AppRecord, dict[str, AppState]]]:
    """Records for apps known only from their containers, with their live states, on ``engine()``."""
    adopted = {}
    for app_id, group in _by_app(containers).items():
        ids = sorted(
            (c["Labels"][LABEL_ROLE_NAME], int(c["Labels"][LABEL_REPLICA_ID]), _container_name(c))
            for c in group
        )
        replicas = tuple(ReplicaRecord(role, k, name) for role, k, name in ids)
        commands = {_container_name(c): (c["Image"], str(c.get("Command", "")).split()) for c in group}
        record = AppRecord(
            app_id, time.time(), _roles_from_replicas(replicas, commands), replicas, **engine()
        )
        adopted[app_id] = record, {_container_name(c): _container_state(c) for c in group}
    return adopted


def _job_from_record(record: AppRecord) -> DockerJob:
    """The request as scheduled; for an adopted app, what its record knows of it."""
    roles = {r.name: r for r in record.roles}
    containers = []
    for rep in record.replicas:
        request = rep.request
        if request is None:
            role = roles[rep.role]
            env = dict(role.env)
            request = ContainerRequest(
                role.image, (role.entrypoint, *role.args), {"name": rep.name, "environment": env}
            )
        kwargs: dict[str, object] = _container_kwargs(request.kwargs)
        containers.append(DockerContainer(request.image, list(request.command), kwargs))
    return DockerJob(app_id=record.app_id, containers=containers)


# -- states -------------------------------------------------------------------
# A container's state in torchx's terms: dockerd's states as torchx maps them, and
# the ones Podman's API adds. The one table; every reading goes through it.
#
#   container state                                    torchx state
#   created, configured                                SUBMITTED
#   restarting, paused, removing, initialized, stopped PENDING (Podman's "stopped" lies between
#                                                      a process's end and a restart or clean-up)
#   running, stopping                                  RUNNING
#   exited                                             SUCCEEDED on exit code 0, else FAILED
#   dead                                               FAILED
#   anything else                                      UNKNOWN
#
# A listed container's exit code comes from its Status ("Exited (137) 3 seconds ago");
# a recorded replica's from ``docker inspect``, once, when its end is recorded.
_CONTAINER_STATES: dict[str, AppState] = {
    **CONTAINER_STATE,
    "configured": AppState.SUBMITTED,
    "initialized": AppState.PENDING,
    "stopped": AppState.PENDING,
    "stopping": AppState.RUNNING,
}
#: States of a container that is done: its exit code is final.
_ENDED = frozenset({"exited", "dead"})
_EXITED_STATUS = re.compile(r"Exited \((-?\d+)\)")


def _container_state(container: Mapping[str, Any]) -> AppState:
    """A listed container's state in torchx's terms (see the table above)."""
    if container["State"] == "exited":
        match = _EXITED_STATUS.match(container.get("Status") or "")
        if match is None:
            return AppState.UNKNOWN
        return AppState.SUCCEEDED if int(match.group(1)) == 0 else AppState.FAILED
    return _CONTAINER_STATES.get(container["State"], AppState.UNKNOWN)


def _to_stop(containers: Iterable[Mapping[str, Any]]) -> builtins.list[str]:
    """The listed containers that a stop would reach: those pending or running."""
    going = (AppState.PENDING, AppState.RUNNING)
    return [_container_name(c) for c in containers if _container_state(c) in going]


def _replica_state(rep: ReplicaRecord, live: Mapping[str, AppState], cancelled: bool) -> AppState:
    if rep.exit_code == 0:
        return AppState.SUCCEEDED
    if rep.final:  # a failure, or an exit code that is gone: never SUCCEEDED, and terminal, so waits end
        return AppState.CANCELLED if cancelled else AppState.FAILED
    return live.get(rep.name, AppState.UNKNOWN)


def _app_state(states: Sequence[AppState], *, cancelled: bool = False) -> AppState:
    """An app's state from its replicas': any failure fails it, and it succeeds when all did."""
    if cancelled:
        return AppState.CANCELLED
    if AppState.FAILED in states:
        return AppState.FAILED
    if states and all(s == AppState.SUCCEEDED for s in states):
        return AppState.SUCCEEDED
    active = [s for s in states if s in _ACTIVE]
    return min(active) if active else AppState.UNKNOWN


def _record_state(record: AppRecord, live: Mapping[str, AppState]) -> AppState:
    """The app's state from its record and the live states of the replicas still going."""
    if record.start_error:
        return AppState.FAILED
    if record.starting and not record.cancelled:
        return AppState.SUBMITTED
    states = [_replica_state(rep, live, record.cancelled) for rep in record.replicas]
    return _app_state(states, cancelled=record.cancelled)


def _replica(record: AppRecord, role_name: str, k: int) -> ReplicaRecord:
    """Replica ``k`` of role ``role_name``; a ValueError names the valid roles or indices."""
    roles = {r.name: r.num_replicas for r in record.roles}
    if role_name not in roles:
        raise ValueError(f"app {record.app_id!r} has no role {role_name!r}; its roles are {sorted(roles)}")
    for rep in record.replicas:
        if rep.role == role_name and rep.id == k:
            return rep
    raise ValueError(
        f"role {role_name!r} of app {record.app_id!r} has no replica {k}; "
        f"valid replica indices are 0 to {roles[role_name] - 1}"
    )


# An environment entry as engines quote it in their errors (Go's strconv.Quote): "TOKEN=pre\"x\x00".
_GO_QUOTED = {i: ("\\x%02x" if i < 0x80 else "\\u%04x") % i for i in [*range(0x20), *range(0x7F, 0xA0)]}
_GO_QUOTED.update({ord(c): "\\" + e for c, e in zip('\a\b\f\n\r\t\v\\"', 'abfnrtv\\"', strict=True)})


def _scrubbed(text: str, env: Mapping[str, str] | Iterable[str] | None) -> str:
    """``text`` with each ``KEY=value`` entry of ``env``, as written or as Go quotes it, as ``KEY=***``,
    whatever the value holds: Docker's errors can echo an entry whole, and ``describe().msg`` goes to
    logs and screens. (A bare value is left alone: torchx sets some to what the request shows anyway.)"""
    entries = env.items() if isinstance(env, Mapping) else (e.partition("=")[::2] for e in env or ())
    for key, value in entries:
        for shown in sorted({value, value.translate(_GO_QUOTED)} - {""}, key=len, reverse=True):
            text = text.replace(f"{key}={shown}", f"{key}=***")
    return text


def _start_failure(container: DockerContainer, error: BaseException) -> str:
    labels: dict[str, str] = container.kwargs["labels"]  # type: ignore[assignment]
    replica, role = labels[LABEL_REPLICA_ID], labels[LABEL_ROLE_NAME]
    reason = f"could not start replica {replica} of role {role!r} from image {container.image!r}: {error}"
    requests_: Iterable[Mapping[str, Any]] = container.kwargs.get("device_requests") or []  # type: ignore[assignment]
    gpus = sum(int(r.get("Count") or 0) for r in requests_)
    if gpus and "device driver" in str(error):  # dockerd: could not select device driver "" ...
        reason += (
            f". The role asks for {gpus} GPU(s) (Resource(gpu={gpus}) becomes a Docker device request with "
            "capabilities compute and utility), and the engine has no runtime that provides them: install "
            "the NVIDIA Container Toolkit, restart the engine, and check that `docker info` lists an nvidia "
            "runtime; or run the role without gpu"
        )
    return _scrubbed(reason, container.kwargs.get("environment"))  # type: ignore[arg-type]


def _start_failed(record: AppRecord, reason: str) -> AppRecord:
    """The record of an app whose containers could not all start, and were removed."""
    gone = _Change.gone(_GONE_START_FAILED, time.time())
    ended = record.with_changes({rep.name: gone for rep in record.replicas})
    return dataclasses.replace(ended, start_error=reason, starting=False)


def _done_with(record: AppRecord, among: Iterable[str] | None = None) -> builtins.list[str]:
    """Containers with nothing left to read (end recorded, logs recorded or lost), maybe ``among`` some."""
    names = None if among is None else set(among)
    done = (rep for rep in record.replicas if rep.final and not rep.logs_pending)
    return [rep.name for rep in done if names is None or rep.name in names]


def _problems(record: AppRecord) -> builtins.list[str]:
    """What went wrong, for ``describe().msg``."""
    problems = [record.start_error] if record.start_error else []
    if record.cancelled:
        problems.append("cancelled")
    for rep in record.replicas:
        where = f"{rep.role}/{rep.id}"
        if rep.failed:
            verb = "was stopped" if record.cancelled else "exited"
            note = f" ({rep.exit_note})" if rep.exit_note else ""
            problems.append(f"{where} {verb} with code {rep.exit_code}{note}")
        elif rep.vanished:
            problems.append(f"{where}: container {rep.name} {rep.vanished}")
        if rep.logs_pending:
            problems.append(f"{where}: logs not recorded yet ({rep.log_error})")
    return problems


def _describe_record(
    record: AppRecord, live: Mapping[str, AppState], notes: Sequence[str] = ()
) -> DescribeAppResponse:
    statuses = {r.name: RoleStatus(r.name, []) for r in record.roles}
    for rep in record.replicas:
        state = _replica_state(rep, live, record.cancelled)
        status = statuses.setdefault(rep.role, RoleStatus(rep.role, []))
        status.replicas.append(ReplicaStatus(id=rep.id, state=state, role=rep.role, hostname=rep.name))
    return DescribeAppResponse(
        app_id=record.app_id,
        state=_record_state(record, live),
        num_restarts=max((rep.restarts for rep in record.replicas), default=0),
        msg="; ".join([*_problems(record), *notes]),
        roles=[r.to_role() for r in record.roles],
        roles_statuses=list(statuses.values()),
    )


# == State directory: held open, no symlink followed ==========================
# The state directory holds ``<session>.pickle``, its ``.lock``, the log directory ``<session>.logs`` and
# the identity file. Session files are unpickled and log files served as an app's output, so the directory
# is checked once, with each of its parents, then held open by a descriptor: every access after that is
# relative to it and follows no symlink, so a path swapped later leads nowhere.

_OPEN = os.O_CLOEXEC | os.O_NOFOLLOW
#: Temporary files, of session writes and log harvests alike; see :py:meth:`_Dir.sweep`.
_TEMP_NAME = re.compile(r"\..*\.[0-9a-f]{16}\.tmp")


class UnsafeStateError(PermissionError):
    """A state directory, or a path in it, that someone other than its owner could have changed."""


def _check_session_name(session_name: str) -> None:
    if not session_name or any(bad in session_name for bad in ("..", "/", "\0")):
        raise ValueError(
            f"invalid session name {session_name!r}: it names the session file, so it must be "
            "non-empty and hold no path separator or '..' (e.g. 'my_experiments')"
        )


def _check_private(path: str, st: os.stat_result) -> None:
    """Refuses state that someone else could have written: it is unpickled."""
    if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and st.st_mode & 0o022:
        raise UnsafeStateError(
            f"{path} is a shared directory (mode {st.st_mode & 0o7777:o}): others can create files in it. "
            f"Fix: use a private directory under it, e.g. state_dir=$(mktemp -d -p {path})"
        )
    if st.st_uid != os.getuid():
        raise UnsafeStateError(
            f"{path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()}); refusing to use it. "
            f"Fix: `chown {os.getuid()} {path}`, or use another state_dir"
        )
    if st.st_mode & 0o022:
        raise UnsafeStateError(
            f"{path} is writable by group or others (mode {st.st_mode & 0o777:o}); refusing to use it. "
            f"Fix: `chmod go-w {path}`"
        )


def _check_parent(path: str, st: os.stat_result, state_dir: str) -> None:
    """Refuses a parent through which another user could swap the state directory (as OpenSSH's
    StrictModes does): it must be owned by you or root, and writable by nobody else unless sticky."""
    owned = st.st_uid in (os.getuid(), 0)
    if owned and (not st.st_mode & 0o022 or st.st_mode & stat.S_ISVTX):
        return
    mode = st.st_mode & 0o777
    why = f"is owned by uid {st.st_uid}" if not owned else f"is writable by group or others (mode {mode:o})"
    raise UnsafeStateError(
        f"{path}, a parent of the state directory {state_dir}, {why}: its owner or others could swap "
        "the state directory. Fix: use a state_dir whose parents are owned by you or root and writable "
        "only by their owner (sticky ones like /tmp are fine)"
    )


#: How often a create-or-open races another process before giving up, as ``tempfile`` does.
_TRIES = tempfile.TMP_MAX


def _gave_up(code: int, what: str, path: str) -> OSError:
    return OSError(
        code,
        f"could not {what} {path} in {_TRIES} tries: other processes kept removing or taking it. "
        "Fix: find what keeps changing that directory, or point state_dir elsewhere",
    )


class _Dir(contextlib.AbstractContextManager["_Dir"]):
    """A directory held open: every access is relative to it, follows no symlink, sets modes explicitly."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path
        self._closer = weakref.finalize(self, os.close, fd)

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closer()

    def where(self, name: str) -> str:
        return os.path.join(self.path, name)

    def open(self, name: str, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
        """Opens ``name``, refusing a symlink."""
        try:
            return os.open(name, flags | _OPEN, mode, dir_fd=self.fd)
        except OSError as e:
            # O_DIRECTORY makes a symlink ENOTDIR, not ELOOP
            st = self.stat(name) if e.errno == errno.ENOTDIR else None
            if e.errno == errno.ELOOP or (st is not None and stat.S_ISLNK(st.st_mode)):
                raise UnsafeStateError(
                    f"refusing {self.where(name)}: it is a symbolic link, and docker_scheduler never follows "
                    "one in its state directory. Fix: remove it or move it aside"
                ) from e
            raise

    def create(self, name: str, flags: int = os.O_WRONLY, mode: int = 0o600) -> int | None:
        """Creates ``name`` with ``mode``; None when it exists."""
        try:
            fd = self.open(name, flags | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            return None
        os.fchmod(fd, mode)
        return fd

    def stat(self, name: str) -> os.stat_result | None:
        """``name``'s own status (a symlink's, not its target's), or None when it does not exist."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def subdir(self, name: str, create: bool = False) -> _Dir:
        """The directory ``name`` in this one, held open; made 0700 when missing and ``create``."""
        try:
            return _Dir(self.open(name, os.O_RDONLY | os.O_DIRECTORY), self.where(name))
        except FileNotFoundError:
            if not create:
                raise
        try:
            os.mkdir(name, 0o700, dir_fd=self.fd)
        except FileExistsError:  # another process made it meanwhile
            return self.subdir(name)
        made = _Dir(self.open(name, os.O_RDONLY | os.O_DIRECTORY), self.where(name))
        os.fchmod(made.fd, 0o700)  # mkdir's mode is cut by the umask; this is not
        return made

    def replace(self, name: str, into: _Dir, new_name: str) -> None:
        os.replace(name, new_name, src_dir_fd=self.fd, dst_dir_fd=into.fd)

    def lock_file(self, name: str, flags: int = os.O_RDWR, mode: int = 0o600) -> int:
        """``name`` opened for locking, made with ``mode`` if missing."""
        for _ in range(_TRIES):
            fd = self.create(name, flags, mode)
            if fd is not None:
                return fd
            with contextlib.suppress(FileNotFoundError):  # removed between the two: make it again
                return self.open(name, flags)
        raise _gave_up(errno.ENOENT, "open or create", self.where(name))

    def unlink(self, name: str) -> None:
        os.unlink(name, dir_fd=self.fd)

    def remove_dir(self, name: str) -> None:
        """Removes the directory ``name`` and the files in it; a symlink is refused, not followed."""
        with self.subdir(name) as inner:
            for entry in os.listdir(inner.fd):
                with contextlib.suppress(FileNotFoundError):
                    inner.unlink(entry)
        os.rmdir(name, dir_fd=self.fd)

    def temp_file(self, prefix: str) -> tuple[int, str]:
        """A new temporary file, open for writing and locked while its writer lives (what :py:meth:`sweep`
        tests; a sweeper that took it first unlinks it, which the writer sees and starts over). Those of
        writers that died are swept first: every writer cleans up after the killed ones."""
        self.sweep()
        for _ in range(_TRIES):
            name = f".{prefix}.{os.urandom(8).hex()}.tmp"
            fd = self.create(name)
            if fd is None:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink:
                return fd, name
            os.close(fd)
        raise _gave_up(errno.EEXIST, "make a temporary file", self.where(f".{prefix}.*.tmp"))

    def sweep(self) -> None:
        """Removes the temporary files of writers that died: a live writer holds its file's lock."""
        for name in os.listdir(self.fd):
            if _TEMP_NAME.fullmatch(name):
                with contextlib.suppress(OSError):
                    self._sweep_one(name)

    def _sweep_one(self, name: str) -> None:
        fd = self.open(name, os.O_RDONLY | os.O_NONBLOCK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            now = self.stat(name)
            if now is not None and now.st_ino == os.fstat(fd).st_ino:
                self.unlink(name)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def written(self, name: str, into: _Dir | None = None, replace: bool = True) -> Iterator[BinaryIO]:
        """A file to write ``name`` through, made here: it appears in ``into`` (default: here) on a
        clean exit, whole, replacing what was there (unless ``replace`` is False: then only if nothing
        was); after a failure, nothing is left."""
        into = into or self
        fd, temp = self.temp_file(name[:64])
        f = os.fdopen(fd, "wb", buffering=_READ_SIZE)
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
            # Still open, so still locked: a sweep must not take a finished file before it is in place.
            if replace:
                self.replace(temp, into, name)
            else:
                with contextlib.suppress(FileExistsError):
                    os.link(temp, name, src_dir_fd=self.fd, dst_dir_fd=into.fd, follow_symlinks=False)
        finally:
            with contextlib.suppress(OSError):  # replaced, or left by a failure: gone either way
                self.unlink(temp)
            with contextlib.suppress(OSError):  # after a failed write, closing flushes and fails again
                f.close()


# What to do when writing in the state directory failed, by the cause.
_FIXES = {
    errno.ENOSPC: "free space there",
    errno.EDQUOT: "free space there (your disk quota is full)",
    errno.EROFS: "remount it writable",
    errno.EACCES: "make it writable by you",
    errno.EPERM: "make it writable by you",
    errno.ENOTDIR: "part of that path is a file, not a directory",
    errno.ENOENT: "a directory in it was removed meanwhile (by a delete, or by hand)",
    errno.ENAMETOOLONG: "use a shorter path",
}


def _fix(error: OSError) -> str:
    return _FIXES.get(error.errno or 0, "check the file system it is on")


def _state_dir_error(error: OSError, path: str, chosen_by: str, what: str) -> OSError:
    """``error`` restated: what failed, on which path, which setting chose it, and what to do."""
    if isinstance(error, UnsafeStateError):
        return UnsafeStateError(str(error))  # it names the path and the fix already
    fix = f"{_fix(error)}, or point"
    if error.errno == errno.ENOTDIR:  # name the file that stands where a directory should
        blocker = path
        while not os.path.lexists(blocker) and os.path.dirname(blocker) != blocker:
            blocker = os.path.dirname(blocker)
        fix = f"{blocker} is a file, not a directory: point"
    return type(error)(
        error.errno,
        f"cannot {what} ({error.strerror}); the state directory {path} comes from {chosen_by}: "
        f"{fix} state_dir or {STATE_DIR_ENV} at another directory",
    )


def _open_private_dir(path: str) -> _Dir:
    """Opens ``path`` through each parent in turn, each checked, making what is missing 0700."""
    real = os.path.realpath(path)
    current = _Dir(os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), "/")
    parts = [part for part in real.split(os.sep) if part]
    for part in parts:
        with current:  # closes the parent once its child is open, or on a refusal
            _check_parent(current.path, os.fstat(current.fd), real)
            current = current.subdir(part, create=True)
    try:
        _check_private(current.path, os.fstat(current.fd))
    except BaseException:
        current.close()
        raise
    return current


def _open_state_dir(state_dir: str | None) -> tuple[_Dir, str]:
    """The state directory, held open, and which setting chose it: ``state_dir``, else
    ``$DOCKER_SCHEDULER_STATE_DIR``, else ``${XDG_STATE_HOME:-~/.local/state}/docker_scheduler``."""
    if state_dir:
        path, chosen_by = state_dir, "the state_dir argument"
    elif os.environ.get(STATE_DIR_ENV):
        path, chosen_by = os.environ[STATE_DIR_ENV], STATE_DIR_ENV
    else:
        path = os.path.join(os.environ.get("XDG_STATE_HOME") or "~/.local/state", "docker_scheduler")
        chosen_by = "the default, ${XDG_STATE_HOME:-~/.local/state}"
    path = os.path.abspath(os.path.expanduser(path))
    try:
        return _open_private_dir(path), chosen_by
    except OSError as e:
        raise _state_dir_error(e, path, chosen_by, f"create {path}") from e


_IDENTITY = re.compile(r"[0-9a-f]{32}")


def _state_dir_identity(state: _Dir) -> str:
    """The state directory's identity, from :py:data:`IDENTITY_FILE`; made if missing, linked into place
    whole, so two processes that make it at once agree on the first one linked."""
    if state.stat(IDENTITY_FILE) is None:
        with state.written(IDENTITY_FILE, replace=False) as f:
            f.write(f"{uuid.uuid4().hex}\n".encode())
    with os.fdopen(state.open(IDENTITY_FILE), "rb") as f:
        identity = f.read(64).decode("ascii", "replace").strip()
    if not _IDENTITY.fullmatch(identity):
        raise ValueError(
            f"{state.where(IDENTITY_FILE)} does not hold a state directory identity (32 hex digits); it "
            "labels this state directory's containers, so restore it, or remove it to start a new identity "
            "(containers labelled with the old one are then no longer this directory's)"
        )
    return identity


# == Session store ============================================================
# The session file is unpickled, so it must be private: owned by the user,
# writable by nobody else, and read with an unpickler that allows no globals.


class _RestrictedUnpickler(pickle.Unpickler):
    """Loads builtin types only, so a crafted file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing {module}.{name}: session files hold builtin types only")


def _unpickled(source: Any, what: str) -> Any:
    try:
        return _RestrictedUnpickler(source).load()
    except Exception as e:  # any byte string can come in: each failure means corrupt
        raise _CorruptSession(f"{what}: {type(e).__name__}: {e}") from e


#: One app in the session file: when it was scheduled, its state once nothing can change it (so that
#: ``list`` need not decode it), and its record, pickled on its own so a write pickles only what changed.
_Entry = tuple[float, "str | None", bytes]


def _encode(record: AppRecord) -> _Entry:
    final = None if record.asks_docker else _record_state(record, {}).name  # nothing can change it
    return (record.created, final, pickle.dumps(_to_dict(record), protocol=pickle.HIGHEST_PROTOCOL))


def _decode(app_id: str, blob: bytes) -> AppRecord:
    plain = _unpickled(io.BytesIO(blob), f"record for {app_id!r}")
    try:
        record = _from_dict(AppRecord, plain)
    except (_CorruptSession, TypeError, ValueError) as e:
        raise _CorruptSession(f"record for {app_id!r}: {e}") from e
    if record.app_id != app_id:
        raise _CorruptSession(f"record for {app_id!r} names app {record.app_id!r}")
    return record


def _valid_entry(app_id: Any, entry: Any) -> _Entry:
    """``entry`` if it has an entry's shape. Checked when used, so that a read decodes what it asks."""
    try:  # not contextlib.suppress: this runs for every app a list() reads
        created, state, blob = entry
        if type(app_id) is str and type(created) is float and type(blob) is bytes and state in _STATES:
            return cast(_Entry, entry)
    except (TypeError, ValueError):  # not three values, or an unhashable state
        pass
    raise _CorruptSession(f"malformed entry for {app_id!r}")


_STATES = frozenset([None, *AppState.__members__])


def _read_entries(data: Any, session_name: str) -> dict[str, _Entry]:
    """The entries of an unpickled session file; each is checked when it is used."""
    version = data.get("format") if isinstance(data, dict) else type(data).__name__
    if version != FORMAT_VERSION:
        raise _CorruptSession(f"format {version!r}, expected {FORMAT_VERSION}")
    apps = data.get("apps")
    if data.get("session") != session_name or not isinstance(apps, dict):
        raise _CorruptSession("not a session file of this session")
    return apps


_Fingerprint = tuple[int, int, int, int]


def _fingerprint(st: os.stat_result) -> _Fingerprint:
    """What changes whenever the session file is replaced or rewritten."""
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


class _SessionStore:
    """The session file: re-read only when it changed, replaced atomically under a lock. A record is
    decoded only when asked for; a file or record of another shape is moved aside under the lock, and
    the session rebuilt by ``rebuild``."""

    def __init__(self, state: _Dir, session_name: str, rebuild: Callable[[], dict[str, AppRecord]]) -> None:
        self._dir, self._name, self._lock_name = state, f"{session_name}.pickle", f"{session_name}.lock"
        self.path = state.where(self._name)
        self._session_name, self._rebuild = session_name, rebuild
        self._fingerprint: _Fingerprint | None = None
        self._entries: dict[str, _Entry] = {}
        self._records: dict[str, AppRecord] = {}  # decoded so far
        self._held = threading.local()

    def get(self, app_id: str) -> AppRecord | None:
        """The app's record as of the last write by any process, or None; decoded on first use."""
        self._refresh()
        return self._read_or_recover(lambda: self._decoded(app_id) if app_id in self._entries else None)

    def summaries(self) -> builtins.list[tuple[str, str | None]]:
        """Each app's id and its final state's name (None while it can change), oldest first."""
        self._refresh()
        entries = self._read_or_recover(lambda: [(a, _valid_entry(a, e)) for a, e in self._entries.items()])
        return [(app_id, state) for app_id, (_, state, _) in sorted(entries, key=lambda item: item[1][0])]

    @contextlib.contextmanager
    def update(self) -> Iterator[dict[str, AppRecord | None]]:
        """Reads the file again under the lock, and yields the changes to write back on a clean exit:
        an app's new record, or None to delete it. :py:meth:`get` gives the records as read."""
        with self._locked():
            self._refresh()
            changes: dict[str, AppRecord | None] = {}
            yield changes
            if changes:
                self._write(changes)

    def _read_or_recover(self, read: Callable[[], _T]) -> _T:
        """``read()``; when it finds the file corrupt, read again once :py:meth:`_recover` ran."""
        try:
            return read()
        except _CorruptSession as e:
            self._recover(e, read)
            return read()

    def _decoded(self, app_id: str) -> AppRecord:
        if app_id not in self._records:
            self._records[app_id] = _decode(app_id, _valid_entry(app_id, self._entries[app_id])[2])
        return self._records[app_id]

    def _refresh(self) -> None:
        st = self._dir.stat(self._name)
        if (None if st is None else _fingerprint(st)) != self._fingerprint:
            try:
                self._load()
            except _CorruptSession as e:
                self._recover(e)

    def _recover(self, error: _CorruptSession, check: Callable[[], object] = lambda: None) -> None:
        """Reads the file again under the lock, in case another process replaced it meanwhile;
        if what failed (``check``) still fails, moves the file aside and rebuilds the session."""
        with self._locked():
            try:
                self._load()
                check()
            except _CorruptSession as again:
                self._quarantine(again)

    def _load(self) -> None:
        try:
            fd = self._dir.open(self._name)
        except FileNotFoundError:
            self._fingerprint, self._entries, self._records = None, {}, {}
            return
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            _check_private(self.path, st)
            entries = _read_entries(_unpickled(f, "the file"), self._session_name)
        self._fingerprint, self._entries, self._records = _fingerprint(st), entries, {}

    def _quarantine(self, error: Exception) -> None:
        aside = f"{self._name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        self._dir.replace(self._name, self._dir, aside)
        moved = f"session file {self.path} could not be read ({error}); moved it to {self._dir.where(aside)}"
        log.warning("%s and rebuilt the session from the containers labelled with it", moved)
        try:
            rebuilt = self._rebuild()
        except Exception as e:
            log.warning("could not rebuild session %s from Docker: %s", self._session_name, e)
            rebuilt = {}
        self._fingerprint, self._entries, self._records = None, {}, {}
        self._write(dict(rebuilt))

    def _write(self, changes: Mapping[str, AppRecord | None]) -> None:
        entries, records = dict(self._entries), dict(self._records)
        for app_id, record in changes.items():
            if record is None:
                entries.pop(app_id, None)
                records.pop(app_id, None)
            else:
                entries[app_id], records[app_id] = _encode(record), record
        data = {"format": FORMAT_VERSION, "session": self._session_name, "apps": entries}
        with self._dir.written(self._name) as f:
            pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
        st = os.stat(self._name, dir_fd=self._dir.fd, follow_symlinks=False)
        self._fingerprint, self._entries, self._records = _fingerprint(st), entries, records

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # flock is per open file, so a thread that already holds it must not take it again.
        if getattr(self._held, "fd", None) is not None:
            yield
            return
        fd = self._held.fd = self._dir.lock_file(self._lock_name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            self._held.fd = None
            os.close(fd)


# == Docker adapter ===========================================================


class DockerUnavailableError(RuntimeError):
    """The Docker engine did not answer at the endpoint in use."""


@dataclasses.dataclass(frozen=True)
class _Endpoint:
    """The Docker engine a process talks to, chosen as the Docker CLI (and docker-py 7.2's ``from_env``)
    chooses it: ``DOCKER_HOST``, else the current context (``DOCKER_CONTEXT``, else the one
    ``docker context use`` chose), else the default socket."""

    #: e.g. ``unix:///var/run/docker.sock``, ``tcp://10.0.0.5:2376`` or ``ssh://me@gpu-box``
    url: str
    #: the Docker CLI context that named it; empty for ``DOCKER_HOST`` and the default
    context: str = ""
    #: the TLS settings the context holds; None for the others
    tls: Any = dataclasses.field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.url} (Docker context {self.context!r})" if self.context else self.url


def _endpoint() -> _Endpoint:
    """The endpoint in use. Contexts are read where the Docker CLI reads them, ``$DOCKER_CONFIG`` or
    ``~/.docker``: docker-py 7.2 looks in ``./contexts`` when that holds no config.json."""
    if os.environ.get("DOCKER_HOST"):
        return _Endpoint(os.environ["DOCKER_HOST"])
    config = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    name, named_by = os.environ.get("DOCKER_CONTEXT"), "DOCKER_CONTEXT={}"
    if not name:
        where = os.path.join(config, "config.json")
        name, named_by = _json(where, {}).get("currentContext"), f"currentContext {{!r}} in {where}"
    if not name or name == "default":
        return _Endpoint(_DEFAULT_SOCKET)
    digest = hashlib.sha256(name.encode()).hexdigest()
    meta_path = os.path.join(config, "contexts", "meta", digest, "meta.json")
    meta = _json(meta_path, None)
    if meta is None:
        raise DockerUnavailableError(
            f"{named_by.format(name)} names no Docker context (none in {config}): `docker context ls` lists "
            "them; `docker context use default`, or set DOCKER_CONTEXT or DOCKER_HOST to an engine that runs"
        )
    try:
        endpoint = meta.get("Endpoints", {}).get("docker", {})
        host, skip_verify = endpoint.get("Host"), bool(endpoint.get("SkipTLSVerify"))
    except AttributeError:
        raise DockerUnavailableError(f"{meta_path} is not a context's meta.json: {_CLI_FILE_FIX}") from None
    if not host:
        return _Endpoint(_DEFAULT_SOCKET)
    # As the CLI: TLS when the context has certificates or skips verifying, each file where it has one.
    tls_dir = os.path.join(config, "contexts", "tls", digest, "docker")
    ca, cert, key = (os.path.join(tls_dir, f"{f}.pem") for f in ("ca", "cert", "key"))
    tls = None
    if skip_verify or os.path.isdir(tls_dir):
        client_cert = (cert, key) if os.path.isfile(cert) and os.path.isfile(key) else None
        tls = docker.tls.TLSConfig(client_cert, ca if os.path.isfile(ca) else None, verify=not skip_verify)
    return _Endpoint(host, name, tls)


def _json(path: str, missing: Any) -> Any:
    """The JSON object in a Docker CLI file, or ``missing`` when there is none."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        return missing
    except (OSError, ValueError) as e:
        raise DockerUnavailableError(f"cannot read {path}, a Docker CLI file ({e}): {_CLI_FILE_FIX}") from e
    if not isinstance(data, dict):
        raise DockerUnavailableError(f"{path} holds no JSON object: {_CLI_FILE_FIX}")
    return data


_CLI_FILE_FIX = "fix it (the Docker CLI fails on it too) or move it aside, or set DOCKER_HOST"


def _unavailable(endpoint: _Endpoint, cause: BaseException) -> DockerUnavailableError:
    return DockerUnavailableError(
        f"cannot reach the Docker engine at {endpoint} ({cause}); start it (e.g. `dockerd` or "
        "`systemctl start docker`), or point DOCKER_HOST or DOCKER_CONTEXT at one that runs"
    )


def _fan_out(fn: Callable[[_T], _R], items: Sequence[_T]) -> builtins.list[_R]:
    """``fn`` over ``items``, at most ``_DOCKER_WORKERS`` at once; an error is raised once all ended."""
    if len(items) < 2:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(_DOCKER_WORKERS, len(items)), thread_name_prefix="docker-scheduler") as pool:
        return list(pool.map(fn, items))


@contextlib.contextmanager
def _closing_events(stream: Any) -> Iterator[None]:
    """Closes a stream of Docker's events on the way out. docker-py's ``CancellableStream.close()``
    (docker/types/daemon.py, 7.1 and 7.2) looks for a socket under the response and, under the ssh
    command's pipe, finds none and raises: closing the response itself then ends the stream."""
    try:
        yield
    finally:
        try:
            stream.close()
        except Exception:
            stream._response.close()


#: torchx's lock around making its network (``ensure_network``, torchx 0.7.0 and main), in the temporary
#: directory: taking the same one serializes the two. torchx takes it with ``filelock``, which opens the
#: file for writing, so another user's file stops torchx's own; ``_network_lock`` opens it read-only.
_NETWORK_LOCK = "torchx_docker_network_lock"


@contextlib.contextmanager
def _network_lock(timeout: float = 10) -> Iterator[None]:
    """Holds torchx's network lock, or goes on without it, saying why, when it cannot be had (within
    ``timeout`` seconds, as torchx waits). ``flock`` needs no write access, so a lock file another
    user made serves too."""
    where = tempfile.gettempdir()
    try:
        with _Dir(os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), where) as tmp:
            fd = tmp.lock_file(_NETWORK_LOCK, os.O_RDONLY, 0o644)  # the mode torchx gives it
    except OSError as e:
        log.info("making torchx's network without its lock: cannot open it in %s (%s)", where, e)
        yield
        return
    with os.fdopen(fd, "rb"):  # closes it
        for _ in range(int(timeout / 0.05)):
            with contextlib.suppress(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            time.sleep(0.05)
        else:
            log.warning("making torchx's network without its lock: %s in %s is held", _NETWORK_LOCK, where)
        yield


# -- ssh: one connection for every request -------------------------------------
# docker-py's ssh transport through the ssh command makes a new pool, so a new ssh process and its
# handshake, for every request (docker/docker-py#2966, open in docker-py 7.2). Here one pool serves a
# client and keeps its ssh processes for the next request, and all of them share one master connection
# (OpenSSH's ControlMaster), so the user's ssh config, keys and agent apply as for the Docker CLI. The
# master's socket is in a private temporary directory (a socket's path holds about 100 bytes, fewer than
# many state directories); the master lives while a pooled ssh does, ``_SSH_PERSIST`` seconds longer
# after a crash, and is ended when the client closes or the interpreter exits.

#: Seconds an ssh master outlives its last ssh process when its scheduler's process ended unclosed.
_SSH_PERSIST = 30


class _SharedSSHSocket(SSHSocket):  # type: ignore[misc]
    """docker-py's ``ssh ... docker system dial-stdio`` process, sharing the master at ``control``."""

    def __init__(self, host: str, control: str) -> None:
        super().__init__(host)
        self.control = control

    def connect(self, **kwargs: Any) -> None:
        # docker-py's connect, with connection sharing added
        share = ["ControlMaster=auto", f"ControlPath={self.control}", f"ControlPersist={_SSH_PERSIST}"]
        args = ["ssh", *(arg for option in share for arg in ("-o", option))]
        args += [*(["-l", self.user] if self.user else []), *(["-p", self.port] if self.port else [])]
        env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "SSL_CERT_FILE")}
        self.proc = subprocess.Popen(
            [*args, "--", self.host, "docker system dial-stdio"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as docker-py: ^C is Python's
        )

    def makefile(self, mode: str) -> Any:
        # http.client closes the file at a response's end: a copy of the pipe's fd keeps the pipe for the next
        f = os.fdopen(os.dup(super().makefile(mode).fileno()), "rb")
        f.channel = self  # type: ignore[attr-defined]  # as docker-py's
        return f

    def close(self) -> None:
        with contextlib.suppress(OSError):  # its ssh has ended already
            super().close()


class _SharedSSHConnection(SSHConnection):  # type: ignore[misc]
    control = ""

    def connect(self) -> None:
        self.sock = _SharedSSHSocket(self.ssh_host, self.control)
        self.sock.connect()


class _SharedSSHPool(SSHConnectionPool):  # type: ignore[misc]
    """The one pool of a client's requests; a connection whose ssh ended (the link dropped) is replaced."""

    control = ""

    def _new_conn(self) -> Any:
        conn = _SharedSSHConnection(None, self.timeout, self.ssh_host)
        conn.control = self.control
        return conn

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn, dropped = super()._get_conn(timeout), False
        while conn.sock is not None and conn.sock.proc.poll() is not None:
            conn.close()
            conn, dropped = super()._get_conn(timeout), True
        if dropped:
            log.info("the ssh connection to %s was lost: connecting again", self.ssh_host)
        return conn


class _SharedSSHAdapter(SSHHTTPAdapter):  # type: ignore[misc]
    """docker-py's ssh-command adapter with one pool, whose ssh processes share one master."""

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url, shell_out=True)
        self._pool = _SharedSSHPool(timeout=self.timeout, maxsize=self.max_pool_size, host=self.ssh_host)
        # ssh binds <path>.<16 characters> first, and a socket's path holds at most 103 bytes (macOS)
        where = tempfile.gettempdir() if len(tempfile.gettempdir()) <= 40 else "/tmp"
        self._pool.control = os.path.join(
            tempfile.mkdtemp(prefix="docker-scheduler-ssh-", dir=where), "master"
        )
        host = urllib.parse.urlparse(base_url).hostname or ""
        self._end = weakref.finalize(self, _end_ssh_master, host, self._pool.control)

    def get_connection(self, url: str, proxies: Any = None) -> Any:
        return self._pool

    def close(self) -> None:
        super().close()
        self._pool.close()
        self._end()


def _end_ssh_master(host: str, control: str) -> None:
    """Ends the ssh master at ``control``, if one runs, and removes its directory."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        end = ["ssh", "-o", f"ControlPath={control}", "-O", "exit", "--", host]
        subprocess.run(end, stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
    with contextlib.suppress(OSError):  # the master may not have removed its socket yet
        os.unlink(control)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(control))


class _Docker:
    """The Docker engine, one method an endpoint; connection failures are DockerUnavailableError."""

    def __init__(self) -> None:
        self._client: DockerClient | None = None
        self._connecting = threading.Lock()

    @functools.cached_property
    def endpoint(self) -> _Endpoint:
        """The engine this process talks to (see :py:class:`_Endpoint`)."""
        return _endpoint()

    @property
    def client(self) -> DockerClient:
        with self._connecting:  # schedule() asks from two threads at once: one client for both
            if self._client is None:
                try:
                    self._client = self._connect(self.endpoint)
                except (DockerException, requests.exceptions.RequestException) as e:
                    raise _unavailable(self.endpoint, e) from e
        return self._client

    @staticmethod
    def _connect(endpoint: _Endpoint) -> DockerClient:
        if endpoint.url.startswith("ssh://") and SSHSocket is object:
            raise DockerUnavailableError(
                f"{endpoint} is an ssh endpoint, and docker-py reaches those only with paramiko "
                "installed: pip install 'docker[ssh]'"
            )
        # ssh:// through the ssh command, as the Docker CLI does. The API version is asked for last,
        # once the transport is in place (see _SharedSSHAdapter).
        version = docker.constants.MINIMUM_DOCKER_API_VERSION
        if not endpoint.context:
            client = docker.from_env(use_ssh_client=True, version=version)
        elif endpoint.tls is None:  # docker-py before 7.2 ignores contexts: name the host it gives
            client = docker.DockerClient(base_url=endpoint.url, use_ssh_client=True, version=version)
        else:
            client = docker.DockerClient(endpoint.url, tls=endpoint.tls, version=version)
            # requests lets REQUESTS_CA_BUNDLE override a context's CA and its verify=False
            # (psf/requests#3829), which the CLI never reads.
            client.api.trust_env = False
        if client.api.base_url == "http+docker://ssh":
            client.api.mount(client.api.base_url, _SharedSSHAdapter(endpoint.url))
        client.api._version = str(client.api.version(api_version=False)["ApiVersion"])
        return client

    @contextlib.contextmanager
    def _reaching(self) -> Iterator[None]:
        """Turns a connection failure into one error that names the endpoint."""
        try:
            yield
        except requests.exceptions.ConnectionError as e:
            raise _unavailable(self.endpoint, e) from e

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()

    @functools.cached_property
    def engine_id(self) -> str:
        """The daemon's ID, which tells two engines apart (asked once: Podman takes its time)."""
        with self._reaching():
            return str(self.client.info().get("ID") or "")

    def engine(self) -> _Engine:
        """A record's fields that name this engine: the endpoint, the context that named it, the ID."""
        url, context = self.endpoint.url, self.endpoint.context
        return {"engine_endpoint": url, "engine_context": context, "engine_id": self.engine_id}

    def containers(self, labels: Mapping[str, str]) -> builtins.list[dict[str, Any]]:
        """Every container, running or not, that carries all of ``labels``."""
        wanted = [f"{key}={value}" for key, value in labels.items()]
        with self._reaching():
            found: list[dict[str, Any]] = self.client.api.containers(all=True, filters={"label": wanted})
        return found

    def inspect(self, name: str) -> dict[str, Any] | None:
        """``docker inspect`` of a container, or None when it is gone."""
        with contextlib.suppress(NotFound):
            return cast("dict[str, Any]", self.client.api.inspect_container(name))
        return None

    def start_all(
        self, containers: Sequence[DockerContainer]
    ) -> tuple[DockerContainer, BaseException] | None:
        """Creates and starts every container; if one fails, removes them all and returns it and its error."""
        client = self.client

        def start(c: DockerContainer) -> tuple[DockerContainer, BaseException] | None:
            try:
                client.containers.create(c.image, c.command, **c.kwargs).start()
            except Exception as e:
                return c, e
            return None

        with self._reaching():
            failed = [failure for failure in _fan_out(start, containers) if failure is not None]
            if failed:
                self.remove([str(c.kwargs["name"]) for c in containers])
                if isinstance(failed[0][1], requests.exceptions.ConnectionError):
                    raise failed[0][1]
        return failed[0] if failed else None

    def stop(self, names: Sequence[str], timeout: int = STOP_TIMEOUT) -> None:
        self._each(names, lambda api, name: api.stop(name, timeout=timeout))

    def remove(self, names: Sequence[str]) -> None:
        self._each(names, lambda api, name: api.remove_container(name, force=True))

    def _each(self, names: Sequence[str], call: Callable[[Any, str], object]) -> None:
        """``call(api, name)`` for each container, side by side; one gone, or going, counts as done."""
        api = self.client.api

        def one(name: str) -> None:
            try:
                call(api, name)
            except NotFound:
                pass
            except docker.errors.APIError as e:  # another process removes it (409 since moby/moby#26074)
                if e.status_code != 409 or "already in progress" not in str(e.explanation):
                    raise

        with self._reaching():
            _fan_out(one, names)

    def await_end(
        self, labels: Mapping[str, str], since: int, timeout: float | None, seen: set[tuple[Any, ...]]
    ) -> str | None:
        """The ID of a labelled container that died, or "" for one that went (dockerd's die and
        destroy, Podman's died and remove: the only ways one ends), in an event not in ``seen`` (it is
        added); None after ``timeout`` seconds. Events since ``since`` (epoch seconds) are replayed, so
        none between a look and this call is missed."""
        until = None if timeout is None else f"{time.time() + timeout:.9f}"  # engines take a fraction
        wanted = {"type": ["container"], "label": [f"{key}={value}" for key, value in labels.items()]}
        with self._reaching():
            stream = self.client.api.events(since=since, until=until, filters=wanted, decode=True)
        with _closing_events(stream), self._reaching():
            for event in stream:
                action = event.get("Action") or event.get("status")
                key = (event.get("id"), event.get("timeNano"), action)
                if action not in ("die", "died", "destroy", "remove") or key in seen:
                    continue
                seen.add(key)
                return str(event.get("id")) if action in ("die", "died") else ""
        return None

    def await_exited(self, container_id: str, timeout: float | None) -> None:
        """Waits until a container that died says so in its state (the event comes first)."""
        with contextlib.suppress(NotFound, requests.exceptions.RequestException):
            self.client.api.wait(container_id, timeout=timeout)

    def prepare(self, images: Iterable[str], policy: str) -> None:
        """Makes every image available as ``policy`` says, and torchx's network."""
        with self._reaching():
            for image in sorted(images):
                if not image.startswith("sha256:"):  # an id names a local image: nothing to pull
                    self._prepare_image(image, policy)
            self.ensure_network()

    def ensure_network(self, name: str = NETWORK) -> None:
        """Makes torchx's network unless it exists, under torchx's lock; unlike torchx's ``ensure_network``,
        only to make it, and opening the lock file read-only, so another user's file does not stop this."""
        if any(n.get("Name") == name for n in self.client.api.networks(names=[name])):
            return
        with _network_lock():
            try:
                self.client.api.create_network(name, driver="bridge", check_duplicate=True)
            except docker.errors.APIError as e:
                if "already exists" not in str(e):
                    raise

    def _prepare_image(self, image: str, policy: str) -> None:
        if policy == "always":
            try:
                self._pull(image)
            except DockerException as e:
                log.warning("failed to pull image %s, falling back to the local copy: %s", image, e)
            return
        with contextlib.suppress(NotFound):
            self.client.api.inspect_image(image)
            return
        if policy == "never":
            raise ValueError(
                f"image {image!r} is not on this Docker host and image_pull=never forbids pulling it: "
                f"run `docker pull {image}` first, or use image_pull=missing"
            )
        try:
            self._pull(image)
        except DockerException as e:
            raise RuntimeError(f"image {image!r} is not on this Docker host; pulling it failed: {e}") from e

    def _pull(self, image: str) -> None:
        """Pulls ``image``, logging the engine's progress at most every ``PULL_PROGRESS_INTERVAL`` seconds."""
        log.info("pulling image %s", image)
        last = time.monotonic()
        for event in self.client.api.pull(image, stream=True, decode=True):
            if "error" in event:
                raise DockerException(event["error"])
            if time.monotonic() - last >= PULL_PROGRESS_INTERVAL:
                last = time.monotonic()
                progress = (str(event.get(key) or "") for key in ("id", "status", "progress"))
                log.info("pulling %s: %s", image, " ".join(filter(None, progress)))
        log.info("pulled image %s", image)

    def logs(self, name: str, streams: Iterable[str], **options: float | bool | None) -> requests.Response:
        """One ``GET /containers/<name>/logs`` for ``streams``, its body left to read; ``options`` are
        the endpoint's (``timestamps``, ``follow``, ``since``, ``until``; None leaves one out)."""
        params: dict[str, Any] = {
            k: int(v) if isinstance(v, bool) else v for k, v in options.items() if v is not None
        }
        params.update(stdout=int("stdout" in streams), stderr=int("stderr" in streams), tail="all")
        api = self.client.api
        url = f"{api.base_url}/v{api.api_version}/containers/{urllib.parse.quote(name, safe='')}/logs"
        # docker-py's own logs() reads the body a frame at a time, so the request is made here, through
        # the client's public requests.Session interface. No read timeout: a followed log may stay
        # quiet for as long as its replica runs.
        with self._reaching():
            response: requests.Response = api.get(url, params=params, stream=True, timeout=None)
        try:
            response.raise_for_status()
        except requests.exceptions.HTTPError as e:
            error = docker.errors.create_api_error_from_http_exception(e)  # reads the body's message
            response.close()
            raise error from e
        return response


# == Logs: harvested from Docker's log stream into files, served from either ===
# One room: how a log is read from Docker, written, read back and served. A harvested log is what
# `docker logs --timestamps` prints for one stream: each line starts with Docker's fixed-width RFC 3339
# UTC timestamp and a space, so since/until compare as bytes and two streams merge in time order.

# dockerd prints RFC 3339 with 9 fixed fraction digits in UTC; Podman trims the fraction (or prints
# none) and may print an offset.
_TIMESTAMP = re.compile(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)")
# dockerd's stamp, 2026-11-30T01:02:03.123456789Z, its part to the whole second, and the rest of a stamp
# that is on a whole second (every stamp of an engine that stamps to the second: see _place).
_STAMP_SIZE, _SECOND_SIZE, _WHOLE_SECOND = 30, 19, b".000000000Z"


def _parse_timestamp(text: bytes) -> tuple[bytes, bytes, int] | None:
    """A leading RFC 3339 timestamp: UTC date and time to the second, 9 fraction digits, its length."""
    match = _TIMESTAMP.match(text)
    if match is None:
        return None
    base, fraction, zone = match.groups()
    if zone != b"Z":
        utc = datetime.fromisoformat((base + zone).decode()).astimezone(timezone.utc)
        base = utc.strftime("%Y-%m-%dT%H:%M:%S").encode()
    return base, (fraction or b"").ljust(9, b"0"), match.end()


def _fixed_stamp(line: bytes) -> bytes:
    """``line`` with its leading timestamp in dockerd's fixed-width UTC form."""
    if line[19:20] == b"." and line[29:31] == b"Z ":  # _SECOND_SIZE, _STAMP_SIZE - 1: it runs for every line
        return line  # dockerd's own
    parsed = _parse_timestamp(line)
    if parsed is None or line[parsed[2] : parsed[2] + 1] != b" ":
        return line
    base, fraction, end = parsed
    return b"%s.%sZ%s" % (base, fraction, line[end:])


def _finished_at(stamp: Any) -> float:
    """Docker's ``State.FinishedAt`` as epoch seconds; now when it is missing or unreadable."""
    parsed = _parse_timestamp(str(stamp).encode())
    if parsed is None:
        return time.time()
    base, fraction, _ = parsed
    finished = datetime.fromisoformat(f"{base.decode()}+00:00").timestamp() + int(fraction) / 1e9
    return finished if finished > 0 else time.time()


def _docker_time(dt: datetime | None) -> bytes | None:
    """``dt`` as dockerd prints log timestamps (naive is local time, as docker-py takes it); None stays
    None, no bound. A bound at or before the epoch is a bound too: ``until`` then keeps no line."""
    if dt is None:
        return None
    return (
        dt.astimezone(timezone.utc).replace(tzinfo=None).isoformat(timespec="microseconds").encode() + b"000Z"
    )


def _seconds(window: _Window) -> dict[str, int | None]:
    """The logs request's ``since`` and ``until``: the whole seconds around ``window``, since Podman (4.3)
    stamps to the second and filters by the real time (the lines are kept here); 0 is no bound to Docker."""
    start, end = (None if t is None else t.timestamp() for t in window)
    since = None if start is None else max(0, math.floor(start)) or None
    return {"since": since, "until": None if end is None else max(1, math.floor(end) + 1)}


def _place(stamp: bytes, low: bytes | None, high: bytes | None) -> int:
    """Where a line stamped ``stamp`` (dockerd's form) lies against ``low`` and ``high``: -1 before,
    0 within, 1 after; the one window rule, live and harvested. A stamp on a whole second (Podman 4.3
    stamps to the second) stands for that second: so it is compared."""
    size = _SECOND_SIZE if stamp[_SECOND_SIZE:] == _WHOLE_SECOND else _STAMP_SIZE
    if low is not None and stamp[:size] < low[:size]:
        return -1
    return 1 if high is not None and stamp[:size] > high[:size] else 0


# Docker's multiplexed log stream: frames of an 8-byte header (stream id, 3 zero bytes, big-endian
# payload size) and a payload; a TTY container's log is raw.
_FRAME_HEADER = struct.Struct(">BxxxL")
_STDOUT, _STDERR = 1, 2


def _frames(blocks: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """(stream id, payload) for each frame of a log body read in blocks; a TTY body's lines as stdout."""
    blocks = iter(blocks)
    head = b""
    for block in blocks:  # a frame header is 8 bytes: decide on no less
        head += block
        if len(head) >= _FRAME_HEADER.size:
            break
    rest = itertools.chain([head], blocks)
    if head[:1] in (b"\0", b"\1", b"\2") and head[1:4] == b"\0\0\0" and len(head) >= _FRAME_HEADER.size:
        yield from _demultiplexed(rest)
    else:
        yield from ((_STDOUT, line) for line in _whole_lines(rest))


def _demultiplexed(blocks: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    data, pos = b"", 0
    header, unpack = _FRAME_HEADER.size, _FRAME_HEADER.unpack_from  # locals: this runs for every frame
    for block in blocks:
        data = data[pos:] + block if pos < len(data) else block
        pos, size = 0, len(data)
        while pos + header <= size:
            stream, length = unpack(data, pos)
            end = pos + header + length
            if end > size:
                break
            yield stream, data[pos + header : end]
            pos = end


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


def _stamped_lines(
    frames: Iterable[tuple[int, bytes]], since: datetime | None, until: datetime | None
) -> Iterator[bytes]:
    """The payloads of timestamped frames, stamps taken off, of the lines that may lie within
    ``since`` and ``until`` (see :py:func:`_place`); a line split into frames is kept whole or not."""
    low, high = _docker_time(since), _docker_time(until)
    if low is None and high is None:
        yield from (payload.partition(b" ")[2] for _, payload in frames)
        return
    keep: dict[int, bool] = {}
    continued: dict[int, bool] = {}
    for stream, payload in frames:
        raw, _, text = payload.partition(b" ")
        if not continued.get(stream):
            keep[stream] = _place(_fixed_stamp(raw + b" ")[:-1], low, high) == 0
        continued[stream] = not text.endswith(b"\n")
        if keep[stream]:
            yield text


def _write_streams(
    frames: Iterable[tuple[int, bytes]], temps: _Dir, into: _Dir, names: Mapping[int, str]
) -> None:
    """Writes each stream's frames to its file ``names`` in ``into`` (via ``temps``), whole or not at all."""
    with contextlib.ExitStack() as stack:
        files = {stream: stack.enter_context(temps.written(name, into)) for stream, name in names.items()}
        continued = dict.fromkeys(names, False)
        for stream, payload in frames:
            out = files.get(stream)
            if out is not None:
                # A line Docker split into frames keeps its first timestamp only.
                payload = payload.partition(b" ")[2] if continued[stream] else _fixed_stamp(payload)
                out.write(payload)
                continued[stream] = not payload.endswith(b"\n")


def _read_harvested(f: BinaryIO, low: bytes | None, high: bytes | None) -> Iterator[tuple[bytes, bytes]]:
    """A harvested file's stamps and lines within ``low`` and ``high`` (see :py:func:`_place`). The file
    is in time order, so :py:func:`_place` runs only where it can matter: until a line stamped to the
    fraction lies past ``low`` (every later one does too), and from ``high``'s second on (a line of an
    earlier second is never after it)."""
    second = _SECOND_SIZE
    high_second = high[:second] if high is not None else b""
    with f:
        for raw in f:
            ts, _, text = raw.partition(b" ")
            if low is None and (high is None or ts[:second] < high_second):
                yield ts, text
                continue
            place = _place(ts, low, high)
            if place > 0:
                return
            if place == 0:
                yield ts, text
                if ts[second:] != _WHOLE_SECOND:
                    low = None


# -- the log directory: harvesting and serving ----------------------------------


def _harvest_failure(error: BaseException, log_dir: str) -> tuple[str, str]:
    """Why logs could not be recorded, and what fixes it."""
    if isinstance(error, UnsafeStateError):
        return str(error), "until then they stay in the container"
    if isinstance(error, OSError) and not isinstance(error, requests.exceptions.RequestException):
        return f"{error.strerror or error} in {log_dir}", _fix(error)
    if isinstance(error, docker.errors.APIError) and (
        error.status_code == 501 or "log driver" in str(error.explanation)  # Podman: 500, "'none' log driver"
    ):
        return (
            f"Docker cannot read them back: {error.explanation}",
            "run it with a logging driver Docker can read (json-file, local, journald) or turn on the "
            "daemon's dual logging; until then `docker logs` cannot show them either",
        )
    return f"{type(error).__name__}: {error}", "check that the Docker daemon answers"


class _Logs:
    """Every replica's logs: harvested from Docker once it ends, and served, live from Docker until
    then and from the files after: ``<state_dir>/<session>.logs/<app_id>/<role>.<id>.<stream>``. The
    app's directory also holds its start lock and the marker that says its containers started."""

    def __init__(self, state: _Dir, session_name: str, docker_: _Docker) -> None:
        self._state, self._name, self._docker = state, f"{session_name}.logs", docker_
        self.root = state.where(self._name)
        self._warned: set[tuple[str, str]] = set()

    # -- the app's directory ---------------------------------------------------

    def app_dir(self, app_id: str) -> str:
        return os.path.join(self.root, self._dir_name(app_id))

    @staticmethod
    def _dir_name(app_id: str) -> str:
        if not _CONTAINER_NAME.fullmatch(app_id):  # it names a directory: no separators, no '..'
            raise ValueError(f"app id {app_id!r} cannot name a log directory")
        return app_id

    def _app(self, app_id: str, create: bool = False) -> _Dir:
        with self._state.subdir(self._name, create) as root:
            return root.subdir(self._dir_name(app_id), create)

    @staticmethod
    def _file(rep: ReplicaRecord, stream: str) -> str:
        return f"{rep.role}.{rep.id}.{stream}"

    def lock_start(self, app_id: str) -> contextlib.ExitStack:
        """Takes the app's start lock, which readers test to leave a starting record alone: a ``flock``
        on the app's directory, so it dies with its process; released when the returned stack closes."""
        held = contextlib.ExitStack()
        app = held.enter_context(self._app(app_id, create=True))
        fcntl.flock(app.fd, fcntl.LOCK_EX)
        return held

    def start(self, app_id: str) -> _Start:
        """How the app's start stands: under way while a live process holds its start lock, then
        whether that process marked all its containers started. The lock is tested first: once it is
        free, the marker no longer changes."""
        try:
            with self._app(app_id) as app:
                fcntl.flock(app.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return "started" if app.stat(_STARTED) is not None else "not started"
        except BlockingIOError:
            return "under way"
        except OSError:
            return "not started"

    def mark_started(self, app_id: str) -> None:
        # Without it, a replica that vanishes reads "never created".
        with contextlib.suppress(OSError), self._app(app_id) as app:
            fd = app.create(_STARTED)
            if fd is not None:
                os.close(fd)

    def discard(self, app_id: str) -> None:
        """Removes the app's directory if it is empty, as a schedule that recorded nothing leaves it."""
        with contextlib.suppress(OSError), self._state.subdir(self._name) as root:
            os.rmdir(self._dir_name(app_id), dir_fd=root.fd)

    def check(self, app_id: str) -> None:
        """Raises :py:class:`UnsafeStateError` if the app's log directory, or the one above, is a symlink."""
        with contextlib.suppress(FileNotFoundError), self._app(app_id):
            pass

    def remove(self, app_id: str) -> None:
        """Removes the app's harvested logs; a symlink where they should be is refused, not followed."""
        try:
            with self._state.subdir(self._name) as root:
                root.remove_dir(self._dir_name(app_id))
        except FileNotFoundError:
            return
        except UnsafeStateError:
            raise
        except OSError as e:
            log.warning("could not remove the logs of app %s in %s: %s", app_id, self.root, e)

    # -- harvesting ----------------------------------------------------------

    def harvest(self, app_id: str, rep: ReplicaRecord) -> _Change:
        """Streams an ended replica's stdout and stderr from Docker to its files; returns its new log
        status. A failure is logged (once for each cause) and returned, not raised."""
        try:
            response = self._docker.logs(rep.name, ("stdout", "stderr"), timestamps=True, follow=False)
            with contextlib.closing(response), self._app(app_id, create=True) as app:
                names = {_STDOUT: self._file(rep, "stdout"), _STDERR: self._file(rep, "stderr")}
                _write_streams(_frames(response.iter_content(_READ_SIZE)), self._state, app, names)
        except NotFound:
            log.warning("container %s was removed before its logs were recorded; they are lost", rep.name)
            return _Change.of_logs("lost")
        except (DockerException, DockerUnavailableError, OSError, requests.exceptions.RequestException) as e:
            reason, fix = _harvest_failure(e, self.app_dir(app_id))
            # Said before the exit code is written: whether that worked, its own warning says.
            why = f"could not record the logs of container {rep.name} ({reason}): the container is kept until"
            again = "The next describe, list, log_iter or close tries again"
            _warn_once(self._warned, (rep.name, reason), f"{why} they are; {fix}. {again}")
            return _Change.of_logs("retry", reason)
        return _Change.of_logs("recorded")

    # -- serving -------------------------------------------------------------

    def lines(
        self,
        app_id: str,
        rep: ReplicaRecord,
        streams: Sequence[str],
        window: _Window,
        follow: bool,
        refreshed: Callable[[ReplicaRecord], ReplicaRecord],
    ) -> Iterator[bytes]:
        """A replica's lines of ``streams`` within ``window`` (since, until): live from Docker until its logs
        are recorded, then from its files. ``refreshed`` gives the replica after a fresh look at Docker."""
        if rep.logs_pending:  # recording them failed before: try again first
            with contextlib.suppress(DockerUnavailableError):
                rep = refreshed(rep)
        if rep.logs != "recorded":
            try:
                return self._live(rep.name, streams, window, follow)
            except NotFound:  # the container went away: maybe another process harvested it first
                rep = refreshed(rep)
            except docker.errors.APIError as e:  # e.g. a logging driver Docker cannot read back
                log.warning("Docker cannot serve the logs of %s: %s", rep.name, e.explanation or e)
                return iter(())
        if rep.logs == "recorded":
            try:
                return self._recorded(app_id, rep, streams, window)
            except FileNotFoundError:
                return self._reharvest(app_id, rep, streams, window)
        log.warning("the logs of %s are lost: its container was removed before they were read", rep.name)
        return iter(())

    def _live(self, name: str, streams: Sequence[str], window: _Window, follow: bool) -> Iterator[bytes]:
        """A container's lines from Docker: the request is made here, the body read as the lines are."""
        frames = self._frames(name, streams, window, follow)
        if follow:
            frames = self._caught_up(name, streams, window, frames)
        return _whole_lines(_stamped_lines(frames, *window))

    def _frames(
        self, name: str, streams: Sequence[str], window: _Window, follow: bool
    ) -> Iterator[tuple[int, bytes]]:
        response = self._docker.logs(name, streams, timestamps=True, follow=follow, **_seconds(window))
        return _frames(response.iter_content(_READ_SIZE))

    def _caught_up(
        self, name: str, streams: Sequence[str], window: _Window, frames: Iterator[tuple[int, bytes]]
    ) -> Iterator[tuple[int, bytes]]:
        """``frames`` of a followed log, then what the follow missed: dockerd 20.10's can end before a
        last line with no newline. A second read from the last second on, past as many frames as the
        follow gave from then: both read the log in the same order."""
        seconds: dict[bytes, int] = {}
        for stream, payload in frames:
            second = _fixed_stamp(payload)[:_SECOND_SIZE]
            seconds[second] = seconds.get(second, 0) + 1
            yield stream, payload
        last = max(seconds, default=b"")
        if _TIMESTAMP.match(last + b"Z"):
            window = (datetime.fromisoformat(f"{last.decode()}+00:00"), window[1])
        else:  # nothing, or nothing stamped: read the whole window again
            last = b""
        try:
            rest = self._frames(name, streams, window, False)
        except NotFound:  # removed meanwhile: what the follow gave is all there is
            return
        yield from itertools.islice(rest, sum(n for s, n in seconds.items() if s >= last), None)

    def _recorded(
        self, app_id: str, rep: ReplicaRecord, streams: Sequence[str], window: _Window
    ) -> Iterator[bytes]:
        """The harvested lines of ``streams`` within ``window``, in time order (FileNotFoundError: gone)."""
        with self._app(app_id) as app, contextlib.ExitStack() as opened:
            files = [opened.enter_context(os.fdopen(app.open(self._file(rep, s)), "rb")) for s in streams]
            opened.pop_all()  # the reader closes them
        low, high = (_docker_time(t) for t in window)
        merged = heapq.merge(*(_read_harvested(f, low, high) for f in files), key=lambda entry: entry[0])
        return (text for _, text in merged)

    def _reharvest(
        self, app_id: str, rep: ReplicaRecord, streams: Sequence[str], window: _Window
    ) -> Iterator[bytes]:
        """Logs whose harvested files were removed by hand: harvested again while the container is kept."""
        files = f"the log files of {rep.name} in {self.app_dir(app_id)}"
        if self._docker.inspect(rep.name) is None:
            log.warning("%s were removed, and so was its container: the logs are gone", files)
            return iter(())
        log.warning("%s were removed; reading them again from its container", files)
        if self.harvest(app_id, rep).logs != "recorded":  # could not write them: serve them from Docker
            return self._live(rep.name, streams, window, False)
        return self._recorded(app_id, rep, streams, window)


# == Ownership: a state directory's containers, an app's engine ===============


class OtherEngineError(RuntimeError):
    """``cancel``, ``delete`` or ``wait`` of an app that runs on another Docker engine than the one this
    process talks to; the message names both, and the setting that reaches the app's. ``record`` is
    the app's record, as last written."""

    def __init__(self, message: str, record: AppRecord) -> None:
        super().__init__(message)
        self.record = record


class _Ownership:
    """Which containers are a session's in a state directory, and whether an app's engine is the
    one this process talks to. Containers carry the session's name and the state directory's identity."""

    def __init__(self, docker_: _Docker, session_name: str, identity: Callable[[], str]) -> None:
        self._docker = docker_
        self._session_name = session_name
        self._identity = identity  # made with the state directory, read when first needed
        self._warned: set[tuple[str, str]] = set()

    @property
    def labels(self) -> dict[str, str]:
        """The labels of the session's containers in this state directory."""
        return {LABEL_SESSION: self._session_name, LABEL_STATE_DIR: self._identity()}

    def containers(self, app_id: str | None = None) -> builtins.list[dict[str, Any]]:
        """The session's containers in this state directory: all, or those of ``app_id``."""
        labels = self.labels if app_id is None else {**self.labels, LABEL_APP_ID: app_id}
        return [c for c in self._docker.containers(labels) if self._labels_valid(c)]

    def _labels_valid(self, container: Mapping[str, Any]) -> bool:
        """Whether its labels name an app, role and replica as submitted ones are named; they become
        paths in the log directory. One that is not is ignored, with one warning."""
        labels = container["Labels"]
        app_id, role, replica = (labels.get(k, "") for k in (LABEL_APP_ID, LABEL_ROLE_NAME, LABEL_REPLICA_ID))
        if _CONTAINER_NAME.fullmatch(app_id) and _CONTAINER_NAME.fullmatch(f"x{role}") and replica.isdigit():
            return True
        name = _container_name(container)
        why = f"labels name app {app_id!r}, role {role!r}, replica {replica!r}, which no app here could have"
        _warn_once(
            self._warned, (name, "labels"), f"ignoring container {name}: its {why}; nothing is recorded"
        )
        return False

    def check_engine(self, record: AppRecord | None) -> None:
        """The one decision on engines: raises :py:class:`OtherEngineError` when ``record`` was scheduled on
        another engine than this process talks to, so that nothing here acts on it or records an end it
        did not have. An app adopted from its containers belongs to the engine that listed them."""
        here = self._docker.endpoint
        if record is None or not record.engine_id or record.engine_endpoint == here.url:
            return
        if record.engine_id == self._docker.engine_id:  # the same engine, reached another way (ssh, tcp)
            return
        there = _Endpoint(record.engine_endpoint, record.engine_context)
        setting = f"DOCKER_CONTEXT={there.context}" if there.context else f"DOCKER_HOST={there.url}"
        raise OtherEngineError(
            f"app {record.app_id} runs on the Docker engine at {there} (ID {record.engine_id}), and this "
            f"scheduler talks to the one at {here} (ID {self._docker.engine_id}): its state is as last "
            f"recorded; set {setting} to reach it",
            record,
        )


# == Reconciliation: what a record and Docker's listing call for ==============
# Deciding is pure: _plan() looks at a record and the containers Docker listed for it, and says which
# replicas still run, which ended and must be inspected and harvested, whose logs to try again, and
# which ends are known already. _Reconciler carries the plan out, records the ends, then removes containers.


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What to do about one app, from its record and Docker's listing."""

    #: live states of the replicas still going, by container name
    live: Mapping[str, AppState] = dataclasses.field(default_factory=dict)
    #: containers that ended: read the exit code, then harvest the logs
    inspect: tuple[str, ...] = ()
    #: ended replicas whose logs could not be recorded before: harvest again
    retry: tuple[str, ...] = ()
    #: what is known without asking Docker again
    changes: Mapping[str, _Change] = dataclasses.field(default_factory=dict)
    #: the record changes even when no replica ended: it is no longer starting
    write: bool = False


#: Where an app's start stands (see :py:meth:`_Logs.start`), read before Docker lists its containers.
_Start = Literal["under way", "started", "not started"]
#: An app's containers as Docker listed them, and where its start stood before they were listed.
_Listed = tuple[Sequence[Mapping[str, Any]], _Start]


def _plan(record: AppRecord, listed: Mapping[str, Mapping[str, Any]], start: _Start, now: float) -> _Plan:
    """Decides what ``listed`` (containers by name) means for ``record``; performs no I/O. ``start`` was
    read before the listing: a record whose start was under way then is left alone, since its
    containers may have come after the listing; once its start was over, a replica without a
    container was never created, unless the app's started marker said otherwise."""
    if record.starting and start == "under way":
        return _Plan(live={name: _container_state(c) for name, c in listed.items()})
    live: dict[str, AppState] = {}
    changes: dict[str, _Change] = {}
    inspect, retry = [], []
    for rep in record.replicas:
        container = listed.get(rep.name)
        if rep.logs_pending and container is None:
            changes[rep.name] = _Change.of_logs("lost")
        elif rep.logs_pending:
            retry.append(rep.name)
        elif rep.final:
            continue
        elif container is None:
            why = _GONE_NEVER_CREATED if record.starting and start != "started" else _GONE_BEFORE_READ
            changes[rep.name] = _Change.gone(why, now)
        elif container["State"] in _ENDED:
            inspect.append(rep.name)
        else:
            live[rep.name] = _container_state(container)
    return _Plan(live, tuple(inspect), tuple(retry), changes, write=record.starting)


def _exit_change(inspected: Mapping[str, Any]) -> _Change | None:
    """The end ``docker inspect`` shows, or None when the container is going again (restarted)."""
    state = inspected["State"]
    if state.get("Status") not in _ENDED or state.get("Running") or state.get("Restarting"):
        return None
    notes = ["out of memory"] if state.get("OOMKilled") else []
    if state.get("Error"):
        notes.append(_scrubbed(str(state["Error"]), (inspected.get("Config") or {}).get("Env")))
    return _Change(
        exit_code=int(state["ExitCode"]),
        exit_note="; ".join(notes),
        restarts=int(inspected.get("RestartCount") or 0),
        ended=_finished_at(state.get("FinishedAt")),
    )


class _Reconciler:
    """Brings records up to date with Docker: carries :py:func:`_plan` out, inspects and
    harvests ended replicas side by side, records their ends, and only then removes the
    containers ``remove_on_exit`` may. Harvesting never raises."""

    def __init__(self, store: _SessionStore, docker_: _Docker, logs: _Logs, ours: _Ownership) -> None:
        self._store, self._docker, self._logs, self._ours = store, docker_, logs, ours
        self._warned: set[tuple[str, str]] = set()
        self._busy: dict[str, threading.Lock] = {}  # by app id: one reconcile of an app at a time here

    def rebuild(self) -> dict[str, AppRecord]:
        """Records for every app of the session that Docker has containers of."""
        adopted = _records_from_containers(self._ours.containers(), self._docker.engine)
        return {app_id: record for app_id, (record, _) in adopted.items()}

    def from_containers(self, app_id: str) -> tuple[AppRecord | None, dict[str, AppState]]:
        """A record for an app known only from its containers, and their states; or None and {}."""
        adopted = _records_from_containers(self._ours.containers(app_id), self._docker.engine)
        return adopted.get(app_id, (None, {}))

    def start(self, record: AppRecord) -> _Start:
        """Where the record's start stands; read it before listing the containers (see :py:func:`_plan`)."""
        return self._logs.start(record.app_id) if record.starting else "started"

    def reconcile(
        self, record: AppRecord, listed: _Listed | None = None
    ) -> tuple[AppRecord, dict[str, AppState]]:
        """The record brought up to date with its containers (``listed``, with where its start stood
        before they were listed; or both asked for here), and the live states of the replicas still
        going; :py:class:`OtherEngineError` for another engine's app."""
        self._ours.check_engine(record)
        with self._busy.setdefault(record.app_id, threading.Lock()):
            record = self._store.get(record.app_id) or record  # what a reconcile that ran meanwhile found
            if not record.asks_docker:
                return record, {}
            if listed is None:
                start = self.start(record)
                listed = self._ours.containers(record.app_id), start
            plan = _plan(record, {_container_name(c): c for c in listed[0]}, listed[1], time.time())
            live, changes = self._carry_out(record, plan)
            if not (changes or plan.write):
                return record, live
            record, recorded = self._record(record, changes)
        if recorded and record.remove_on_exit:  # only once the ends are on disk
            self._docker.remove(_done_with(record, among=changes))
        return record, live

    def _carry_out(self, record: AppRecord, plan: _Plan) -> tuple[dict[str, AppState], dict[str, _Change]]:
        """Inspects and harvests what ``plan`` says, side by side: the live states and the changes."""
        live, changes = dict(plan.live), dict(plan.changes)
        reps = {rep.name: rep for rep in record.replicas}
        for name in changes:
            if reps[name].logs_pending:
                log.warning("container %s was removed before its logs were recorded; they are lost", name)
        names = [*plan.inspect, *plan.retry]
        harvested = _fan_out(lambda name: self._harvest(record.app_id, reps[name], name in plan.retry), names)
        for name, change in zip(names, harvested, strict=True):
            if change is None:  # restarted since it was listed
                live[name] = AppState.PENDING
            else:
                changes[name] = change
        return live, changes

    def _harvest(self, app_id: str, rep: ReplicaRecord, logs_only: bool) -> _Change | None:
        """What an ended replica's container says of its end (unless ``logs_only``) and of its logs,
        once they are recorded; None when the container turns out to be going again."""
        if logs_only:
            return self._logs.harvest(app_id, rep)
        inspected = self._docker.inspect(rep.name)
        if inspected is None:
            return _Change.gone(_GONE_BEFORE_READ, time.time())
        exited = _exit_change(inspected)
        return None if exited is None else exited | self._logs.harvest(app_id, rep)

    def _record(self, seen: AppRecord, changes: Mapping[str, _Change]) -> tuple[AppRecord, bool]:
        """The record with ``changes``, no longer starting, and whether it was written; when the write
        fails, the record as learnt, unwritten."""
        app_id = seen.app_id

        def changed(record: AppRecord) -> AppRecord:
            return dataclasses.replace(record.with_changes(changes), starting=False)

        try:
            with self._store.update() as apps:
                current = self._store.get(app_id)
                if current is None:  # deleted meanwhile: the logs just harvested go too
                    self._logs.remove(app_id)
                    return changed(seen), False
                record = apps[app_id] = changed(current)
        except OSError as e:
            why = f"could not record the end of app {app_id} in {os.path.dirname(self._store.path)} ({e}); "
            why += "its state comes from Docker until it can"
            _warn_once(self._warned, (app_id, str(e)), why)
            return changed(seen), False
        return record, True

    def replica_now(self, app_id: str, rep: ReplicaRecord) -> ReplicaRecord:
        """``rep`` as recorded after looking at the app's containers again."""
        record = self._store.get(app_id)
        if record is None:
            return rep
        record, _ = self.reconcile(record)
        return next(r for r in record.replicas if r.name == rep.name)


# == Scheduler ================================================================


class PersistentDockerScheduler(DockerScheduler):
    """
    A torchx scheduler that runs apps as local Docker containers and keeps a durable record of each
    one: ``local_docker``'s AppDefs, run options and workspaces, with exact states and exit codes and
    logs that outlive the containers, in any process. ``describe`` reports CANCELLED for cancelled apps,
    FAILED when any replica failed or vanished before its exit code was seen, SUCCEEDED only when every
    replica succeeded, and ``None`` for an unknown app id.

    Args:
        session_name: names the session file; non-empty, no path separator, no ``..``.
        state_dir: the directory for session files and harvested logs; unset, ``$DOCKER_SCHEDULER_STATE_DIR``,
            else ``${XDG_STATE_HOME:-~/.local/state}/docker_scheduler``.
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
        self._state, self._state_dir_source = _open_state_dir(state_dir)
        self.state_dir = self._state.path
        self._store = _SessionStore(self._state, session_name, lambda: self._reconciler.rebuild())
        self._docker = _Docker()
        self._logs = _Logs(self._state, session_name, self._docker)
        self._ours = _Ownership(self._docker, session_name, lambda: self._state_dir_id)
        self._reconciler = _Reconciler(self._store, self._docker, self._logs, self._ours)
        self._scheduled: dict[str, float] = {}  # app id: when this scheduler started it (monotonic)
        self._warned: set[tuple[str, str]] = set()
        self._closed = False
        with contextlib.suppress(OSError):  # made with the directory; a read-only one is told when it matters
            self._state_dir_id  # noqa: B018

    @property
    def session_file(self) -> str:
        """The path of this session's pickled session file."""
        return self._store.path

    @property
    def _docker_client(self) -> DockerClient:
        # torchx's workspace builds and ours share one client.
        return self._docker.client

    @functools.cached_property
    def _state_dir_id(self) -> str:
        try:
            return _state_dir_identity(self._state)
        except OSError as e:
            raise self._nothing_started(e, f"record the state directory's identity in {IDENTITY_FILE}") from e

    # -- submit -----------------------------------------------------------

    def _run_opts(self) -> runopts:
        return _runopts(super()._run_opts())

    @classmethod
    def _opts_type(cls) -> Any:
        # the type torchx main converts ``cfg`` to before handing it over
        return PersistentDockerOpts if _TorchxDockerOpts is not None else None

    def _submit_dryrun(self, app: AppDef, cfg: Mapping[str, Any]) -> _DryRun:
        _validate_app(app)
        _image_pull(cfg)
        _stop_timeout(cfg)
        options = _container_options(cfg)
        info = super()._submit_dryrun(app, cast(Any, cfg))
        job = info.request
        _check_container_names(app, job.app_id, [str(c.kwargs["name"]) for c in job.containers])
        for c in job.containers:
            labels: dict[str, str] = c.kwargs["labels"]  # type: ignore[assignment]
            labels.update(self._ours.labels)
            c.kwargs.update(copy.deepcopy(options))
        return info

    def schedule(self, dryrun_info: _DryRun) -> str:
        """Records the app, marked starting, then starts every replica's container.

        When the record cannot be written, nothing is created and the error names the state directory.
        When a container cannot start, the ones already started are removed, the app is recorded FAILED
        with the reason, and the error is raised. Once the start lock is released, the next reader, in
        any process, adopts the containers that exist and fails the ones that never came.
        """
        job: DockerJob = dryrun_info.request
        app, cfg = _submitted(dryrun_info)
        with ThreadPoolExecutor(1) as pool:  # the engine's ID is asked for while the images are pulled
            engine = pool.submit(self._docker.engine)
            self._docker.prepare({c.image for c in job.containers}, _image_pull(cfg))
        record = _record_from_job(job, app, cfg, engine.result())
        try:
            start_lock = self._logs.lock_start(job.app_id)
        except OSError as e:
            raise self._nothing_started(e, f"create {self._logs.app_dir(job.app_id)}") from e
        with start_lock:
            try:
                self._save(record)
            except OSError as e:
                self._logs.discard(job.app_id)
                raise self._nothing_started(e, f"record app {job.app_id} in {self.state_dir}") from e
            failure = self._docker.start_all(job.containers)
            if failure is not None:
                self._record_start_failure(record, _start_failure(*failure), failure[1])
            self._logs.mark_started(job.app_id)
        self._scheduled[job.app_id] = time.monotonic()
        return job.app_id

    def _nothing_started(self, error: OSError, what: str) -> OSError:
        what = f"{what}, so nothing was started"
        return _state_dir_error(error, self.state_dir, self._state_dir_source, what)

    def _record_start_failure(self, record: AppRecord, reason: str, error: BaseException) -> None:
        try:
            self._save(_start_failed(record, reason))
        except OSError as e:
            what = f"app {record.app_id}: could not record that it could not start in {self.state_dir} ({e})"
            log.warning("%s; the next describe or list reconciles its record with its containers", what)
        raise RuntimeError(
            f"{reason}. Removed the app's other containers; it is recorded as FAILED"
        ) from error

    def _save(self, record: AppRecord) -> None:
        with self._store.update() as apps:
            apps[record.app_id] = record

    # -- query ------------------------------------------------------------

    def describe(self, app_id: str) -> DescribeAppResponse | None:
        """Describes ``app_id`` from the session file, asking Docker only while it runs; None if unknown.
        Within :py:data:`SETTLE_TIME` of this scheduler starting the app, it waits out the rest of that
        time for the app to end: torchx's CLI looks again only a second later, so a short app reads its
        end rather than RUNNING."""
        try:
            settle = self._scheduled.get(app_id, -math.inf) + SETTLE_TIME - time.monotonic()
            desc = self._awaited(app_id, settle) if settle > 0 else self._described(app_id)
        except OtherEngineError as e:
            return _describe_record(e.record, {}, [str(e)])
        if desc is None and _waits_for_ever(sys._getframe(1)):
            raise SystemExit(f"torchx log: {self._unknown(app_id)}")
        return desc

    def _described(self, app_id: str) -> DescribeAppResponse | None:
        record = self._store.get(app_id)
        if record is None:
            adopted, states = self._reconciler.from_containers(app_id)
            if adopted is None:
                _warn_once(self._warned, (app_id, "unknown"), self._unknown(app_id))
                return None
            return _describe_record(adopted, states)
        live: dict[str, AppState] = {}
        if not record.settled:
            record, live = self._reconciler.reconcile(record)
        elif record.asks_docker:
            with contextlib.suppress(DockerUnavailableError):  # only its logs are missing: retry later
                record, live = self._reconciler.reconcile(record)
        return _describe_record(record, live)

    def _unknown(self, app_id: str) -> str:
        return (
            f"session {self.session_name} in {self.state_dir} has no app {app_id}, and no container carries "
            "it: check the id (list(), or `torchx list -s local_docker_persistent`, lists the session's apps)"
        )

    def describe_native(self, app_id: str) -> AppDryRunInfo[DockerJob] | None:
        """The request ``app_id`` was scheduled with (each container's image, command and ``docker
        create`` kwargs), rebuilt from the session file, so after the containers are removed too;
        ``None`` for an app id the session file does not hold."""
        record = self._store.get(app_id)
        return None if record is None else AppDryRunInfo(_job_from_record(record), repr)

    def wait(self, app_id: str, timeout: float | None = None) -> DescribeAppResponse | None:
        """Blocks until ``app_id`` is in a terminal state, and returns :py:meth:`describe`'s answer
        (``None`` at once for an app id nobody knows). It listens to Docker's events for the app's
        containers rather than polling, so it works for apps another process scheduled.

        Raises:
            TimeoutError: when ``timeout`` seconds pass first; it names the app and its state.
            RuntimeError: when the app runs on another Docker engine; it says how to reach it.
        """
        desc = self._awaited(app_id, timeout)
        if desc is not None and not is_terminal(desc.state):
            raise TimeoutError(f"app {app_id} is still {desc.state.name} after {timeout} s")
        return desc

    def _awaited(self, app_id: str, timeout: float | None) -> DescribeAppResponse | None:
        """The app's description once it is terminal, or once ``timeout`` seconds passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        since = int(time.time())  # before the look, so no event after it is missed
        desc = self._described(app_id)
        seen: set[tuple[Any, ...]] = set()
        labels = {LABEL_SESSION: self.session_name, LABEL_APP_ID: app_id}
        while desc is not None and not is_terminal(desc.state):
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            died = self._docker.await_end(labels, since, remaining, seen)
            if died:
                self._docker.await_exited(died, remaining)
            desc = self._described(app_id)
        return desc

    def list(self, cfg: Mapping[str, Any] | None = None) -> builtins.list[ListAppResponse]:
        """This session's apps with their states, oldest first, with containers labelled with this
        session that the session file lacks; ``cfg`` is accepted as torchx main passes it, not needed."""
        summaries = self._store.summaries()
        recorded = {app_id for app_id, _ in summaries}
        starts = {app_id: self._start(app_id) for app_id, final in summaries if final is None}
        try:
            containers: list[dict[str, Any]] | None = self._ours.containers()
        except DockerUnavailableError as e:
            log.warning("listing from the session file only: %s", e)
            containers = None
        by_app = _by_app(containers or [])
        found = []
        for app_id, final in summaries:
            if final is None:
                listed = (by_app.get(app_id, []), starts[app_id]) if containers is not None else None
                final = self._current_state(app_id, listed)
            if final is not None:
                found.append(ListAppResponse(app_id=app_id, state=AppState[final]))
        unrecorded = [c for app_id, group in by_app.items() if app_id not in recorded for c in group]
        for app_id, (record, live) in _records_from_containers(unrecorded, self._docker.engine).items():
            found.append(ListAppResponse(app_id=app_id, state=_record_state(record, live)))
        return found

    def _start(self, app_id: str) -> _Start:
        record = self._store.get(app_id)
        return "started" if record is None else self._reconciler.start(record)

    def _current_state(self, app_id: str, listed: _Listed | None) -> str | None:
        record = self._store.get(app_id)
        if record is None:
            return None
        live: dict[str, AppState] = {}
        if listed is not None and record.asks_docker:
            with contextlib.suppress(OtherEngineError):  # as last recorded
                record, live = self._reconciler.reconcile(record, listed)
        return _record_state(record, live).name

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
        """Lines of one replica's log, each ending in a newline (but maybe the last), live from Docker
        while the container exists and from the harvested files once the replica ended, alike:
        ``since``/``until`` are inclusive (a naive datetime is local time; where the engine stamps
        to the second, a line in the second of a bound is kept), ``should_tail`` follows until the
        replica exits, ``streams`` picks stdout, stderr or both, ``regex`` keeps matching lines.

        Raises:
            ValueError: for an unknown app, role or replica index; it names the valid ones.
        """
        rep = self._find_replica(app_id, role_name, k)
        wanted = [s for s in ("stdout", "stderr") if streams in (None, Stream.COMBINED, s)]
        refreshed = functools.partial(self._reconciler.replica_now, app_id)
        try:
            lines = self._logs.lines(app_id, rep, wanted, (since, until), should_tail, refreshed)
        except OtherEngineError as e:
            log.warning("%s; its logs are there", e)
            return iter(())
        text = (line.decode("utf-8", "replace") for line in lines)
        return filter_regex(regex, text) if regex else text

    def _find_replica(self, app_id: str, role_name: str, k: int) -> ReplicaRecord:
        """The replica, from the session file or, for an app it lacks, from Docker's labels."""
        record = self._store.get(app_id) or self._reconciler.from_containers(app_id)[0]
        if record is None:
            raise ValueError(self._unknown(app_id))
        return _replica(record, role_name, k)

    # -- cancel, delete, prune and close ------------------------------------

    def cancel(self, app_id: str) -> None:
        """Stops ``app_id``'s containers; from then on every process sees CANCELLED. An app that already
        ended keeps its state; an unknown app id is logged and ignored."""
        if not self.exists(app_id):
            log.warning(
                "cancel: no app %r in session %r or in Docker; nothing to do", app_id, self.session_name
            )
            return
        self._cancel_existing(app_id)

    def _cancel_existing(self, app_id: str) -> None:
        recorded = self._store.get(app_id)
        self._ours.check_engine(recorded)
        if recorded is not None and recorded.settled:
            log.info("cancel: app %s already ended; nothing to do", app_id)
            return
        with self._store.update() as apps:
            # An app known to Docker only is adopted, so that its cancel is recorded.
            record = self._store.get(app_id) or self._reconciler.from_containers(app_id)[0]
            if record is None:
                log.info("cancel: app %s has no containers left; nothing to do", app_id)
                return
            record = apps[app_id] = record.with_cancel()
        names = [r.name for r in record.replicas if not r.final]
        stopping = f"app {app_id} ({', '.join(names)}): SIGTERM, then SIGKILL after {record.stop_timeout} s"
        log.info("cancel: stopping %s for any still running", stopping)
        self._docker.stop(names, record.stop_timeout)
        self._reconciler.reconcile(record)

    def delete(self, app_id: str) -> None:
        """Forgets ``app_id`` (``torchx delete`` on torchx main): stops what still runs, then removes
        its containers, its harvested logs and, last, its record; an unknown app id is ignored."""
        self._delete(app_id)

    def _delete(self, app_id: str) -> bool:
        """:py:meth:`delete`; whether this call removed the app's record (not another process)."""
        recorded = self._store.get(app_id)
        self._ours.check_engine(recorded)
        containers = self._ours.containers(app_id)
        if recorded is None and not containers:
            log.debug("delete: no app %r in session %r or in Docker", app_id, self.session_name)
            return False
        self._logs.check(app_id)  # a symlink is refused before anything is removed
        self._docker.stop(_to_stop(containers), recorded.stop_timeout if recorded else STOP_TIMEOUT)
        self._docker.remove([_container_name(c) for c in containers])
        # The record goes last: until then a crash leaves the app listed, and delete can run again.
        self._logs.remove(app_id)
        with self._store.update() as apps:
            removed = self._store.get(app_id) is not None  # nothing to write for an app it does not hold
            if removed:
                apps[app_id] = None
        log.info("deleted app %s from session %s", app_id, self.session_name)
        return removed

    def prune(self, older_than: timedelta) -> builtins.list[str]:
        """Deletes, as :py:meth:`delete` does, this session's apps whose last replica ended longer ago
        than ``older_than``, and returns their ids, oldest first: those this call removed, so that
        processes pruning at once each return the apps they removed. Running apps are never touched."""
        cutoff = time.time() - older_than.total_seconds()
        pruned = []
        for app_id, _ in self._store.summaries():
            record = self._store.get(app_id)
            if record is not None and not record.settled:
                with contextlib.suppress(OtherEngineError):  # not this engine's to touch
                    record, _ = self._reconciler.reconcile(record)
            if record is not None and record.settled and record.ended_at < cutoff and self._delete(app_id):
                pruned.append(app_id)
        return pruned

    def close(self) -> None:
        """Ends this instance; idempotent, never raises. Unless ``detach=True``, the apps it scheduled
        that still run are stopped and recorded CANCELLED, every exit code and log is harvested, and
        its containers are removed. Garbage collection and interpreter exit never stop anything."""
        if self._closed:
            return
        self._closed = True
        if not self.detach:
            for app_id in self._scheduled:
                try:
                    self._shut_down(app_id)
                except Exception as e:
                    log.warning("close: could not shut down app %s: %s", app_id, e)
        self._docker.close()

    def _shut_down(self, app_id: str) -> None:
        record = self._store.get(app_id)
        if record is None:
            return
        if record.asks_docker:
            record, _ = self._reconciler.reconcile(record)
        if not record.settled:
            self._cancel_existing(app_id)
            record = self._store.get(app_id) or record
        done = _done_with(record)
        kept = [r.name for r in record.replicas if r.name not in done]
        if kept:
            log.warning("close: keeping containers %s: their logs could not be recorded", kept)
        self._docker.remove(done)


# == Factory ==================================================================


def create_scheduler(
    session_name: str, state_dir: str | None = None, detach: bool = True, **kwargs: Any
) -> PersistentDockerScheduler:
    """The torchx scheduler factory (entry point ``local_docker_persistent``).

    ``detach`` defaults to True here, unlike the class: torchx's CLI and ``Runner`` close their
    schedulers when they exit, and an app started with ``torchx run`` must outlive the CLI. Other
    keyword arguments are ignored.
    """
    if kwargs:
        log.debug("create_scheduler ignores %s", sorted(kwargs))
    return PersistentDockerScheduler(session_name, state_dir=state_dir, detach=detach)
