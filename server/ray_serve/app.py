"""The Serve application: ``OpenAIIngress`` in front of ``LoraplexReplica`` replicas."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.serve import Application

from server.ray_serve.flags import config_from_flags, flags_from_args
from server.ray_serve.ingress import OpenAIIngress
from server.ray_serve.replica import LoraplexReplica

# args that configure Ray, not `loraplex serve`
RAY_ARGS = ("num_replicas", "num_cpus", "max_ongoing_requests", "max_adapters_per_replica")


def build_app(args: Mapping[str, Any]) -> Application:
    """Serve's application builder::

        serve run server.ray_serve:build_app model=/models/base adapter_store=s3://bucket/adapters num_replicas=2

    Every key but the ones below is a ``loraplex serve`` flag without its dashes
    (``adapter_store`` is ``--adapter-store``), validated here as the CLI would.

    - ``num_replicas`` (1), ``num_cpus`` per replica (1): engine replicas
    - ``max_ongoing_requests`` per replica (default ``--max-num-seqs``): past it, Ray sends
      requests for an adapter to another replica too, which then also holds the adapter
    - ``max_adapters_per_replica`` (default ``--max-loras``): adapters a replica claims for
      routing; Ray forgets the least recently used past it

    A Serve config file's ``deployments:`` section overrides these per deployment.
    """
    ray_args = {k: args[k] for k in RAY_ARGS if k in args}
    flags = flags_from_args({k: v for k, v in args.items() if k not in RAY_ARGS})
    config = config_from_flags(flags)
    engine = LoraplexReplica.options(
        num_replicas=int(ray_args.get("num_replicas", 1)),
        ray_actor_options={"num_cpus": float(ray_args.get("num_cpus", 1))},
        max_ongoing_requests=int(ray_args.get("max_ongoing_requests", config.scheduler.max_num_seqs)),
    ).bind(flags, int(ray_args.get("max_adapters_per_replica", config.lora.max_loras)))
    return OpenAIIngress.bind(engine, config.http.max_request_bytes)
