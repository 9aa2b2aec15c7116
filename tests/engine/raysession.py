"""A private local Ray for tests and benches (shared by tests/engine/test_ray.py and
tests/bench/test_ray_bench.py; import it after `pytest.importorskip("ray")`)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator

import ray

# Ray 2.60 writes an auth token under ~/.ray unless auth is off; usage stats would phone home.
QUIET_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@contextlib.contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """Ray on this machine with `num_cpus` CPUs, no dashboard and no token file; Serve and Ray are
    shut down and the environment restored on exit."""
    saved = {name: os.environ.get(name) for name in QUIET_ENV}
    os.environ.update(QUIET_ENV)
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths are limited
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
        _temp_dir=temp_dir,
    )
    try:
        yield
    finally:
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            shutil.rmtree(temp_dir, ignore_errors=True)
