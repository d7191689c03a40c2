"""How much of the CPUs other processes used while a block ran, leaving out us and the server under test.

``loadtests.bench.common.OtherLoad`` counts only this process and its reaped children as its own, so a live
server child counts as "other"; here the server's process (all its threads) is named and left out.
"""

from __future__ import annotations

import os
import time


def _machine_busy_s() -> float:
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / tick  # user..steal minus idle and iowait


def _process_cpu_s(pid: int) -> float:
    """CPU seconds of a live process (all its threads), from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


class OthersShare:
    """The share of all CPUs used, while the block ran, by processes other than us and the server ``pid``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> OthersShare:
        t = os.times()
        self.t0, self.busy0 = time.perf_counter(), _machine_busy_s()
        self.mine0 = t.user + t.system + _process_cpu_s(self.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        t = os.times()
        wall = time.perf_counter() - self.t0
        mine = t.user + t.system + _process_cpu_s(self.pid) - self.mine0
        others = max(0.0, _machine_busy_s() - self.busy0 - mine)
        self.share = round(others / (wall * (os.cpu_count() or 1)), 3) if wall > 0 else 0.0
