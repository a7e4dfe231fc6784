"""Registers the scheduler the way the installed torchx finds schedulers.

torchx 0.7 reads the ``torchx.schedulers`` entry-point group: it takes the first
entry as its default scheduler, and once the group holds anything it lists only
what the group holds (torchx issue 1009). So on 0.7 the package registers
torchx's own schedulers again, in torchx's order with ``local_docker`` first,
then ``local_docker_persistent``, and writes them in that order (setuptools
sorts them by name, which would make ``aws_batch`` the default).

torchx main (``torchx-nightly``) finds schedulers in the ``torchx_plugins``
namespace package, where ``torchx_plugins/schedulers/local_docker_persistent.py``
registers this one, and reads the entry-point group too, where six of 0.7's
schedulers no longer exist: so for torchx main the package has no entry points.

Which torchx is meant is read from the interpreter the package is built for
(pip builds in an isolated environment, so it is asked without pip's overlay),
or set with ``DOCKER_SCHEDULER_TORCHX=0.7`` or ``main``.
"""

from __future__ import annotations

import os
import subprocess
import sys

from setuptools import setup
from setuptools.command.egg_info import egg_info

GROUP = "torchx.schedulers"
# torchx 0.7's built-in schedulers, in its own order (torchx.schedulers.DEFAULT_SCHEDULER_MODULES).
TORCHX_07_SCHEDULERS = {
    "local_docker": "torchx.schedulers.docker_scheduler",
    "local_cwd": "torchx.schedulers.local_scheduler",
    "slurm": "torchx.schedulers.slurm_scheduler",
    "kubernetes": "torchx.schedulers.kubernetes_scheduler",
    "kubernetes_mcad": "torchx.schedulers.kubernetes_mcad_scheduler",
    "aws_batch": "torchx.schedulers.aws_batch_scheduler",
    "aws_sagemaker": "torchx.schedulers.aws_sagemaker_scheduler",
    "gcp_batch": "torchx.schedulers.gcp_batch_scheduler",
    "ray": "torchx.schedulers.ray_scheduler",
    "lsf": "torchx.schedulers.lsf_scheduler",
}
PROBE = "import importlib.util as u; print('main' if u.find_spec('torchx.plugins') else '0.7')"


def target_torchx() -> str:
    """``main`` when the target environment has torchx main, else ``0.7``."""
    chosen = os.environ.get("DOCKER_SCHEDULER_TORCHX")
    if chosen in ("0.7", "main"):
        return chosen
    if chosen:
        sys.exit(f"DOCKER_SCHEDULER_TORCHX={chosen!r}: set it to 0.7 or main, or leave it unset")
    overlay = ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")  # what pip's isolated build adds
    env = {key: value for key, value in os.environ.items() if key not in overlay}
    found = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True)
    return "main" if found.stdout.strip() == "main" else "0.7"


def entry_points(torchx: str) -> list[str]:
    if torchx == "main":
        return []
    builtins = [f"{name} = {module}:create_scheduler" for name, module in TORCHX_07_SCHEDULERS.items()]
    return [*builtins, "local_docker_persistent = docker_scheduler:create_scheduler"]


class OrderedEntryPoints(egg_info):
    """egg_info that writes the entry points in the order given, not sorted."""

    def run(self) -> None:
        super().run()
        lines = self.distribution.entry_points.get(GROUP, [])
        text = f"[{GROUP}]\n" + "".join(f"{line}\n" for line in lines) if lines else ""
        self.write_or_delete_file("entry points", os.path.join(self.egg_info, "entry_points.txt"), text, True)


setup(entry_points={GROUP: entry_points(target_torchx())}, cmdclass={"egg_info": OrderedEntryPoints})
