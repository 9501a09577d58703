"""A real S3-compatible server on localhost for tests and benchmarks (moto's server mode),
with an optional proxy in front of it that delays every request and counts what it serves.

Needs ``moto[server]`` (the ``test`` extra). Nothing here reaches beyond localhost::

    with S3Server() as s3:                       # sets AWS_* for this process
        s3.create_bucket("data")
        s3.upload(local_store, "data", "x.zarr")
        store = oocseq.open_store("s3://data/x.zarr")
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["LatencyProxy", "S3Server", "free_port"]

_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LatencyProxy:
    """An HTTP proxy on localhost in front of ``upstream`` (``host:port``): every request
    waits ``delay`` seconds before it is forwarded (a network's round trip), and is counted.

    Attributes:
        url: ``http://127.0.0.1:PORT``, the endpoint to give clients.
        requests: Counter of request paths answered (``/bucket/key``).
        log: ``(method, path)`` of every request answered, in order.
        bytes_out: body bytes sent to clients (all requests).
    """

    def __init__(self, upstream: str, delay: float = 0.0) -> None:
        self.upstream = upstream
        self.delay = delay
        self.requests: Counter[str] = Counter()
        self.log: list[tuple[str, str]] = []
        self.bytes_out = 0
        self.down = False
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _control(self) -> bool:
                """``/_proxy/stats`` (GET), ``/_proxy/reset`` (POST), ``/_proxy/delay/<s>``
                (PUT): the proxy's own answers, for a proxy in another process."""
                if not self.path.startswith("/_proxy/"):
                    return False
                what = self.path.removeprefix("/_proxy/")
                if what.startswith("delay/"):
                    proxy.delay = float(what.removeprefix("delay/"))
                elif what == "reset":
                    proxy.reset()
                body = json.dumps({"bytes_out": proxy.bytes_out, "requests": len(proxy.log)}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return True

            def _forward(self) -> None:
                if self._control():
                    return
                if proxy.down:  # drop the connection without an answer, like a network gone
                    self.close_connection = True
                    return
                if proxy.delay:
                    time.sleep(proxy.delay)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                up: http.client.HTTPConnection | None = getattr(self, "_up", None)
                if up is None:  # one upstream connection per client connection
                    up = http.client.HTTPConnection(proxy.upstream, timeout=60)
                    self._up: http.client.HTTPConnection | None = up
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                try:
                    up.request(self.command, self.path, body=body, headers=headers)
                    resp = up.getresponse()
                    data = resp.read()
                except (OSError, http.client.HTTPException):
                    self._up = None
                    up.close()
                    self.send_error(502)
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                with proxy._lock:
                    proxy.requests[self.path.split("?")[0]] += 1
                    proxy.log.append((self.command, self.path.split("?")[0]))
                    proxy.bytes_out += len(data) if self.command != "HEAD" else 0

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

            def finish(self) -> None:
                super().finish()
                up = getattr(self, "_up", None)
                if up is not None:
                    up.close()

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.log.clear()
            self.bytes_out = 0

    def stop(self) -> None:
        """Stop answering: open connections are dropped, new ones refused."""
        self.down = True
        self._server.shutdown()
        self._server.server_close()


class S3Server:
    """moto's S3 server on a free localhost port, with a :class:`LatencyProxy` in front.

    Entering sets ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_REGION`` /
    ``AWS_ENDPOINT_URL`` (the proxy's URL) for this process and the processes it starts;
    leaving restores them and stops both servers.

    ``own_process=True`` runs both in a child process (a benchmark then sees their CPU time
    apart from its own, and they do not share its interpreter lock); ``proxy`` is then a
    :class:`ProxyHandle` (``delay``, ``reset()``, ``bytes_out``).

    Attributes:
        endpoint: the URL clients use (the proxy's).
        proxy: the :class:`LatencyProxy` (set ``proxy.delay`` to inject latency).
        pid: the process the server runs in.
    """

    def __init__(self, delay: float = 0.0, own_process: bool = False) -> None:
        self._port = free_port()
        self._delay = delay
        self._own_process = own_process
        self._saved: dict[str, str | None] = {}
        self.pid = os.getpid()

    def __enter__(self) -> S3Server:
        import logging

        if self._own_process:
            import subprocess
            import sys

            self._child = subprocess.Popen(
                [sys.executable, "-m", "oocseq.testing.s3", str(self._delay)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            self.endpoint = self._child.stdout.readline().strip() if self._child.stdout else ""
            if not self.endpoint.startswith("http://"):
                self._child.kill()
                raise RuntimeError(f"the S3 server process did not start: {self.endpoint!r}")
            self.pid = self._child.pid
            self.proxy: Any = ProxyHandle(self.endpoint)
        else:
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
            self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self._port, verbose=False)
            self._moto.start()
            self.proxy = LatencyProxy(f"127.0.0.1:{self._port}", self._delay)
            self.endpoint = self.proxy.url
        env = {**_ENV, "AWS_ENDPOINT_URL": self.endpoint}
        self._saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        return self

    def __exit__(self, *exc: object) -> None:
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if self._own_process:
            if self._child.stdin is not None:
                self._child.stdin.close()  # the child stops when its standard input ends
            try:
                self._child.wait(timeout=30)
            except Exception:
                self._child.kill()
                self._child.wait()
            return
        try:
            self.proxy.stop()
        except Exception:
            pass
        self._moto.stop()

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) the server and its proxy have used so far: only
        meaningful with ``own_process=True`` (else it is this whole process's)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _store(self, bucket: str) -> Any:
        from obstore.store import S3Store

        return S3Store(bucket, endpoint=self.endpoint, client_options={"allow_http": True})

    def _request(self, method: str, path: str, body: bytes | None = None) -> None:
        conn = http.client.HTTPConnection(self.endpoint.removeprefix("http://"), timeout=30)
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        resp.read()
        conn.close()
        if resp.status >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {resp.status}")

    def create_bucket(self, bucket: str, public: bool = False) -> None:
        """Create ``bucket``; ``public``: anyone may read its objects (plain https:// URLs)."""
        self._request("PUT", f"/{bucket}")
        if public:
            policy = {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": "*",
                        "Action": "s3:GetObject",
                        "Resource": f"arn:aws:s3:::{bucket}/*",
                    }
                ],
            }
            self._request("PUT", f"/{bucket}?policy", json.dumps(policy).encode())

    def upload(self, local: str | os.PathLike[str], bucket: str, prefix: str) -> int:
        """Copy the files under the folder ``local`` to ``s3://bucket/prefix/``; returns bytes."""
        import obstore

        store = self._store(bucket)
        total = 0
        root = Path(local)
        for path in sorted(_files(root)):
            data = path.read_bytes()
            obstore.put(store, f"{prefix}/{path.relative_to(root).as_posix()}", data)
            total += len(data)
        return total

    def put(self, bucket: str, key: str, data: bytes) -> None:
        import obstore

        obstore.put(self._store(bucket), key, data)

    def get(self, bucket: str, key: str) -> bytes:
        import obstore

        return bytes(obstore.get(self._store(bucket), key).bytes())


class ProxyHandle:
    """A :class:`LatencyProxy` in another process, driven through its ``/_proxy/`` paths."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _call(self, method: str, what: str) -> dict[str, Any]:
        conn = http.client.HTTPConnection(self.url.removeprefix("http://"), timeout=30)
        try:
            conn.request(method, f"/_proxy/{what}")
            return dict(json.loads(conn.getresponse().read()))
        finally:
            conn.close()

    @property
    def delay(self) -> float:
        raise AttributeError("the delay of a proxy in another process is set, not read")

    @delay.setter
    def delay(self, seconds: float) -> None:
        self._call("PUT", f"delay/{float(seconds)}")

    def reset(self) -> None:
        self._call("POST", "reset")

    @property
    def bytes_out(self) -> int:
        return int(self._call("GET", "stats")["bytes_out"])


def _serve(delay: float) -> None:
    """Run moto's server and a proxy in front of it until standard input ends; print the
    proxy's URL first."""
    import logging
    import sys

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    proxy = LatencyProxy(f"127.0.0.1:{port}", delay)
    print(proxy.url, flush=True)
    sys.stdin.read()
    proxy.stop()
    moto.stop()


def _files(root: Path) -> Iterator[Path]:
    for p in root.rglob("*"):
        if p.is_file():
            yield p


if __name__ == "__main__":
    import sys

    _serve(float(sys.argv[1]) if len(sys.argv) > 1 else 0.0)
