"""`Loopback.wait`: `flwr list` (a CLI process, ~1.5 CPU-s) is asked rarely, at once when the ServerApp
process ends, and never taken for finished before it says so. No Flower processes: the two probes stubbed."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the flower extra is not installed")

import subprocess  # noqa: E402
import time  # noqa: E402

from fedslip.federation.flower import loopback  # noqa: E402
from fedslip.federation.flower.loopback import Loopback, descendants, process_table, start_time  # noqa: E402

from conftest import FakeClock  # noqa: E402


def _loopback(tmp_path, monkeypatch, serverapp_ends_at, finished_at):
    clock = FakeClock()
    monkeypatch.setattr("fedslip.federation.flower.loopback.time", clock)
    lb = Loopback(tmp_path / "lb", 2, insecure=True)
    asked = []

    def status(run_id):
        asked.append(clock.now)
        return {"status": "finished:completed" if clock.now >= finished_at else "running"}

    lb.status = status
    lb.serverapps = lambda table=None: {4242} if 1.0 <= clock.now < serverapp_ends_at else set()
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


def test_descendants_are_the_whole_tree_below_a_pid_with_their_start_times():
    shell = subprocess.Popen(["sh", "-c", "sleep 30 & sh -c 'sleep 30 & wait' & wait"])
    try:
        deadline = time.monotonic() + 10
        while len(descendants(shell.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        below = descendants(shell.pid)
        names = sorted(Path(f"/proc/{pid}/comm").read_text().strip() for pid in below)
        assert names == ["sh", "sleep", "sleep"]  # a child, a grandchild and the child shell between
        assert below == {pid: start_time(pid) for pid in below}
        assert shell.pid not in below and descendants(shell.pid, process_table()) == below
    finally:
        for pid in descendants(shell.pid):
            subprocess.run(["kill", str(pid)], check=False)
        shell.wait(timeout=10)


def test_one_wait_poll_reads_proc_once_whatever_the_number_of_processes(tmp_path, monkeypatch):
    lb, clock, asked = _loopback(tmp_path, monkeypatch, serverapp_ends_at=0.0, finished_at=3.0)
    del lb.serverapps  # the real one, over a SuperLink and four nodes that are running processes
    for name in ["superlink", "node0", "node1", "node2", "node3"]:
        lb.procs[name] = loopback.Proc(name, subprocess.Popen(["sleep", "30"]), tmp_path / "log")
    calls = []
    real = loopback.process_table
    monkeypatch.setattr(loopback, "process_table", lambda: calls.append(1) or real())
    try:
        lb.wait(7, timeout=1000.0, poll=0.5, ask_every=30.0)
    finally:
        for proc in lb.procs.values():
            proc.popen.kill()
            proc.popen.wait()
    assert asked == [0.0, 30.0]
    assert len(calls) == 30.0 / 0.5 + 1  # one pass per poll: the last poll asks and returns without sleeping
