"""Named points where a test can freeze the process to ``kill -9`` it there.

``ATO_TEST_STOP_AT=<name>`` makes the process stop itself (SIGSTOP) when it reaches the point of
that name; the test then sends SIGKILL, so what the process leaves behind is exactly what a
``kill -9`` at that point leaves. Unset (always, outside the crash tests), a point costs one
environment lookup and does nothing. The points and the state at each are listed in
``tests/e2e/test_crash_hygiene.py``.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "ATO_TEST_STOP_AT"


def stop_point(name: str) -> None:
    """Freeze here if the test asked for this point (see the module docstring)."""
    if os.environ.get(ENV) == name:
        # sent to this thread, which takes it on its way out of the call: sent to the process, another
        # thread may take it while this one runs on (a busy machine once let a publish COMMIT first)
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
