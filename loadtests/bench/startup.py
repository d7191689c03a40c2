"""Time from ``loraplex serve`` (a fresh process, the model cache already converted) to ``/ready``, and the
server's memory once ready: resident set (VmRSS) and its peak so far (VmHWM), from /proc.

    python -m loadtests.bench.startup [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from loadtests.machine import machine
from tests.helpers.server_process import running_server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("loadtests/results/startup.json"))
    args = p.parse_args()
    times, memory = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            started = time.monotonic()
            with running_server(["--adapters-dir", tmp], Path(tmp) / f"log{i}.txt") as url:
                times.append(time.monotonic() - started)
                assert httpx.get(url + "/ready").status_code == 200
                memory.append(_memory_mb(url.pid))
            print(f"run {i + 1}: ready after {times[-1]:.2f} s, RSS {memory[-1]['rss_mb']} MB "
                  f"(peak {memory[-1]['peak_rss_mb']} MB)")
    result = {"command": f"python -m loadtests.bench.startup --runs {args.runs}", "machine": machine(),
              "seconds": times, "median_s": statistics.median(times), "memory": memory}
    print(f"median {result['median_s']:.2f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


def _memory_mb(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) // 1024, "peak_rss_mb": int(fields["VmHWM"].split()[0]) // 1024}


if __name__ == "__main__":
    main()
