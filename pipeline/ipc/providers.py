"""Provider processes as the broker sees them: how to tell one is alive and how to stop it.

A provider started by ``ato run`` is a background run (``run_id``): stopping it goes through
:func:`pipeline.runtime.session.stop`, so its supervisor stops the whole process tree exactly
as ``ato close`` does. Anything else is signalled directly.
"""

from __future__ import annotations

from typing import Any

from pipeline.ipc.broker import signal_stop


def stop_provider(provider: dict[str, Any]) -> None:
    run_id = provider.get("run_id")
    if run_id:
        from pipeline.runtime import session, table

        record = table.read(str(run_id))
        if record is not None:
            session.stop(record, force=False)
            return
    signal_stop(provider)
