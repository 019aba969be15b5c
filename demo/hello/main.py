"""A tiny capsule: serves static/ on $PORT (default 8080) and prints where."""

import http.server
import os
import socketserver

port = int(os.environ.get("PORT", "8080"))
os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "static"))
with socketserver.TCPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler) as httpd:
    print(f"hello-ato listening on http://127.0.0.1:{port}/", flush=True)
    httpd.serve_forever()
