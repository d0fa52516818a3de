"""API keys of a workshop server: one per student, each with a name, reloaded while the server runs.

Keys come from `--api-key K1 K2 ...` (named `api-key-1`, `api-key-2`, ...; `VLLM_API_KEY` when no flag is given)
and from `--api-keys-file PATH`, one key per line:

    # name:key[:N]     N (optional) overrides the per-key limit of requests in flight for this key
    alice:4f1c9e2a7b
    bob:9d8e7f6a5b
    instructor:0a1b2c3d4e:16

Blank lines and `#` comments are allowed. Names are what /metrics and the log show; a key itself is never
logged or labelled (only its SHA-256 digest is kept). Editing the file takes effect within about a second
(`KeyRing.refresh`, polled by the server); a file that no longer parses is logged and the previous keys stay.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("vllm.streaming_tutorial.server.keys")  # under "vllm": vLLM's log format and handler

KEYS_FILE_ENV = "TUTORIAL_API_KEYS_FILE"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
# Seconds between two looks at the keys file's modification time (a stat call: cheap).
POLL_SECONDS = 1.0


class KeysFileError(ValueError):
    """A keys file that does not parse; the message is one line naming the file and the line."""


@dataclass(frozen=True)
class Key:
    name: str
    digest: bytes  # SHA-256 of the key: the key itself is not kept
    max_in_flight: int | None = None  # None: the server's per-key default


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_keys(text: str, source: str = "keys file") -> list[Key]:
    """The keys of a keys file's text. Raises KeysFileError (one line) on the first malformed line."""
    keys: list[Key] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}, line {number}"
        parts = line.split(":")
        if len(parts) not in (2, 3):
            raise KeysFileError(f"{where}: expected `name:key` or `name:key:N`, got {len(parts)} field(s)")
        name, token = parts[0].strip(), parts[1].strip()
        if not NAME.fullmatch(name):
            raise KeysFileError(f"{where}: the name {name!r} must be 1-64 letters, digits, or _ . @ -")
        if not token or any(c.isspace() for c in token):
            raise KeysFileError(f"{where}: the key of {name!r} is empty or contains white space")
        limit = None
        if len(parts) == 3:
            if not parts[2].strip().isdigit() or int(parts[2]) < 1:
                raise KeysFileError(f"{where}: the limit of {name!r} must be a whole number of at least 1")
            limit = int(parts[2])
        if name in names:
            raise KeysFileError(f"{where}: the name {name!r} appears twice")
        if digest(token) in digests:
            raise KeysFileError(f"{where}: the key of {name!r} is also another name's key")
        names.add(name)
        digests.add(digest(token))
        keys.append(Key(name, digest(token), limit))
    return keys


def flag_keys(tokens: Iterable[str]) -> list[Key]:
    """Keys given on the command line, named api-key-1, api-key-2, ... in order."""
    return [Key(f"api-key-{i}", digest(t)) for i, t in enumerate(tokens, start=1)]


def merge_repeated_api_key(parser: argparse.ArgumentParser) -> None:
    """Make a repeated `--api-key` add keys (`--api-key K1 --api-key K2` = `--api-key K1 K2`).

    vLLM's flag takes several values but a repeat replaces the earlier ones (argparse's "store"): a second
    student's key silently disabled the first. "extend" keeps every value. (vLLM's parser still logs "Found
    duplicate keys --api-key"; the keys are merged all the same, and the server logs how many it accepts.)"""
    for action in parser._actions:
        if action.dest == "api_key" and not isinstance(action, argparse._ExtendAction):
            action.__class__ = argparse._ExtendAction


class KeyRing:
    """The keys a server accepts: those from the flags (fixed) plus those of the keys file (reloaded).

    `refresh()` re-reads the file when its modification time or size changed; callbacks registered with
    `on_change` get the set of (name, digest) pairs that are no longer valid, so in-flight requests made with a
    removed or changed key can be ended."""

    def __init__(self, fixed: list[Key], path: str | os.PathLike | None = None) -> None:
        self.fixed = list(fixed)
        self.path = Path(path) if path else None
        self.file_keys: list[Key] = []
        self.stamp: tuple[int, int] | None = None
        self.listeners: list[Callable[[set[tuple[str, bytes]]], None]] = []
        if self.path is not None:
            self.file_keys = parse_keys(self.path.read_text(), str(self.path))  # at start-up, errors are fatal
            self.stamp = self._stamp()
        self._check_names()
        self.by_digest = {k.digest: k for k in self.keys}

    @property
    def keys(self) -> list[Key]:
        return [*self.fixed, *self.file_keys]

    def __len__(self) -> int:
        return len(self.by_digest)

    def _check_names(self, file_keys: list[Key] | None = None) -> None:
        names = [k.name for k in self.fixed] + [k.name for k in (self.file_keys if file_keys is None else file_keys)]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise KeysFileError(f"{self.path}: the name(s) {', '.join(dup)} are also used by --api-key keys")

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def lookup(self, token: str) -> Key | None:
        """The key whose digest matches `token` (a dict lookup of a SHA-256 digest: no timing leak of the key)."""
        return self.by_digest.get(digest(token))

    def on_change(self, listener: Callable[[set[tuple[str, bytes]]], None]) -> None:
        self.listeners.append(listener)

    def refresh(self) -> bool:
        """Reload the keys file if it changed; True when the keys changed. A file that does not parse (or
        disappeared) is logged, and the previous keys stay in force."""
        if self.path is None:
            return False
        stamp = self._stamp()
        if stamp == self.stamp:
            return False
        self.stamp = stamp
        try:
            if stamp is None:
                raise KeysFileError(f"{self.path}: cannot read the keys file (moved or deleted?)")
            new = parse_keys(self.path.read_text(), str(self.path))
            self._check_names(new)
        except (OSError, UnicodeDecodeError, KeysFileError) as error:
            logger.error("Keys file not reloaded, the previous %d key(s) stay in force: %s", len(self), error)
            return False
        old = self.keys
        self.file_keys = new
        self.by_digest = {k.digest: k for k in self.keys}
        if set(old) == set(self.keys):
            return False
        before = {(k.name, k.digest) for k in old}
        after = {(k.name, k.digest) for k in self.keys}
        gone = before - after
        logger.info("Keys file reloaded: %d key(s) (%s); removed or changed: %s", len(self),
                    ", ".join(k.name for k in self.keys), ", ".join(sorted(n for n, _ in gone)) or "none")
        for listener in self.listeners:
            listener(gone)
        return True


def keys_file_arg(args) -> str | None:
    return getattr(args, "api_keys_file", None) or os.environ.get(KEYS_FILE_ENV) or None


def keyring_from_args(args, env_key: str | None = None) -> KeyRing | None:
    """The server's KeyRing, or None when no key is configured (a learner's local server: no key needed).

    `--api-key` wins over `VLLM_API_KEY`, as in vLLM; the keys file adds to either."""
    tokens = [t for t in (args.api_key or [os.environ.get("VLLM_API_KEY") if env_key is None else env_key]) if t]
    path = keys_file_arg(args)
    if not tokens and not path:
        return None
    return KeyRing(flag_keys(tokens), path)


def example_keys_file(names: Iterable[str]) -> str:
    """A keys file with a fresh random key per name (for docs/workshop.md's recipe and the tests)."""
    return "".join(f"{name}:{secrets.token_urlsafe(16)}\n" for name in names)
