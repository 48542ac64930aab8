"""HTTP serving of a run's recommender (FastAPI + uvicorn); install with the ``serve`` extra."""

from fedrec.serve.app import create_app, create_app_for
from fedrec.serve.server import running, serve

__all__ = ["create_app", "create_app_for", "running", "serve"]
