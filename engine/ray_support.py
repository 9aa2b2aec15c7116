"""What engine.ray_client needs around its calls: whether joining a Ray cluster is safe, what a
failed call means, and a replica's messages read by job.

Ray is an optional extra: nothing here imports it at module level.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from config.settings import is_loopback_host
from engine.api import EngineError, JobCancelled
from engine.protocol import Done


def remote_without_auth(address: str, environ: Mapping[str, str], home: Path | None = None) -> str | None:
    """Why joining `address` would be unsafe, or None. Anyone who can reach a Ray cluster without
    token authentication can run code on every node (and read what the engine holds), so a
    cluster on another machine is joined only with Ray's token auth on: `RAY_AUTH_MODE=token` and
    the cluster's token in `RAY_AUTH_TOKEN`, the file `RAY_AUTH_TOKEN_PATH`, or ~/.ray/auth_token."""
    host = urlsplit(address if "://" in address else f"ray://{address}").hostname
    if address in ("", "local", "auto") or is_loopback_host(host):
        return None
    if environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return (
            f"engine.ray_address = {address!r} is another machine: turn on Ray's token authentication on every "
            "node and here (RAY_AUTH_MODE=token and the cluster's token; see docs/scaling.md)"
        )
    token_file = Path(environ.get("RAY_AUTH_TOKEN_PATH") or (home or Path.home()) / ".ray" / "auth_token")
    if not environ.get("RAY_AUTH_TOKEN") and not token_file.is_file():
        return (
            f"engine.ray_address = {address!r}: RAY_AUTH_MODE is token but no token is set (RAY_AUTH_TOKEN, "
            "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; see docs/scaling.md)"
        )
    return None


def message_job_id(message: Any) -> str:
    """The job a replica's message is about."""
    if isinstance(message, Done):
        return message.result.job_id
    return str(getattr(message, "job_id", ""))


def like(error: BaseException, job_id: str) -> BaseException:
    """The failure of a lost call, for one of its members."""
    if isinstance(error, EngineError):
        return EngineError(str(error), retryable=error.retryable, detail=error.detail)
    if isinstance(error, JobCancelled):
        return JobCancelled(f"Job {job_id} was cancelled.")
    return error


def retrieve_exception(task: asyncio.Task[None]) -> None:
    """A background start's failure reached the waiting jobs: nothing else to report."""
    if not task.cancelled():
        task.exception()


def is_replica_death(error: BaseException) -> bool:
    try:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    except ImportError:
        return False
    return isinstance(error, ActorDiedError | ActorUnavailableError | RayActorError)


def shutdown_ray() -> None:
    import ray
    from ray import serve

    with contextlib.suppress(Exception):
        serve.shutdown()
    ray.shutdown()


__all__ = ["is_replica_death", "like", "message_job_id", "remote_without_auth", "retrieve_exception", "shutdown_ray"]
