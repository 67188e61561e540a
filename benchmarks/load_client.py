"""A load generator for overload: N concurrent clients on keep-alive connections, each sending GET /recommend
for a random user one after another and timing every reply by status; a client that gets 503 waits what
``Retry-After`` says, plus up to as much again at random (jitter, as retrying clients should), before its next
request (wrk cannot), unless --no-backoff. The clients start spread over the first second.
Runs as its own process (uvloop, raw HTTP/1.1) and reports its own CPU.

    python -m benchmarks.load_client --url http://127.0.0.1:8000 --clients 256 --seconds 20 --key K
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import resource
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

LENGTH = re.compile(rb"content-length:\s*(\d+)", re.I)
RETRY = re.compile(rb"retry-after:\s*(\d+)", re.I)


async def one_client(i: int, host: str, port: int, key: str, end: float, backoff: bool, out: list) -> None:
    rng = random.Random(i)
    await asyncio.sleep(rng.random())  # arrivals spread over the first second, not one burst of N
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < end:
            req = (f"GET /recommend/{rng.randint(1, 610)}?k=10 HTTP/1.1\r\nHost: {host}\r\n"
                   f"X-API-Key: {key}\r\n\r\n").encode()
            t0 = time.perf_counter()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            m = LENGTH.search(head)
            await reader.readexactly(int(m.group(1)) if m else 0)
            status = int(head[9:12])
            out.append((t0, (time.perf_counter() - t0) * 1000, status))
            if b"connection: close" in head.lower():
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
            if status == 503 and backoff:
                r = RETRY.search(head)
                # at least what Retry-After says, plus jitter (clients that all wait exactly 1 s come back as one wave)
                await asyncio.sleep((float(r.group(1)) if r else 1.0) * (1 + rng.random()))
    finally:
        writer.close()


async def main_async(url: str, clients: int, seconds: float, key: str, backoff: bool) -> list:
    u = urlparse(url)
    out: list = []
    end = time.perf_counter() + seconds
    await asyncio.gather(*(one_client(i, u.hostname, u.port, key, end, backoff, out) for i in range(clients)))
    return out


async def one_searcher(i: int, host: str, port: int, key: str, end: float, clips: list[Path], out: list) -> None:
    """POST /search with one clip after another (multipart, raw): the time is to the reply's status line, which
    a refusal sends before the upload is read (the rest of the upload is then abandoned with the connection)."""
    rng = random.Random(1000 + i)
    j = i
    await asyncio.sleep(rng.random())
    while time.perf_counter() < end:
        clip = clips[j % len(clips)]
        j += 1
        data = clip.read_bytes()
        b = f"recsys-{i}-{j}"
        body = (f"--{b}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{clip.name}\"\r\n"
                f"Content-Type: audio/wav\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
        head = (f"POST /search HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {key}\r\nConnection: close\r\n"
                f"Content-Type: multipart/form-data; boundary={b}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        t0 = time.perf_counter()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(head + body)  # buffered: sent while we wait for the status line
        try:
            status_line = await asyncio.wait_for(reader.readline(), 60)
            status = int(status_line[9:12]) if status_line else 0
        except (asyncio.TimeoutError, ConnectionError, ValueError):
            status = 0
        out.append((t0, (time.perf_counter() - t0) * 1000, status))
        writer.close()
        if status == 503:
            await asyncio.sleep(1 + rng.random())  # Retry-After, with jitter


async def search_async(url: str, clients: int, seconds: float, key: str, folder: Path) -> list:
    u = urlparse(url)
    clips = sorted(folder.glob("*.wav"))
    out: list = []
    end = time.perf_counter() + seconds
    await asyncio.gather(*(one_searcher(i, u.hostname, u.port, key, end, clips[i::clients], out) for i in range(clients)))
    return out


def summarize(records: list, seconds: float) -> dict:
    by: dict = {}
    for code in sorted({c for _, _, c in records}):
        ms = np.array([m for _, m, c in records if c == code])
        by[str(code)] = {"n": int(len(ms)), "per_s": round(len(ms) / seconds, 1),
                         "p50": round(float(np.percentile(ms, 50)), 2), "p99": round(float(np.percentile(ms, 99)), 2),
                         "max": round(float(ms.max()), 2)}
    return by


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load_client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--clients", type=int, default=256)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--key", default="bench")
    p.add_argument("--no-backoff", action="store_true", help="retry a 503 at once (a retry storm)")
    p.add_argument("--search-clips", type=Path, default=None,
                   help="POST /search with the .wav files in this folder instead (each client its own clips)")
    a = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    if a.search_clips is not None:
        records = asyncio.run(search_async(a.url, a.clients, a.seconds, a.key, a.search_clips))
    else:
        records = asyncio.run(main_async(a.url, a.clients, a.seconds, a.key, not a.no_backoff))
    wall, c1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    cpu = c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime
    print(json.dumps({"clients": a.clients, "seconds": round(wall, 1), "backoff": not a.no_backoff,
                      "requests": len(records), "statuses": summarize(records, wall),
                      "client_cores": round(cpu / wall, 2)}))


if __name__ == "__main__":
    main()
