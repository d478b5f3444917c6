"""``clp serve``: an OpenAI-compatible HTTP server over one model (see docs/server.md)."""

from clp.serve.app import ServerConfig, create_app, run

__all__ = ["ServerConfig", "create_app", "run"]
