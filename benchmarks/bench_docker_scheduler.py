"""Side-by-side benchmark: torchx's DockerScheduler (``local_docker``) and ours.

Run from the repository root, against the same daemon as the tests::

    python benchmarks/bench_docker_scheduler.py [--runs 7]

Each case runs the same work on both schedulers in one process, alternating
torchx, ours, torchx, ours, and prints medians, min/max and the ratio
torchx/ours (above 1: ours is faster), with the Docker API requests each made.
Images are referred to by id so that neither scheduler asks a registry. Every
container made here is removed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import platform
import py_compile
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import docker  # noqa: E402
from torchx import specs  # noqa: E402
from torchx.schedulers.docker_scheduler import LABEL_APP_ID, DockerScheduler  # noqa: E402

import docker_scheduler  # noqa: E402
from docker_scheduler import PersistentDockerScheduler  # noqa: E402
from test_docker_scheduler import provision_busybox, ssh_engine  # noqa: E402

LONG = "trap 'exit 143' TERM; sleep 600 & wait"
# Makes a `seq` line about 90 bytes, as a training log's lines are.
PADDING = "step loss=0.1234 lr=0.000300 grad_norm=1.2345 tokens_per_second=123456.7 epoch=3"


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


class RequestCounter:
    """Counts the Docker API requests of one client, and the time spent in them."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.count = 0
        self.seconds = 0.0
        send = client.api.send

        def timed_send(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return send(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.count += 1

        client.api.send = timed_send

    def reset(self) -> None:
        self.count, self.seconds = 0, 0.0


@dataclass
class Row:
    case: str
    unit: str
    target: str
    torchx: list[float] = field(default_factory=list)
    ours: list[float] = field(default_factory=list)
    requests: dict[str, float] = field(default_factory=dict)
    note: str = ""
    higher_is_better: bool = False
    baseline: str = "torchx"

    def ratio(self) -> float:
        """How many times faster ours is: above 1, ours wins."""
        torchx, ours = statistics.median(self.torchx), statistics.median(self.ours)
        return ours / torchx if self.higher_is_better else torchx / ours


def per_call(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def wait_until(predicate: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the benchmark's containers did not get there in time")
        time.sleep(0.1)


# ---------------------------------------------------------------------------
# The two schedulers on the same work
# ---------------------------------------------------------------------------


class Bench:
    def __init__(self, runs: int) -> None:
        self.runs = runs
        self.client = docker.from_env()
        self.image = self.client.images.get(provision_busybox(self.client)).id
        self.state_dir = tempfile.mkdtemp(prefix="docker-scheduler-bench-")
        self.session = f"bench-{uuid.uuid4().hex[:8]}"
        self.torchx = DockerScheduler(self.session)
        self.ours = PersistentDockerScheduler(self.session, state_dir=self.state_dir, detach=True)
        self.counters = {
            "torchx": RequestCounter(self.torchx._docker_client),
            "ours": RequestCounter(self.ours._docker_client),
        }
        self.app_ids: list[str] = []

    def app(self, script: str, replicas: int = 1) -> specs.AppDef:
        role = specs.Role("r", image=self.image, entrypoint="sh", args=["-c", script], num_replicas=replicas)
        return specs.AppDef("bench", roles=[role])

    def submit(self, which: str, script: str, replicas: int = 1) -> str:
        app_id: str = self.scheduler(which).submit(self.app(script, replicas), {})
        self.app_ids.append(app_id)
        return app_id

    def exited(self, app_id: str) -> bool:
        found = self.client.api.containers(all=True, filters={"label": f"{LABEL_APP_ID}={app_id}"})
        return bool(found) and all(c["State"] == "exited" for c in found)

    def running(self, app_id: str, replicas: int) -> bool:
        found = self.client.api.containers(filters={"label": f"{LABEL_APP_ID}={app_id}"})
        return len(found) == replicas

    def remove(self, app_ids: Iterable[str]) -> None:
        for app_id in app_ids:
            for c in self.client.api.containers(all=True, filters={"label": f"{LABEL_APP_ID}={app_id}"}):
                self.client.api.remove_container(c["Id"], force=True)

    def close(self) -> None:
        self.remove(self.app_ids)  # and the apps fresh processes submitted, by this run's session label
        session = f"{docker_scheduler.LABEL_SESSION}={self.session}"
        for c in self.client.api.containers(all=True, filters={"label": session}):
            self.client.api.remove_container(c["Id"], force=True)
        self.ours.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def scheduler(self, which: str) -> Any:
        return self.torchx if which == "torchx" else self.ours

    def per_call_ms(self, row: Row, calls: int, call: Callable[[str, Any], object]) -> Row:
        """Times ``call(which, scheduler)`` over ``calls`` calls a run: ms and Docker requests a call."""

        def measure(which: str) -> float:
            scheduler = self.scheduler(which)
            seconds = per_call(lambda: call(which, scheduler), calls)
            self.counters[which].count //= calls
            return seconds * 1e3

        return self.alternate(row, measure)

    def alternate(self, row: Row, measure: Callable[[str], float]) -> Row:
        for _ in range(self.runs):
            for which in ("torchx", "ours"):
                self.counters[which].reset()
                getattr(row, which).append(measure(which))
                row.requests[which] = self.counters[which].count
        return row

    # -- cases --------------------------------------------------------------

    def describe_finished(self) -> Row:
        apps = {which: self.submit(which, "true") for which in ("torchx", "ours")}
        wait_until(lambda: all(self.exited(a) for a in apps.values()))
        self.ours.describe(apps["ours"])  # records the exit code and logs once
        row = Row("describe(), finished 1-replica app", "ms/call", ">= 20x")
        return self.per_call_ms(row, 200, lambda which, s: s.describe(apps[which]))

    def describe_running(self) -> Row:
        apps = {which: self.submit(which, LONG, replicas=4) for which in ("torchx", "ours")}
        wait_until(lambda: all(self.running(a, 4) for a in apps.values()))
        row = Row("describe(), running 4-replica app", "ms/call", ">= 2x, <= 1 request")
        try:
            return self.per_call_ms(row, 50, lambda which, s: s.describe(apps[which]))
        finally:
            self.remove(apps.values())

    def schedule_8(self) -> Row:
        row = Row("schedule(), 8-replica app", "ms", ">= 1.4x")
        made: list[str] = []

        def measure(which: str) -> float:
            scheduler = self.scheduler(which)
            info = scheduler.submit_dryrun(self.app(LONG, replicas=8), {})
            start = time.perf_counter()
            made.append(scheduler.schedule(info))
            elapsed = time.perf_counter() - start
            self.app_ids.append(made[-1])
            self.remove([made[-1]])
            return elapsed * 1e3

        return self.alternate(row, measure)

    def log_200k(self) -> Row:
        lines = 200_000
        apps = {which: self.submit(which, f"seq 1 {lines}") for which in ("torchx", "ours")}
        wait_until(lambda: all(self.exited(a) for a in apps.values()))
        self.ours.describe(apps["ours"])  # harvests the log once
        row = Row("log_iter(), finished replica, 200,000 lines", "k lines/s", ">= 1x", higher_is_better=True)

        def measure(which: str) -> float:
            scheduler = self.scheduler(which)
            start = time.perf_counter()
            count = sum(1 for _ in scheduler.log_iter(apps[which], "r", 0))
            assert count == lines, (which, count)
            return lines / (time.perf_counter() - start) / 1e3

        self.alternate(row, measure)
        rss = {which: self.peak_rss(which, apps[which]) for which in ("torchx", "ours")}
        base = self.peak_rss("ours", apps["ours"], read=False)
        row.note = (
            f"peak RSS of a process reading the whole log: torchx {rss['torchx']:.0f} MB, "
            f"ours {rss['ours']:.0f} MB (target < 100 MB); the same process reading nothing: {base:.0f} MB"
        )
        return row

    def peak_rss(self, which: str, app_id: str, read: bool = True) -> float:
        """Peak RSS of a fresh process that reads the whole log, in MB."""
        make = (
            f"DockerScheduler({self.session!r})"
            if which == "torchx"
            else f"PersistentDockerScheduler({self.session!r}, state_dir={self.state_dir!r})"
        )
        code = textwrap.dedent(
            f"""
            import resource
            from torchx.schedulers.docker_scheduler import DockerScheduler
            from docker_scheduler import PersistentDockerScheduler
            s = {make}
            n = sum(1 for _ in s.log_iter({app_id!r}, "r", 0)) if {read!r} else 0
            print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
        )
        return float(out.stdout.strip())

    def list_100(self) -> Row:
        apps = [self.submit("ours", "true") for _ in range(100)]
        wait_until(lambda: all(self.exited(a) for a in apps), timeout=300)
        self.ours.list()  # records the 100 exit codes once
        row = Row("list(), 100 finished apps", "ms/call", ">= 10x")
        listed: dict[str, set[str]] = {}

        def call(which: str, scheduler: Any) -> None:
            listed[which] = {a.app_id for a in scheduler.list()}

        try:
            self.per_call_ms(row, 3, call)
        finally:
            self.remove(apps)
        assert all(found >= set(apps) for found in listed.values()), "a scheduler missed an app"
        return row

    def docker_logs_seconds(self, names: Iterable[str]) -> float:
        """`docker logs --timestamps` of each container in turn, into /dev/null."""
        start = time.perf_counter()
        for name in names:
            subprocess.run(["docker", "logs", "--timestamps", name], stdout=subprocess.DEVNULL, check=True)
        return time.perf_counter() - start

    def first_describe(self, replicas: int, lines: int, case: str, target: str) -> Row:
        """The first describe() after replicas exit (it harvests their logs), against `docker logs -t`."""
        script = f"seq 1 {lines} | sed 's/$/ {PADDING}/'"
        row = Row(
            case,
            "s",
            target,
            baseline=f"{replicas} x `docker logs -t`" if replicas > 1 else "`docker logs -t`",
        )
        for _ in range(self.runs):
            app_id = self.submit("ours", script, replicas)
            wait_until(lambda app_id=app_id: self.exited(app_id), timeout=600)
            names = [f"{app_id}-r-{k}" for k in range(replicas)]
            row.torchx.append(self.docker_logs_seconds(names))
            start = time.perf_counter()
            desc = self.ours.describe(app_id)
            row.ours.append(time.perf_counter() - start)
            assert desc is not None and "logs not recorded" not in desc.msg, desc
            self.remove([app_id])
        return row

    def ssh(self) -> list[Row]:
        """Over ssh, through a real sshd on 127.0.0.1, beside the Docker CLI doing the same through it:
        a fresh process's first describe() after a 300,000-line replica exits, its first describe() of
        a running app and first list() of 100 apps, submit-and-wait of `true`, and a long-lived
        scheduler's describe() of a running app; then some of them again with 50 ms of round trip
        added (a delaying proxy: the kernel here has no netem). Each with the ssh connections it
        made, counted in sshd's log."""
        with (
            tempfile.TemporaryDirectory(prefix="docker-scheduler-bench-ssh-") as d,
            ssh_engine(Path(d)) as ssh,
        ):
            make = "from docker_scheduler import PersistentDockerScheduler as S\n"
            make += f"s = S({self.session!r}, state_dir={self.state_dir!r}, detach=True)"
            meter = SSHMeter(Path(d) / "sshd.log", {**os.environ, **ssh}, self.runs, make)
            rows = [self.ssh_first_describe(meter), *self.ssh_running(meter, "over ssh")]
            rows += [self.ssh_list(meter), self.ssh_submit(meter, "over ssh")]
            slow = dataclasses.replace(meter, env={**meter.env, **with_latency(Path(d), ssh, 0.025)})
            rows += [*self.ssh_running(slow, "over ssh +50 ms"), self.ssh_submit(slow, "over ssh +50 ms")]
        return rows

    def ssh_first_describe(self, meter: SSHMeter) -> Row:
        row = Row(
            "fresh process over ssh, first describe() after a 300,000-line replica exits",
            "ms",
            ">= 0.9x",
            baseline="`docker -H ssh://... logs -t`",
        )
        for _ in range(self.runs):
            app_id = self.submit("ours", f"seq 1 300000 | sed 's/$/ {PADDING}/'")
            wait_until(lambda app_id=app_id: self.exited(app_id), timeout=600)
            logs = ["docker", "logs", "--timestamps", f"{app_id}-r-0"]
            meter.measure(row, logs, meter.fresh(f"s.describe({app_id!r})"))
            assert "logs not recorded" not in str(self.ours.describe(app_id))
            self.remove([app_id])
        return meter.noted(row)

    def ssh_running(self, meter: SSHMeter, how: str) -> list[Row]:
        """describe() of a running app: a fresh process's first, and a long-lived scheduler's, per call."""
        running = self.submit("ours", LONG, replicas=4)
        wait_until(lambda: self.running(running, 4))
        ps_app = ["docker", "ps", "-a", "--filter", f"label={LABEL_APP_ID}={running}"]
        baseline = "`docker -H ssh://... ps -a --filter label=<app>`"
        first = meter.row(
            f"fresh process {how}, first describe() of a running 4-replica app",
            baseline,
            ps_app,
            meter.fresh(f"assert s.describe({running!r}).state.name == 'RUNNING'"),
        )
        saved = dict(os.environ)
        os.environ.update(meter.env)  # its ssh processes start, and find the engine, with the ssh environment
        try:
            remote = PersistentDockerScheduler(self.session, state_dir=self.state_dir, detach=True)
            remote.describe(running)  # connects
            row = Row(f"long-lived scheduler {how}, describe() of a running 4-replica app", "ms", "(none)")
            row.baseline = baseline
            for _ in range(self.runs):
                meter.measure(row, ps_app, lambda: per_call(lambda: remote.describe(running), 20), calls=20)
            remote.close()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.remove([running])
        return [first, meter.noted(row)]

    def ssh_list(self, meter: SSHMeter) -> Row:
        apps = [self.submit("ours", "true") for _ in range(100)]
        wait_until(lambda: all(self.exited(a) for a in apps), timeout=300)
        self.ours.list()  # records the 100 exit codes once
        ps_session = [
            "docker",
            "ps",
            "-a",
            "--filter",
            f"label={docker_scheduler.LABEL_SESSION}={self.session}",
        ]
        try:
            return meter.row(
                "fresh process over ssh, first list() of 100 finished apps",
                "`docker -H ssh://... ps -a --filter label=<session>`",
                ps_session,
                meter.fresh("assert len(s.list()) >= 100"),
            )
        finally:
            self.remove(apps)

    def ssh_submit(self, meter: SSHMeter, how: str) -> Row:
        submit = "from torchx import specs\n"
        submit += f"r = specs.Role('r', image={self.image!r}, entrypoint='true')\n"
        submit += "a = s.submit(specs.AppDef('bench', roles=[r]), {})\n"
        submit += "assert s.wait(a, timeout=120).state.name == 'SUCCEEDED'"
        return meter.row(
            f"fresh process {how}, submit and wait until a `true` app ends",
            "`docker -H ssh://... run --rm busybox true`",
            ["docker", "run", "--rm", self.image, "true"],
            meter.fresh(submit),
        )

    def harvest_rss_1gb(self) -> Row:
        """Peak RSS of a fresh process whose first describe() harvests a 1 GB log."""
        line = "x" * 1023
        app_id = self.submit("ours", f"yes {line} | head -n {2**20}")
        wait_until(lambda: self.exited(app_id), timeout=900)
        code = textwrap.dedent(
            f"""
            import resource, time
            from docker_scheduler import PersistentDockerScheduler
            s = PersistentDockerScheduler({self.session!r}, state_dir={self.state_dir!r}, detach=True)
            start = time.perf_counter()
            d = s.describe({app_id!r})
            assert "logs not recorded" not in d.msg, d.msg
            print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - start)
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
        )
        rss, seconds = map(float, out.stdout.split())
        size = os.path.getsize(os.path.join(self.state_dir, f"{self.session}.logs", app_id, "r.0.stdout"))
        self.remove([app_id])
        shutil.rmtree(os.path.join(self.state_dir, f"{self.session}.logs", app_id), ignore_errors=True)
        return Row(
            "peak RSS of the process harvesting a 1 GB log",
            "MB",
            "< 100 MB",
            ours=[rss],
            note=f"harvested {size / 2**30:.2f} GiB (with timestamps) in {seconds:.1f} s",
        )

    def cli_echo(self) -> Row:
        """End-to-end wall time of `torchx run ... utils.echo --msg hello`, each scheduler."""
        row = Row("`torchx run` of utils.echo, end to end", "s", ">= 1.0x")
        # torchx's modules were compiled when pip installed them; this one is compiled here alike,
        # since PYTHONDONTWRITEBYTECODE (set on some machines) would compile it again in every process.
        py_compile.compile(docker_scheduler.__file__, doraise=True)
        work = tempfile.mkdtemp(prefix="docker-scheduler-bench-cli-")
        # PYTHONPATH: the CLI imports this tree's module, not an installed one.
        env = {**os.environ, "DOCKER_SCHEDULER_STATE_DIR": self.state_dir, "PYTHONPATH": str(ROOT)}
        exe = Path(sys.executable).with_name("torchx")
        names = {"torchx": "local_docker", "ours": "local_docker_persistent"}

        def measure(which: str) -> float:
            command = [str(exe), "run", "--workspace", "", "-s", names[which]]
            command += ["utils.echo", "--image", self.image, "--msg", "hello"]
            start = time.perf_counter()
            run = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, check=True)
            elapsed = time.perf_counter() - start
            self.app_ids.append(run.stdout.strip().splitlines()[-1].rsplit("/", 1)[-1])
            return elapsed

        try:
            return self.alternate(row, measure)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def wait_true(self) -> list[Row]:
        """submit() and wait() of an app running `true`, beside `docker run --rm` and torchx's Runner.wait."""
        from torchx.runner import Runner

        ours, limit, torchx = [], [], []
        with Runner(self.session, scheduler_factories={"local_docker": lambda s, **_: self.torchx}) as runner:
            for _ in range(self.runs):
                start = time.perf_counter()
                subprocess.run(["docker", "run", "--rm", self.image, "true"], check=True, capture_output=True)
                limit.append(time.perf_counter() - start)
                start = time.perf_counter()
                handle = runner.run(self.app("true"), scheduler="local_docker")
                runner.wait(handle, wait_interval=1)
                torchx.append(time.perf_counter() - start)
                self.app_ids.append(handle.rsplit("/", 1)[-1])
                start = time.perf_counter()
                app_id = self.ours.submit(self.app("true"), {})
                self.ours.wait(app_id, timeout=120)
                ours.append(time.perf_counter() - start)
                self.app_ids.append(app_id)
        case = "submit, then wait until a `true` app ends"
        return [
            Row(case, "s", "(the limit)", torchx=limit, ours=ours, baseline="`docker run --rm busybox true`"),
            Row(
                case,
                "s",
                "(none)",
                torchx=torchx,
                ours=ours,
                baseline="torchx `Runner.wait(wait_interval=1)`",
            ),
        ]

    def scale_1000(self) -> list[Row]:
        """schedule() overhead and describe() with 1,000 apps recorded (ours only)."""
        real = self.submit("ours", "true")
        wait_until(lambda: self.exited(real))
        self.ours.describe(real)
        fill_session(self.ours, real, 1000)
        overhead, describe = [], []
        counter = self.counters["ours"]
        for _ in range(self.runs):
            info = self.ours.submit_dryrun(self.app("true"), {})
            counter.reset()
            start = time.perf_counter()
            app_id = self.ours.schedule(info)
            overhead.append((time.perf_counter() - start - counter.seconds) * 1e3)
            self.app_ids.append(app_id)
            describe.append(per_call(lambda: self.ours.describe(real), 200) * 1e3)
        size = os.path.getsize(self.ours.session_file) / len(self.ours._store.summaries())
        return [
            Row(
                "schedule() overhead beside Docker, 1,000 apps",
                "ms",
                "<= 10 ms",
                ours=overhead,
                note=f"session file {size:.0f} bytes an app",
            ),
            Row("describe(), finished app, 1,000 apps", "ms/call", "<= 1 ms", ours=describe),
        ]

    def fresh_process(self) -> list[Row]:
        """A fresh process's first describe() of one app and first list(), at 10,000 and 50,000 apps."""
        rows = []
        for count in (10_000, 50_000):
            session = f"{self.session}-{count}"
            scheduler = PersistentDockerScheduler(session, state_dir=self.state_dir, detach=True)
            real = scheduler.submit(self.app("true"), {})
            self.app_ids.append(real)
            wait_until(lambda real=real: self.exited(real))
            scheduler.describe(real)
            fill_session(scheduler, real, count)
            size = os.path.getsize(scheduler.session_file) / 1e6
            load = f"import pickle; pickle.load(open({scheduler.session_file!r}, 'rb'))"
            make = "from docker_scheduler import PersistentDockerScheduler as S\n"
            make += f"s = S({session!r}, state_dir={self.state_dir!r})"
            for case, call in (("describe() of one app", f"s.describe({real!r})"), ("list()", "s.list()")):
                row = Row(
                    f"fresh process, first {case}, {count:,} apps",
                    "ms",
                    "<= 2x pickle.load" if case.startswith("describe") else "(none)",
                    baseline="plain `pickle.load` of the file",
                    note=f"session file {size:.1f} MB",
                )
                for _ in range(self.runs):
                    row.torchx.append(timed_in_fresh_process("", load))
                    row.ours.append(timed_in_fresh_process(make, call))
                rows.append(row)
        return rows


@dataclass
class SSHMeter:
    """Times a Docker CLI command and a call of ours, alternating, over one sshd, and counts the ssh
    connections each made in sshd's log. ``make`` makes ``s``, the scheduler of a fresh process."""

    log: Path
    env: dict[str, str]
    runs: int
    make: str
    connections: dict[str, list[float]] = field(default_factory=lambda: {"cli": [], "ours": []})

    def accepted(self) -> int:
        return self.log.read_text().count("Accepted publickey")

    def fresh(self, statement: str) -> Callable[[], float]:
        """Seconds ``statement`` takes in a fresh process over ssh, once it made ``s``."""
        return lambda: timed_in_fresh_process(self.make, statement, self.env) / 1e3

    def measure(self, row: Row, command: list[str], ours: Callable[[], float], calls: int = 1) -> None:
        before = self.accepted()
        start = time.perf_counter()
        subprocess.run(command, env=self.env, stdout=subprocess.DEVNULL, check=True)
        row.torchx.append((time.perf_counter() - start) * 1e3)
        middle = self.accepted()
        row.ours.append(ours() * 1e3)
        self.connections["cli"].append(middle - before)
        self.connections["ours"].append((self.accepted() - middle) / calls)

    def row(self, case: str, baseline: str, command: list[str], ours: Callable[[], float]) -> Row:
        row = Row(case, "ms", "(none)", baseline=baseline)
        for _ in range(self.runs):
            self.measure(row, command, ours)
        return self.noted(row)

    def noted(self, row: Row) -> Row:
        cli, ours = (max(self.connections[k], default=0) for k in ("cli", "ours"))
        row.note = f"ssh connections a call, at most: the CLI {cli:g}, ours {ours:g}"
        self.connections = {"cli": [], "ours": []}
        return row


# Relays stdin to a TCP port and the port to stdout, each chunk ``delay`` seconds late, in order: an
# ssh ProxyCommand that adds twice ``delay`` to every round trip.
DELAYING_PROXY = """
import socket, sys, threading, time, queue
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
delay = float(sys.argv[3])

def relay(read, write):
    chunks = queue.Queue()

    def later():
        while True:
            due, data = chunks.get()
            time.sleep(max(0.0, due - time.monotonic()))
            if not data:
                return write(b"")
            write(data)

    writer = threading.Thread(target=later, daemon=True)
    writer.start()
    while True:
        data = read()
        chunks.put((time.monotonic() + delay, data))
        if not data:
            return writer.join()

def to_stdout(data):
    if not data:
        sys.stdout.buffer.close()
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

def to_sock(data):
    if not data:
        sock.shutdown(socket.SHUT_WR)
    else:
        sock.sendall(data)

threading.Thread(target=relay, args=(lambda: sys.stdin.buffer.raw.read(65536), to_sock), daemon=True).start()
relay(lambda: sock.recv(65536), to_stdout)  # until the server closes; ssh ends the proxy when it is done
"""


def with_latency(d: Path, ssh: dict[str, str], delay: float) -> dict[str, str]:
    """The environment of :py:func:`ssh_engine`'s engine reached through :data:`DELAYING_PROXY`."""
    (d / "delaying_proxy.py").write_text(DELAYING_PROXY)
    port = ssh["DOCKER_HOST"].rsplit(":", 1)[1]
    config = (d / "ssh_config").read_text()
    proxy = f"  ProxyCommand {sys.executable} {d / 'delaying_proxy.py'} 127.0.0.1 %p {delay}\n"
    (d / "ssh_config").write_text(config + config.replace("Host ds-test", "Host ds-slow") + proxy)
    return {**ssh, "DOCKER_HOST": f"ssh://root@ds-slow:{port}"}


def fill_session(scheduler: PersistentDockerScheduler, real: str, count: int) -> None:
    """Fills the session with copies of ``real``'s record (each with its own strings) up to ``count`` apps."""
    have = len(scheduler._store.summaries())
    with scheduler._store.update() as apps:
        template = docker_scheduler._to_dict(scheduler._store.get(real))
        for i in range(count - have):
            plain = pickle.loads(pickle.dumps(template))
            plain["app_id"] = f"synthetic-{i:05d}"
            apps[plain["app_id"]] = docker_scheduler._from_dict(docker_scheduler.AppRecord, plain)


def timed_in_fresh_process(setup: str, statement: str, env: dict[str, str] | None = None) -> float:
    """Milliseconds ``statement`` takes in a new interpreter, after ``setup`` ran there."""
    code = f"import time\n{setup}\nstart = time.perf_counter()\n{statement}\n"
    code += "print((time.perf_counter() - start) * 1e3)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip())


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def report(rows: list[Row], runs: int, client: docker.DockerClient) -> str:
    version = client.version()
    lines = [
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, "
        f"Python {platform.python_version()}",
        f"Docker: engine {version['Version']} (API {version['ApiVersion']}); "
        f"runs: {runs} per case, alternating",
        "",
        "| case | unit | against | its median (min-max) | ours median (min-max) | ours faster by | target |"
        " Docker requests a call, torchx / ours |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        torchx, ours, unit = row.torchx, row.ours, row.unit
        ratio = f"{row.ratio():.2f}x" if row.torchx else "-"
        requests = f"{row.requests['torchx']:.0f} / {row.requests['ours']:.0f}" if row.requests else "-"
        against = row.baseline if row.torchx else "-"
        cells = [row.case, unit, against, spread(torchx), spread(ours), ratio, row.target, requests]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {row.case}: {row.note}" for row in rows if row.note]
    return "\n".join(lines + (["", *notes] if notes else []))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7, help="runs of each case per scheduler")
    parser.add_argument("--only", nargs="*", help="run only these cases (method names of Bench)")
    args = parser.parse_args()
    bench = Bench(args.runs)
    rows: list[Row] = []
    cases: dict[str, Callable[[], Row | list[Row]]] = {
        "describe_finished": bench.describe_finished,
        "describe_running": bench.describe_running,
        "schedule_8": bench.schedule_8,
        "log_200k": bench.log_200k,
        "list_100": bench.list_100,
        "scale_1000": bench.scale_1000,
        "first_describe_300k": lambda: bench.first_describe(
            1, 300_000, "first describe() after a 300,000-line replica exits", ">= 0.9x"
        ),
        "first_describe_8x100k": lambda: bench.first_describe(
            8, 100_000, "first describe() after 8 replicas x 100,000 lines exit together", ">= 1.5x"
        ),
        "ssh": bench.ssh,
        "harvest_rss_1gb": bench.harvest_rss_1gb,
        "cli_echo": bench.cli_echo,
        "fresh_process": bench.fresh_process,
        "wait_true": bench.wait_true,
    }
    try:
        for name, case in cases.items():
            if args.only and name not in args.only:
                continue
            made = case()
            rows.extend(made if isinstance(made, list) else [made])
    finally:
        bench.close()
    print(report(rows, args.runs, bench.client))
    print(f"\npeak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
