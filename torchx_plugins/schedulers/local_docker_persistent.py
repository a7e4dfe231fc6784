"""Registers ``local_docker_persistent`` with torchx main's plugin discovery (0.7 reads entry points)."""

from torchx.plugins import register

from docker_scheduler import PersistentDockerScheduler, create_scheduler


@register.scheduler(name="local_docker_persistent")
def local_docker_persistent(session_name: str, **kwargs: object) -> PersistentDockerScheduler:
    return create_scheduler(session_name, **kwargs)  # type: ignore[arg-type]
