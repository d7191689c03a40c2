"""Scale-out on Ray Serve (``pip install 'loraplex[ray]'``): replicas of the whole server behind one
OpenAI-compatible ingress, routed by adapter with Ray's model multiplexing. See ``deploy/ray/serve.yaml``.

Only this package imports Ray, and only when ``build_app`` (or the deployments) are used:
``import server`` never does.
"""

from typing import Any

__all__ = ["build_app"]


def __getattr__(name: str) -> Any:
    if name == "build_app":  # `serve run server.ray_serve:build_app ...`
        from server.ray_serve.app import build_app

        return build_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
