"""Adapter stores for load tests: N random PEFT adapters for the default model, in PEFT's format.

Adapter ``<prefix><i>`` has rank ``ranks[i % len(ranks)]`` (alpha = 2 * rank) on ``targets`` (default: all
seven projections) of every layer, values drawn from ``seed + i``. A store is reused when it already
holds exactly those adapters with those ranks, and is built in ``<store>.tmp`` then renamed,
so an interrupted build never passes for a finished one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("loadtests.stores")

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def planned_ranks(count: int, prefix: str, ranks: Sequence[int]) -> dict[str, int]:
    """Adapter name -> rank, ranks cycled over the adapters in order."""
    if not ranks or any(r < 1 for r in ranks):
        raise ValueError(f"ranks must be positive integers, got {list(ranks)}")
    return {f"{prefix}{i}": ranks[i % len(ranks)] for i in range(count)}


def _present(store: Path) -> dict[str, int | None]:
    """Adapter folders in ``store`` and the rank each config names (None when unreadable)."""
    found: dict[str, int | None] = {}
    if not store.is_dir():
        return found
    for folder in store.iterdir():
        if not folder.is_dir() or folder.name.startswith("."):  # loraplex keeps .lock and .staging/ here
            continue
        try:
            found[folder.name] = int(json.loads((folder / "adapter_config.json").read_text())["r"])
        except (OSError, ValueError, KeyError, TypeError):
            found[folder.name] = None
    return found


def make_store(
    store: Path,
    count: int,
    prefix: str,
    seed: int,
    ranks: Sequence[int] = (16,),
    targets: Sequence[str] = TARGETS,
    source: Path | None = None,
) -> Path:
    """The store at ``store`` holding exactly the planned adapters, made when it does not already.

    The check is by name and rank: a store's folder name should say its targets (the suite's do).
    ``source``: a larger store made with the same seed, ranks and targets; its first ``count``
    adapters are hard-linked instead of made again (one copy on disk and in the page cache).
    """
    plan = planned_ranks(count, prefix, ranks)
    if _present(store) == plan:
        log.info("reusing %d adapters in %s", count, store)
        return store
    if source is not None and (have := _present(source)) and all(have.get(n) == r for n, r in plan.items()):
        tmp = store.with_name(store.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for name in plan:
            (tmp / name).mkdir(parents=True)
            for f in (source / name).iterdir():
                os.link(f, tmp / name / f.name)
        shutil.rmtree(store, ignore_errors=True)
        tmp.rename(store)
        log.info("linked %d adapters from %s into %s", count, source, store)
        return store

    from server.model.loading import load_model
    from tests.helpers.tiny import AdapterSpec, make_adapters

    tmp = store.with_name(store.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    base = load_model(None, Path.home() / ".cache" / "loraplex").hf_model
    started, made = time.monotonic(), 0

    def progress(done: int) -> None:
        if (made + done) % 32 == 0 or made + done == count:
            log.info("made %d/%d adapters (%.0f s)", made + done, count, time.monotonic() - started)

    for rank in sorted(set(plan.values())):
        seeds = {name: seed + i for i, (name, r) in enumerate(plan.items()) if r == rank}
        make_adapters(
            base, AdapterSpec(f"r{rank}", rank, 2 * rank, tuple(targets)), tmp, seeds, std=0.02, on_saved=progress
        )
        made += len(seeds)
    if store.exists():
        shutil.rmtree(store)
    tmp.rename(store)
    log.info("made %d adapters (ranks %s) in %s", count, sorted(set(plan.values())), store)
    return store
