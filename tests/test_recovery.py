"""Settings of crash recovery (orchestrator/recovery.py); the behaviour is tested with real
workers in tests/integration/test_recovery.py and tests/integration/test_chaos.py."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from orchestrator.app import celery_config
from orchestrator.settings import Settings

URL = "redis://127.0.0.1:1/0"


def test_defaults_recover_within_a_lease_of_fifteen_seconds() -> None:
    s = Settings(redis_url=URL)
    assert (s.heartbeat_s, s.lease_s, s.shutdown_timeout_s) == (5.0, 15.0, 25.0)
    # The broker's own redelivery stays the last resort, far behind the lease.
    assert celery_config(s)["broker_transport_options"]["visibility_timeout"] == 3600


def test_a_lease_shorter_than_two_heartbeats_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"lease_s \(6\) must be at least twice heartbeat_s"):
        Settings(redis_url=URL, heartbeat_s=5, lease_s=6)


def test_a_visibility_timeout_shorter_than_the_lease_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"visibility_timeout_s \(10\) must be at least"):
        Settings(redis_url=URL, visibility_timeout_s=10)


def test_without_heartbeats_only_the_visibility_timeout_counts() -> None:
    s = Settings(redis_url=URL, heartbeat_s=0, visibility_timeout_s=10)
    assert s.visibility_timeout_s == 10
