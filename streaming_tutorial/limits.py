"""Shared-server limits of `streaming_server.py` (issue 11). Placeholder: filled in next."""

from __future__ import annotations


def add_limit_args(parser) -> None:
    """Add this server's limit flags to vLLM's parser."""


def install_limits(app, args) -> None:
    """Add the limit middlewares and metrics to vLLM's app."""


def limits_health(app) -> dict:
    """Fields that /health adds about limits and the engine's queue."""
    return {}
