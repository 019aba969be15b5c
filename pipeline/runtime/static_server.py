"""The web/static server: ``python -m pipeline.runtime.static_server --dir D --port P``.

Serves one directory read-only on 127.0.0.1 (never a wildcard address); requests
that resolve outside the directory (``..``, symlinks leaving it) get 404.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

from pipeline.errors import printable


class Handler(SimpleHTTPRequestHandler):
    def translate_path(self, path: str) -> str:
        resolved = os.path.realpath(super().translate_path(path))
        root = os.path.realpath(self.directory)
        if resolved != root and not resolved.startswith(root + os.sep):
            return os.path.join(root, "\0missing")
        return resolved

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        sys.stderr.write(printable(f"{self.address_string()} {format % args}") + "\n")  # a path can hold escapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ato-static-server")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    ns = parser.parse_args(argv)
    server = ThreadingHTTPServer((ns.host, ns.port), partial(Handler, directory=ns.dir))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
