"""`Loopback.wait`: `flwr list` (a CLI process, ~1.5 CPU-s) is asked rarely, at once when the ServerApp
process ends, and never taken for finished before it says so. No Flower processes: the two probes stubbed."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr", reason="the flower extra is not installed")

from fedslip.federation.flower.loopback import Loopback  # noqa: E402


class _Clock:
    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now

    def sleep(self, s):
        self.now += s


def _loopback(tmp_path, monkeypatch, serverapp_ends_at, finished_at):
    clock = _Clock()
    monkeypatch.setattr("fedslip.federation.flower.loopback.time", clock)
    lb = Loopback(tmp_path / "lb", 2, insecure=True)
    asked = []

    def status(run_id):
        asked.append(clock.now)
        return {"status": "finished:completed" if clock.now >= finished_at else "running"}

    lb.status = status
    lb.serverapps = lambda: {4242} if 1.0 <= clock.now < serverapp_ends_at else set()
    return lb, clock, asked


def test_asks_rarely_then_at_once_when_the_serverapp_ends(tmp_path, monkeypatch):
    lb, clock, asked = _loopback(tmp_path, monkeypatch, serverapp_ends_at=100.0, finished_at=104.0)
    info = lb.wait(7, timeout=1000.0, poll=0.5, ask_every=30.0)
    assert info["status"] == "finished:completed"
    before = [t for t in asked if t < 100.0]
    assert before == [0.0, 30.0, 60.0, 90.0]  # every 30 s while the ServerApp runs
    after = [t for t in asked if t >= 100.0]
    assert after[0] == 100.0 and all(b - a == pytest.approx(3.0) for a, b in zip(after, after[1:]))
    assert 104.0 <= clock.now < 107.0  # found within one 3-s ask of finishing


def test_a_serverapp_never_seen_still_ends_by_asking(tmp_path, monkeypatch):
    lb, clock, asked = _loopback(tmp_path, monkeypatch, serverapp_ends_at=1.0, finished_at=65.0)
    assert lb.wait(7, timeout=1000.0, poll=0.5, ask_every=30.0)["status"] == "finished:completed"
    assert asked == [0.0, 30.0, 60.0, 90.0]


def test_times_out_saying_the_status(tmp_path, monkeypatch):
    lb, clock, asked = _loopback(tmp_path, monkeypatch, serverapp_ends_at=1e9, finished_at=1e9)
    with pytest.raises(TimeoutError, match="still running after 100 s"):
        lb.wait(7, timeout=100.0, poll=0.5, ask_every=30.0)
    assert clock.now <= 100.0 + 30.0 + 0.5
