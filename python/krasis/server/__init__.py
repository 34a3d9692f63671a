"""The OpenAI-compatible HTTP server: ``python -m krasis.server --model-path DIR``."""

__all__ = ["create_app"]


def __getattr__(name: str):
    # lazy, so `krasis --help` (which reads the server's flags) does not import FastAPI
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
