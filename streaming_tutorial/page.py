"""The classroom page served by `streaming_server.py` at `GET /` (issue 10). Placeholder: filled in next."""

from __future__ import annotations


def add_page_args(parser) -> None:
    """Add this server's page flags to vLLM's parser."""


def mount_page(app, args) -> None:
    """Add the page's routes to vLLM's app (unless turned off)."""
