"""The terminal: whether a stream may carry colour, emoji and live progress, and text made plain for it.

Decoration (colour, emoji, progress bars) is for a person at a terminal only: never on a pipe or
a file, never with ``NO_COLOR`` set (https://no-color.org), never on ``TERM=dumb``. The
``output.color`` setting (``ATO_COLOR`` / ``ato config set output.color``) can force it off, or on
for a stream that is not a terminal (``always``, as cargo's ``--color always``); ``NO_COLOR`` wins.
"""

from __future__ import annotations

import os
import re
from typing import TextIO

import click

# Pictographs, symbols and dingbats used as emoji, with an optional variation selector / joiner and the
# space that separated them from the text ("✅ done" -> "done").
_EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF][\uFE0F\u200D]*[ \t]?")


def _tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def _setting(key: str) -> str:
    """An output setting; a config.toml that cannot be read means the default here (the error about
    the file is reported by whatever reads it for real, and that report must not fail too)."""
    from pipeline import config
    from pipeline.errors import AtoError

    try:
        return config.resolve(key).value or "auto"
    except AtoError:
        return "auto"


def color_setting() -> str:
    """``auto`` | ``always`` | ``never``, by precedence (NO_COLOR, ATO_COLOR, config.toml, default)."""
    return _setting("output.color")


def decorated(stream: TextIO) -> bool:
    """May ``stream`` carry colour and emoji?"""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    setting = color_setting()
    if setting == "never":
        return False
    return setting == "always" or _tty(stream)


def live(stream: TextIO) -> bool:
    """May ``stream`` show a live (redrawn) progress line? A real terminal only, whatever --color says."""
    if os.environ.get("TERM") == "dumb" or not _tty(stream):
        return False
    return _setting("output.progress") != "never"


def plain(text: str) -> str:
    """``text`` without emoji and ANSI escape sequences."""
    return _EMOJI.sub("", click.unstyle(text))


def for_stream(text: str, stream: TextIO) -> str:
    """``text`` as ``stream`` may show it."""
    return text if decorated(stream) else plain(text)
