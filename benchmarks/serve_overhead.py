"""What the zoom proxy costs: added latency against calling the upstream directly, and throughput.

One run starts everything on 127.0.0.1 and prints both tables:

1. Latency, sequential, against a REAL upstream (``zoomvlm serve --target ocr --policy none``, the reader that
   stands in for a VLM on this machine): the same receipts sent directly to it, and through
   ``zoomvlm serve --upstream`` with ``--policy none`` and with the shipped learned cropper ``vlm``.
   p50/p95 latency per path and the proxy's added latency as a fraction of the direct call (p50 over p50).
   With ``vlm`` the added time includes the policy AND the upstream reading the appended crop.
2. Throughput (requests/s) at concurrency 1 / 8 / 32 against an echo upstream that does no model work,
   so the numbers are the proxy's own capacity (policy + image decode/resize/encode + the extra hop);
   with the OCR upstream every path would be bound by the reader (~1-2 requests/s on 2 cores).

Each question is a distinct receipt (first question per image), so the reader's per-view memo never hits.

    python benchmarks/serve_overhead.py --data ../shared/data/receipts/val.jsonl --n 12
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from fastapi import Request

from zoomvlm.data import load_jsonl

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """``zoomvlm serve ARGS`` on a free port (or this script's echo upstream); waits for /health."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ZOOMVLM_API_KEY", None)
    if args[0] == "echo":
        cmd = [sys.executable, __file__, "--echo-upstream", str(port)]
    else:
        code = "import sys; from zoomvlm.cli import main; sys.exit(main())"
        cmd = [sys.executable, "-c", code, "serve", *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"{cmd} did not start")


def body(sample) -> dict:
    url = "data:image/jpeg;base64," + base64.b64encode(Path(sample.image).read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": sample.question}]
    return {"model": "receipts", "messages": [{"role": "user", "content": content}], "max_tokens": 64}


async def run(base_url: str, bodies: list[dict], concurrency: int) -> tuple[list[float], list[float], float]:
    """Send every body once with ``concurrency`` in flight; (latencies s, policy ms, wall s). Raises on non-200."""
    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    latencies, policy_ms = [], []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def worker():
            while not queue.empty():
                b = queue.get_nowait()
                start = time.perf_counter()
                r = await client.post(f"{base_url}/chat/completions", json=b)
                latencies.append(time.perf_counter() - start)
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                policy_ms.append(float(r.headers.get("x-zoomvlm-policy-ms", "nan")))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, policy_ms, time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def echo_upstream(port: int) -> None:
    """A minimal OpenAI-compatible upstream that answers at once (reads the JSON, decodes no image)."""
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/health")
    @app.get("/v1/models")
    async def ok():
        return {"object": "list", "data": [{"id": "echo", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = json.loads(await request.body())
        n = sum(1 for m in req["messages"] if isinstance(m["content"], list) for p in m["content"]
                if p["type"] == "image_url")  # fmt: skip
        message = {"role": "assistant", "content": f"{n} images"}
        return {"id": "e", "object": "chat.completion", "created": 0, "model": req["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}  # fmt: skip

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/receipts/val.jsonl")
    parser.add_argument("--n", type=int, default=12, help="distinct receipts for the latency table")
    parser.add_argument("--echo-upstream", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_upstream is not None:
        return echo_upstream(args.echo_upstream)

    seen, samples = set(), []
    for s in load_jsonl(args.data):
        if s.image not in seen:
            seen.add(s.image)
            samples.append(s)
    bodies = [body(s) for s in samples]
    print("load average at start (1/5/15 min): {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()), flush=True)
    procs = []
    try:
        # ---- 1. latency against the real reader ------------------------------------------------
        proc, ocr = start(["--target", "ocr", "--policy", "none"])
        procs.append(proc)
        paths = {"direct": ocr}
        for policy in ("none", "vlm"):
            proc, url = start(["--upstream", ocr, "--policy", policy])
            procs.append(proc)
            paths[f"proxy --policy {policy}"] = url
        lat = {}
        warm = bodies[-1:]  # one receipt outside the measured set warms each path (connections, lazy loads)
        for name, url in paths.items():
            asyncio.run(run(url, warm, 1))
            lat[name] = asyncio.run(run(url, bodies[: args.n], 1))
        direct = statistics.median(lat["direct"][0])
        print(f"1. latency, sequential, {args.n} distinct receipts ({args.data}); upstream = zoomvlm serve "
              "--target ocr --policy none (RapidOCR at 384 px)")  # fmt: skip
        print(f"{'path':22} {'p50 ms':>8} {'p95 ms':>8} {'policy p50 ms':>14} {'added vs direct (p50)':>22}")
        for name, (latencies, policy_ms, _) in lat.items():
            p50 = statistics.median(latencies)
            added = "-" if name == "direct" else f"{(p50 - direct) / direct:+.1%}"
            pol = "-" if name == "direct" else f"{statistics.median(policy_ms):.0f}"
            print(f"{name:22} {p50 * 1000:8.0f} {pct(latencies, 0.95) * 1000:8.0f} {pol:>14} {added:>22}", flush=True)
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        procs = []

        # ---- 2. throughput against an echo upstream -------------------------------------------
        proc, echo = start(["echo"])
        procs.append(proc)
        paths = {"direct": echo}
        for policy in ("none", "vlm"):
            proc, url = start(["--upstream", echo, "--policy", policy, "--max-concurrency", "32"])
            procs.append(proc)
            paths[f"proxy --policy {policy}"] = url
        levels = (1, 8, 32)
        rows = {}
        for name, url in paths.items():
            asyncio.run(run(url, bodies[:8], 8))  # warm-up
            for c in levels:
                n = max(16, 2 * c)
                work = [bodies[i % len(bodies)] for i in range(n)]
                latencies, _, wall = asyncio.run(run(url, work, c))
                rows[name, c] = (n / wall, statistics.median(latencies))
        print(f"\n2. throughput, echo upstream (no model work), requests/s (p50 latency ms); max(16, 2 x c) requests "
              f"per cell, receipts cycled; {os.cpu_count()} cores for client, proxy, upstream")  # fmt: skip
        print(f"{'path':22} " + " ".join(f"{'c=' + str(c):>16}" for c in levels))
        for name in paths:
            cells = " ".join(f"{rows[name, c][0]:7.1f} ({rows[name, c][1] * 1000:5.0f})" for c in levels)
            print(f"{name:22} {cells}")
        print("load average at end (1/5/15 min): {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
