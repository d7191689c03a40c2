"""Scale-out on Ray Serve (``pip install 'loraplex[ray]'``): replicas of the whole server behind one
OpenAI-compatible ingress, routed by adapter with Ray's model multiplexing. See ``deploy/ray/serve.yaml``.

Only this package imports Ray; ``import server`` never does.
"""

from server.ray_serve.app import build_app

__all__ = ["build_app"]
