"""Time from ``loraplex serve`` (a fresh process, the model cache already converted) to ``/ready``.

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
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            started = time.monotonic()
            with running_server(["--adapters-dir", tmp], Path(tmp) / f"log{i}.txt") as url:
                times.append(time.monotonic() - started)
                assert httpx.get(url + "/ready").status_code == 200
            print(f"run {i + 1}: ready after {times[-1]:.2f} s")
    result = {"command": f"python -m loadtests.bench.startup --runs {args.runs}", "machine": machine(),
              "seconds": times, "median_s": statistics.median(times)}
    print(f"median {result['median_s']:.2f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
