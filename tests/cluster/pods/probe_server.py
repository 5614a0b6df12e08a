"""A tiny container for the test kubelet's own tests: serves on ``$POD_IP:8000``.

- ``GET /file/<path>``: the file's bytes (a mounted volume's, say), 404 if absent;
- ``GET /env/<NAME>``: an environment variable, 404 if unset;
- ``GET /healthz``: 200 until ``/healthz/fail`` was requested once, 500 after;
- SIGTERM: exits 0 after ``$TERM_DELAY_S`` seconds (default 0).
"""

import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

failing = threading.Event()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/healthz/fail":
            failing.set()
        if self.path.startswith("/healthz"):
            self._answer(500 if failing.is_set() else 200, b"")
        elif self.path.startswith("/file/"):
            path = "/" + self.path.removeprefix("/file/")
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    self._answer(200, f.read())
            else:
                self._answer(404, b"")
        elif self.path.startswith("/env/"):
            value = os.environ.get(self.path.removeprefix("/env/"))
            self._answer(404 if value is None else 200, (value or "").encode())
        else:
            self._answer(404, b"")

    def _answer(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def on_term(*_: object) -> None:
    time.sleep(float(os.environ.get("TERM_DELAY_S", "0")))
    sys.exit(0)


signal.signal(signal.SIGTERM, on_term)
ThreadingHTTPServer((os.environ["POD_IP"], 8000), Handler).serve_forever()
