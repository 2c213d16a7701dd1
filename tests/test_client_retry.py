"""serving/client.py's retries (issue 22), without a server: backoff bounds and jitter, and a
bounded give-up on a port where nothing listens. With a server: tests/test_reliability.py."""
from __future__ import annotations

import json
import re
import socket
import threading

import numpy as np
import pytest

from serving.client import BACKOFF_MAX_S, Client, ServerError, ServerUnreachable, backoff_delay


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


class CutShortServer:
    """A loopback HTTP server whose first `cut` answers stop half-way through their body (a worker
    or frontend dying mid-answer), or are the raw answer `first` where one is given; later answers
    are whole."""

    def __init__(self, cut: int, first: bytes | None = None):
        self.cut, self.first, self.answered = cut, first, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        body = json.dumps({"label": "Bag", "index": 8}).encode()
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                head, _, rest = request.partition(b"\r\n\r\n")
                length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))
                while len(rest) < length:
                    rest += conn.recv(65536)
                whole = self.answered >= self.cut
                self.answered += 1
                if not whole and self.first is not None:
                    conn.sendall(self.first)
                    continue
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                             + (body if whole else body[: len(body) // 2]))

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("retry_seconds, answered", [(30, True), (0, False)])
def test_an_answer_cut_short_is_retried_or_a_clear_error(tmp_path, retry_seconds, answered):
    server = CutShortServer(cut=1)
    try:
        client = Client(server.url, tmp_path, retry_seconds=retry_seconds)
        if answered:
            assert client.classify(b"\x89PNG", model="m") == {"label": "Bag", "index": 8}
            assert client.retries == 1
        else:
            with pytest.raises(ServerUnreachable, match="IncompleteRead|incomplete"):
                client.classify(b"\x89PNG", model="m")
    finally:
        server.close()


def error_answer(status: int, message: str) -> bytes:
    body = json.dumps({"code": status, "type": "InternalServerException",
                       "message": message}).encode()
    return (b"HTTP/1.1 %d Error\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % (status, len(body)) + body)


@pytest.mark.parametrize("status, message, retried", [
    (500, "Worker died.", True),      # TorchServe before it has read the worker's exit status
    (507, "Worker died.", True),      # ... and after (exit status 137)
    (500, "Prediction failed", False),  # a handler's own error: the same request fails again
])
def test_a_worker_that_died_is_retried_any_other_500_is_not(tmp_path, status, message, retried):
    server = CutShortServer(cut=1, first=error_answer(status, message))
    try:
        client = Client(server.url, tmp_path, retry_seconds=30)
        if retried:
            assert client.classify(b"\x89PNG", model="m") == {"label": "Bag", "index": 8}
            assert client.retries == 1
        else:
            with pytest.raises(ServerError, match=f"HTTP {status} .*{message}"):
                client.classify(b"\x89PNG", model="m")
            assert client.retries == 0 and server.answered == 1
    finally:
        server.close()
