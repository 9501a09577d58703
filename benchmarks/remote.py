"""A shuffled epoch from object storage against the same epoch from local disk.

The store (Blosc-lz4 Zarr of 64x64x3 uint8 crops of real photos, oocseq's default chunking) is
uploaded to a real S3-compatible server on localhost (moto's server mode), behind a proxy that
delays every request by 10 ms or 50 ms (a network's round trip; :mod:`oocseq.testing.s3`).
For each delay:

* **local**: one shuffled epoch (``ChunkedSequence``, batch 128, batches in order) from local
  disk with a cold page cache (evicted with ``posix_fadvise``);
* **remote**: the same epoch from ``s3://`` without a cache: samples/s, bytes the server sent
  (against the store's size) and peak ``RssAnon`` during the epoch (against local's);
* **remote + cache**: a first epoch fills a ``cache_dir``; the second epoch is timed, with
  the cache's files evicted from the page cache first (as local's).
* a delay of 0 ms shows what the server itself (not the latency) allows.

Ratios are remote / local within one round (local, then remote), their median over the
rounds. The S3 server
and the proxy are Python (moto, http.server) on the same (small) machine, in a process of
their own (``--server process``, default) or in the reader's (``--server thread``): they
compete with the reader for the CPU. Each row gives the CPU seconds the reader's process and
the server's process used during the remote epoch, against the epoch's wall time: when the
server's CPU time nears the wall time, the server is the bottleneck and the figures are a lower
bound on what a real object store gives.

Run:  python benchmarks/remote.py [--size-mb 128] [--delays-ms 10,50] [--runs 1] [--workdir out/bench]
      [--server process|thread] [--max-requests 32] [--max-bytes-mb 256]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _data import (  # shared with the other benchmark scripts
    Target,
    environment,
    files_of,
    fmt_rate,
    fmt_ratio,
    make_cold,
    median,
    num_samples,
    photo_crops,
    remove,
    rss_anon,
    targets_table,
    write_store,
)

BUCKET = "bench"
#: ReadOptions.readahead for both epochs (None: the default)
READAHEAD: int | None = None


class PeakRss:
    """Peak ``RssAnon`` above the level at entry, sampled every 20 ms."""

    def __enter__(self) -> PeakRss:
        self.base = rss_anon()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_anon() - self.base)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon() - self.base)


_NGINX_CONF = """
load_module {modules}/ngx_http_echo_module.so;
{user}
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
  log_format sent '$body_bytes_sent';
  access_log {dir}/access.log sent;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location / {{ {sleep} echo_exec @files; }}
    location @files {{ root {root}; }}
  }}
}}
"""


class NginxServer:
    """nginx (C, one worker process) serving the folder ``root`` over plain HTTP with range
    requests, every request delayed by ``delay`` seconds first (the echo module's non-blocking
    ``echo_sleep``): a fast stand-in for an object store, read through ``http://`` URLs.
    The same interface as :class:`oocseq.testing.s3.S3Server` where the benchmark uses it.
    Needs ``nginx`` and its echo module (Debian: ``apt-get install nginx-light``)."""

    def __init__(self, root: Path, workdir: Path) -> None:
        import shutil

        from oocseq.testing.s3 import free_port

        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        modules = Path("/usr/lib/nginx/modules")
        if not Path(binary).exists() or not (modules / "ngx_http_echo_module.so").exists():
            raise SystemExit("--server nginx needs nginx with its echo module (apt-get install nginx-light)")
        self.binary, self.modules, self.root = binary, modules, root
        self.dir = workdir / "nginx"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: Any = None
        self.proxy = self  # delay, reset(), bytes_out as on S3Server.proxy
        self._delay = 0.0

    def _start(self) -> None:
        import subprocess

        sleep = f"echo_sleep {self._delay:.3f};" if self._delay else ""
        import os

        conf = _NGINX_CONF.format(
            user="user root;" if os.geteuid() == 0 else "",  # else workers cannot read a 0700 folder
            modules=self.modules,
            dir=self.dir,
            port=self.port,
            sleep=sleep,
            root=self.root,
        )
        (self.dir / "nginx.conf").write_text(conf)
        self.proc = subprocess.Popen([self.binary, "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir)])
        import http.client

        for _ in range(100):
            try:
                conn = http.client.HTTPConnection(f"127.0.0.1:{self.port}", timeout=5)
                conn.request("HEAD", "/")
                conn.getresponse().read()
                conn.close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not start; see {self.dir / 'error.log'}")

    def _stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None

    def __enter__(self) -> NginxServer:
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    @property
    def delay(self) -> float:
        return self._delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        self._delay = seconds
        self._stop()
        self._start()

    def reset(self) -> None:
        (self.dir / "access.log").write_text("")

    @property
    def bytes_out(self) -> int:
        text = (self.dir / "access.log").read_text()
        return sum(int(v) for v in text.split())

    def cpu_seconds(self) -> float:
        """CPU seconds of nginx's master and worker processes so far."""
        import os

        pids = [self.proc.pid]
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        if children.exists():
            pids += [int(p) for p in children.read_text().split()]
        total = 0.0
        for pid in pids:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total


