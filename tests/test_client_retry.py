"""serving/client.py's retries (issue 22), without a server: backoff bounds and jitter, and a
bounded give-up on a port where nothing listens. With a server: tests/test_reliability.py."""
from __future__ import annotations

import socket

import numpy as np
import pytest

from serving.client import BACKOFF_MAX_S, Client, ServerUnreachable, backoff_delay


class Rng:
    def __init__(self):
        self.rng = np.random.default_rng(0)

    def uniform(self, lo, hi):
        return float(self.rng.uniform(lo, hi))


def test_backoff_is_bounded_and_jittered():
    rng = Rng()
    delays = [backoff_delay(a, None, rng) for a in range(12) for _ in range(20)]
    assert max(delays) <= BACKOFF_MAX_S and min(delays) >= 0
    assert len(set(delays)) > 100                          # jitter: no two clients in step
    early = [backoff_delay(0, None, rng) for _ in range(50)]
    assert max(early) <= 0.25                              # it starts small
    assert backoff_delay(3, "2.5") == 2.5                  # the server's Retry-After wins
    assert backoff_delay(3, "soon", rng) <= 2.0            # unreadable: ignored


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_idempotent_call_gives_up_with_a_clear_error(tmp_path):
    client = Client(f"http://127.0.0.1:{free_port()}", tmp_path, retry_seconds=1.5)
    with pytest.raises(ServerUnreachable) as err:
        client.classify(b"\x89PNG", model="m")
    assert "gave up after" in str(err.value) and "tries" in str(err.value)
    assert client.retries >= 1


def test_a_call_without_retries_fails_at_once(tmp_path):
    client = Client(f"http://127.0.0.1:{free_port()}", tmp_path, retry_seconds=0)
    with pytest.raises(ServerUnreachable) as err:
        client.generate(1)                      # no seed: never retried
    assert "gave up" not in str(err.value) and client.retries == 0


def test_a_bad_retry_setting_is_a_one_line_error(tmp_path, monkeypatch):
    from pixtok.errors import UserError

    monkeypatch.setenv("PIXTOK_CLIENT_RETRY_S", "forever")
    with pytest.raises(UserError, match="PIXTOK_CLIENT_RETRY_S='forever'"):
        Client("http://127.0.0.1:1", tmp_path)
