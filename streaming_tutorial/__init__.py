"""Shared code for the tutorial: model preparation, starting servers, reading streams."""