def epoch(
    source: Any, batch_size: int, epoch_no: int = 0, server: Any = None
) -> tuple[float, int, float, float, float]:
    """Seconds for one shuffled epoch (batches in order), peak RssAnon bytes, the CPU
    seconds this process and ``server``'s process used meanwhile, and seconds to the first
    batch."""
    import os

    import oocseq

    read = oocseq.ReadOptions(readahead=READAHEAD) if READAHEAD is not None else None
    seq = oocseq.ChunkedSequence(source, batch_size, x="x", y="y", seed=0, read=read)
    seq.set_epoch(epoch_no)
    server_cpu = server.cpu_seconds() if server is not None else 0.0
    with PeakRss() as rss:
        cpu = os.times()
        t = time.perf_counter()
        first = 0.0
        for i in range(len(seq)):
            seq[i]
            first = first or time.perf_counter() - t
        took = time.perf_counter() - t
        after = os.times()
    server_cpu = server.cpu_seconds() - server_cpu if server is not None else 0.0
    seq.close()
    return took, rss.peak, (after.user + after.system) - (cpu.user + cpu.system), server_cpu, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=128)
    ap.add_argument("--delays-ms", default="10,50")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument(
        "--server",
        choices=("process", "thread", "nginx"),
        default="process",
        help="moto's S3 server (and the delaying proxy) in its own process or in this one's "
        "threads; or nginx over plain http:// (C, with a non-blocking delay)",
    )
    ap.add_argument("--max-requests", type=int, default=None, help="RemoteOptions.max_requests")
    ap.add_argument("--readahead", type=int, default=None, help="ReadOptions.readahead (windows)")
    ap.add_argument("--max-bytes-mb", type=int, default=None, help="RemoteOptions.max_bytes_in_flight")
    args = ap.parse_args()
    global READAHEAD
    READAHEAD = args.readahead

    import oocseq
    from oocseq.testing.s3 import S3Server

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="oocseq-remote-"))
    workdir.mkdir(parents=True, exist_ok=True)
    n = num_samples(args.size_mb)
    path = workdir / "crops_lz4.zarr"
    blocks = list(photo_crops(n))
    store = write_store(
        path,
        {"x": (b for b, _ in blocks), "y": (c for _, c in blocks)},
        "lz4",
    )
    del blocks
    stored = store.stored_nbytes("x") + store.stored_nbytes("y")
    delays = [float(d) / 1000 for d in args.delays_ms.split(",")]
    print(environment())
    print(f"store: {n} samples, {store.num_chunks} chunks of {store.chunk_len}, {stored / 1e6:.1f} MB stored")
    rows: list[Target] = []
    table = [
        "| delay | local (cold) | remote | ratio | remote epoch: wall / reader CPU / server CPU / 1st batch | "
        "bytes fetched / stored | remote + cache (2nd epoch) | ratio | peak RssAnon local / remote |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    tuned: dict[str, int] = {}
    if args.max_requests is not None:
        tuned["max_requests"] = args.max_requests
    if args.max_bytes_mb is not None:
        tuned["max_bytes_in_flight"] = args.max_bytes_mb << 20
    print(
        f"server: {args.server}; RemoteOptions({', '.join(f'{k}={v}' for k, v in tuned.items())}); "
        f"readahead: {'default' if READAHEAD is None else READAHEAD}"
    )
    try:
        server: Any = (
            NginxServer(workdir, workdir)
            if args.server == "nginx"
            else S3Server(own_process=args.server == "process")
        )
        with server as s3:
            if args.server == "nginx":
                url = f"{s3.endpoint}/{path.name}"
            else:
                s3.create_bucket(BUCKET)
                s3.upload(path, BUCKET, "crops.zarr")
                url = f"s3://{BUCKET}/crops.zarr"
            for delay in delays:
                s3.proxy.delay = delay
                local_r, remote_r, cached_r, fetched, rss_l, rss_r = [], [], [], [], [], []
                walls, reader_cpu, server_cpu, firsts = [], [], [], []
                remote = oocseq.RemoteOptions(**tuned)
                for _ in range(args.runs):
                    make_cold(files_of(path))
                    t_local, rss, *_ = epoch(oocseq.open_store(path), args.batch_size)
                    local_r.append(n / t_local)
                    rss_l.append(rss)
                    s3.proxy.reset()
                    t_remote, rss, cpu, cpu_s, first = epoch(
                        oocseq.open_store(url, remote=remote), args.batch_size, 0, s3
                    )
                    remote_r.append(n / t_remote)
                    rss_r.append(rss)
                    walls.append(t_remote)
                    firsts.append(first)
                    reader_cpu.append(cpu)
                    server_cpu.append(cpu_s)
                    fetched.append(s3.proxy.bytes_out)
                    cache = workdir / "cache"
                    remove(cache)
                    opts = oocseq.RemoteOptions(cache_dir=str(cache), **tuned)
                    epoch(oocseq.open_store(url, remote=opts), args.batch_size, 0)
                    make_cold(files_of(cache))  # as cold as local's
                    t_cached, *_ = epoch(oocseq.open_store(url, remote=opts), args.batch_size, 1)
                    cached_r.append(n / t_cached)
                    remove(cache)
                lo, re_, ca = median(local_r), median(remote_r), median(cached_r)
                # ratios of the runs made side by side (local, then remote), then their median:
                # steadier than a ratio of medians on a machine whose load drifts
                r_remote = median([r / b for r, b in zip(remote_r, local_r, strict=True)])
                r_cached = median([c / b for c, b in zip(cached_r, local_r, strict=True)])
                by = median(fetched) / stored
                table.append(
                    f"| {delay * 1000:.0f} ms | {fmt_rate(lo)}/s | {fmt_rate(re_)}/s | {fmt_ratio(r_remote)} | "
                    f"{median(walls):.2f} / {median(reader_cpu):.2f} / "
                    f"{median(server_cpu) if args.server != 'thread' else float('nan'):.2f} / {median(firsts):.2f} s | {by:.3f} | {fmt_rate(ca)}/s | {fmt_ratio(r_cached)} | "
                    f"{median(rss_l) / 2**20:.0f} / {median(rss_r) / 2**20:.0f} MiB |"
                )
                tag = f"{delay * 1000:.0f} ms"
                rows += [
                    Target(
                        f"remote epoch, {tag}",
                        fmt_ratio(r_remote),
                        ">= 0.7x local",
                        r_remote >= 0.7,
                        f"{fmt_rate(re_)}/s vs {fmt_rate(lo)}/s",
                    ),
                    Target(
                        f"bytes fetched, {tag}",
                        f"{by:.3f}x",
                        "<= 1.05x stored",
                        by <= 1.05,
                        f"{median(fetched) / 1e6:.1f} MB",
                    ),
                    Target(
                        f"2nd epoch with cache_dir, {tag}",
                        fmt_ratio(r_cached),
                        ">= 0.9x local",
                        r_cached >= 0.9,
                        f"{fmt_rate(ca)}/s",
                    ),
                ]
    finally:
        if not args.keep:
            remove(path)
            remove(workdir / "nginx")
            if args.workdir is None:
                remove(workdir)
    print()
    print("\n".join(table))
    print()
    print(targets_table(rows))


if __name__ == "__main__":
    main()
