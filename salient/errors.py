"""Errors by kind.

A :class:`UserError` is something the person running Salient can fix: its message says what is
wrong and what to do, and the command line prints it as one line with the kind's exit code. Any
other exception escaping a command is a bug in Salient: the command line says so, writes the
traceback to a file and exits 1.
"""

from __future__ import annotations

from collections.abc import Sequence

# What to say of a path whose symbolic links lead back to themselves (ELOOP).
LINK_LOOP = "a symbolic link that leads back to itself (a link loop); point it at a real file or folder"


class UserError(Exception):
    """A problem with the user's config, inputs, permissions or cluster, not with Salient."""

    exit_code: int = 2
    label: str = "error"

    @property
    def lines(self) -> list[str]:
        return [line for line in str(self).splitlines() if line.strip()] or [type(self).__name__]


class InputError(UserError, ValueError):
    """An input that cannot be used: a missing or damaged table, checkpoint, answer file, build id."""


class ConfigError(UserError, ValueError):
    """A configuration that cannot be used; ``lines`` holds one message per problem."""

    label = "config error"

    def __init__(self, lines: Sequence[str]) -> None:
        self._lines = list(lines)
        super().__init__("\n".join(self._lines))

    @property
    def lines(self) -> list[str]:
        return self._lines


class Busy(UserError, RuntimeError):
    """Another run holds what this one needs (the output root's lease)."""

    exit_code = 3
    label = "busy"


class Unreachable(UserError, ConnectionError):
    """A configured service (a Ray cluster) accepts no connection."""
