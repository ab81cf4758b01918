"""Telling a local path from a Hugging Face hub id, the same way for models and datasets."""

from __future__ import annotations


def looks_like_local_path(name: str) -> bool:
    """True for what can only be a path: hub ids are "name" or "org/name"."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1
