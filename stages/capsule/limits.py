"""How large a payload a consumer accepts: the 200 MiB ceiling, shared with ``ato build``.

A ``.capsule`` is small on the wire and can decode to far more; the ceiling applies to the
*decoded* payload (``total_raw_size``) before a byte of it is decoded. ``--force-large-payload``
lifts it for one command; the setting ``payload.max_bytes`` (``ATO_MAX_PAYLOAD_BYTES``, or
``[payload] max_bytes`` in ``$ATO_HOME/config.toml``, see :mod:`pipeline.config`) moves it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import config
from pipeline.errors import E_USAGE, AtoError

DEFAULT_MAX_PAYLOAD = 200 * 1024 * 1024
SETTING = "payload.max_bytes"


@dataclass(frozen=True)
class Limits:
    """What a verifier refuses beyond the format itself. ``max_payload`` None: no ceiling."""

    max_payload: int | None = DEFAULT_MAX_PAYLOAD


NO_CEILING = Limits(None)


def configured_max_payload() -> int:
    """The ``payload.max_bytes`` setting (environment, then config.toml), else 200 MiB."""
    chosen = config.resolve(SETTING)
    text = str(chosen.value or "").strip()
    if not text.isdigit() or int(text) <= 0:
        raise AtoError(E_USAGE, f"{SETTING} must be a positive number of bytes, got {text!r} (from {chosen.origin})",
                       hint=f"ato config set {SETTING} 1073741824, or unset it for the 200 MiB default")
    return int(text)


def consumer_limits(force_large_payload: bool = False) -> Limits:
    """The limits a command applies: none with ``--force-large-payload``, else the configured ceiling."""
    return NO_CEILING if force_large_payload else Limits(configured_max_payload())
