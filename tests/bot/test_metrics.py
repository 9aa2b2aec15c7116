"""Metrics: values appear in the exposition text, registries are private, /metrics is served."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from bot.metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, tuple(sorted(labels.items())))]


def test_every_metric_is_recorded() -> None:
    m = Metrics()
    m.set_queue_depth(0, 3)
    m.set_queue_depth("1", 7)
    m.job_finished("done", wait_s=12.0, run_s=4.0)
    m.job_finished("failed", wait_s=1.0, run_s=0.5)
    m.job_finished("cancelled", wait_s=2.0)  # cancelled while queued: no run time
    m.engine_cost(10.0, 4.0)
    m.engine_cost(3.0, 1.0)
    m.engine_cost(1.0, 0)  # ignored: no division by zero
    m.quota_refused("over_quota")
    m.quota_refused("over_quota")
    m.quota_refused("banned")
    m.engine_restarted()
    m.discord_error(429)
    m.discord_error(500)
    m.discord_error(429)
    m.interaction_answered(0.12)
    m.interaction_answered(2.7, kind="component")

    assert value(m, "atelier_queue_depth", band="0") == 3
    assert value(m, "atelier_queue_depth", band="1") == 7
    assert value(m, "atelier_jobs_total", status="done") == 1
    assert value(m, "atelier_jobs_total", status="failed") == 1
    assert value(m, "atelier_jobs_total", status="cancelled") == 1
    assert value(m, "atelier_job_wait_seconds_count") == 3
    assert value(m, "atelier_job_wait_seconds_sum") == 15.0
    assert value(m, "atelier_job_wait_seconds_bucket", le="5.0") == 2
    assert value(m, "atelier_job_run_seconds_count") == 2
    assert value(m, "atelier_job_run_seconds_sum") == 4.5
    assert value(m, "atelier_engine_seconds_per_cost_unit_count") == 2
    assert value(m, "atelier_engine_seconds_per_cost_unit_sum") == 5.5
    assert value(m, "atelier_engine_seconds_per_cost_unit_last") == 3.0
    assert value(m, "atelier_quota_refusals_total", reason="over_quota") == 2
    assert value(m, "atelier_quota_refusals_total", reason="banned") == 1
    assert value(m, "atelier_engine_restarts_total") == 1
    assert value(m, "atelier_discord_api_errors_total", status="429") == 2
    assert value(m, "atelier_discord_api_errors_total", status="500") == 1
    assert value(m, "atelier_interactions_total", kind="command") == 1
    assert value(m, "atelier_interactions_total", kind="component") == 1
    assert value(m, "atelier_interaction_first_response_seconds_count") == 2
    assert value(m, "atelier_interaction_first_response_seconds_bucket", le="3.0") == 2
    assert value(m, "atelier_interaction_first_response_seconds_bucket", le="2.5") == 1


def test_known_label_values_start_at_zero() -> None:
    m = Metrics()
    for status in ("done", "failed", "cancelled"):
        assert value(m, "atelier_jobs_total", status=status) == 0
    for kind in ("command", "component", "autocomplete"):
        assert value(m, "atelier_interactions_total", kind=kind) == 0
    assert value(m, "atelier_engine_restarts_total") == 0
    text = m.render().decode()
    assert "# HELP atelier_queue_depth" in text and "# TYPE atelier_job_wait_seconds histogram" in text


def test_set_queue_depths_zeroes_emptied_bands() -> None:
    m = Metrics()
    m.set_queue_depths({0: 2, 1: 5})
    m.set_queue_depths({1: 4})
    assert value(m, "atelier_queue_depth", band="0") == 0
    assert value(m, "atelier_queue_depth", band="1") == 4


def test_registries_are_private() -> None:
    a, b = Metrics(), Metrics()  # no "Duplicated timeseries" error
    a.engine_restarted()
    assert value(a, "atelier_engine_restarts_total") == 1
    assert value(b, "atelier_engine_restarts_total") == 0
    assert REGISTRY.get_sample_value("atelier_engine_restarts_total") is None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_http_endpoint_serves_the_metrics() -> None:
    m = Metrics()
    m.job_finished("done", wait_s=1.0, run_s=2.0)
    m.discord_error(503)
    port = m.start_http(free_port(), addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            body = response.read().decode()
        assert 'atelier_jobs_total{status="done"} 1.0' in body
        assert 'atelier_discord_api_errors_total{status="503"} 1.0' in body
        assert "python_gc" not in body  # nothing from the global registry
        m.engine_restarted()  # live values, not a snapshot
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert "atelier_engine_restarts_total 1.0" in response.read().decode()
        with pytest.raises(RuntimeError, match="already running"):
            m.start_http(free_port(), addr="127.0.0.1")
    finally:
        m.stop_http()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    m.stop_http()  # idempotent


def test_port_zero_disables_the_endpoint() -> None:
    m = Metrics()
    assert m.start_http(0) == 0
    m.stop_http()


def test_taken_port_fails_loudly() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError):
            Metrics().start_http(port, addr="127.0.0.1")
