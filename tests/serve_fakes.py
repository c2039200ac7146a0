"""Real processes for the zoom-server tests: a scriptable fake OpenAI upstream, and launch helpers.

The fake upstream is a raw asyncio HTTP/1.1 server (so it can reset a connection mid-stream), run as its own
process: ``python tests/serve_fakes.py PORT``. Control:

- ``POST /control {"script": [...]}``: behaviours for the next chat requests, in order, then ``echo``:
  ``{"status": 500}``, ``{"status": 503, "retry_after": "1"}``, ``{"sleep": 5}`` (then echo; a client that
  leaves while it sleeps is logged as ``client_gone``), ``{"reset_after_chunks": 2}`` (stream 2 chunks, then
  abort the connection; without streaming: abort at once), ``{"chunk_delay": 0.5}`` (seconds between streamed
  chunks; a client that leaves meanwhile is logged).
- ``GET /log``: every chat request received (headers, model, text, image sizes, stream) and events;
  ``POST /reset`` clears script and log.

``echo`` answers ``echo:<user text>|images=<n>|sizes=<WxH,...>``; streamed, it sends that text in 20 chunks.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SRC = str(Path(__file__).resolve().parents[1] / "src")


# ---------------------------------------------------------------------------------------------
# helpers used by the tests
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ZOOMVLM_API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    """Wait until ``url`` answers 200, failing early with the process's output if it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"process exited with {proc.returncode}:\n{out}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError(f"{url} did not come up within {timeout} s")


def start_fake_upstream() -> tuple[subprocess.Popen, str]:
    """Start the fake upstream; returns (process, base URL ending in /v1)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, str(port)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_http(f"http://127.0.0.1:{port}/v1/models", proc)
    return proc, f"http://127.0.0.1:{port}/v1"


def start_server(args: list[str], env: dict | None = None, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start ``zoomvlm serve ARGS --port FREE``; returns (process, base URL ending in /v1) once /health answers."""
    port = free_port()
    code = "import sys; from zoomvlm.cli import main; sys.exit(main())"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", *args, "--port", str(port)],
        env=_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_http(f"http://127.0.0.1:{port}/health", proc, timeout)
    return proc, f"http://127.0.0.1:{port}/v1"


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# ---------------------------------------------------------------------------------------------
# the fake upstream
# ---------------------------------------------------------------------------------------------
class FakeUpstream:
    def __init__(self) -> None:
        self.script: list[dict] = []
        self.log: list[dict] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                keep = await self.route(method, path, headers, body, reader, writer)
                if not keep:
                    return
        finally:
            writer.close()

    async def send(self, writer, status: int, obj, extra: dict | None = None) -> bool:
        data = json.dumps(obj).encode()
        hdrs = {"content-type": "application/json", "content-length": str(len(data))} | (extra or {})
        head = f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
        writer.write(head.encode() + data)
        await writer.drain()
        return True

    async def route(self, method, path, headers, body, reader, writer) -> bool:
        if path == "/v1/models":
            return await self.send(writer, 200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
        if path == "/control":
            self.script = list(json.loads(body)["script"])
            return await self.send(writer, 200, {"ok": True})
        if path == "/reset":
            self.script, self.log = [], []
            return await self.send(writer, 200, {"ok": True})
        if path == "/log":
            return await self.send(writer, 200, self.log)
        if path != "/v1/chat/completions":
            self.log.append({"event": "other", "path": path})
            return await self.send(writer, 404, {"error": {"message": "not found"}})
        req = json.loads(body)
        texts, sizes = [], []
        for message in req["messages"]:
            content = message.get("content")
            if isinstance(content, str):
                texts.append(content)
                continue
            for part in content or []:
                if part["type"] == "text":
                    texts.append(part["text"])
                else:
                    from PIL import Image

                    data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                    sizes.append("{}x{}".format(*Image.open(io.BytesIO(data)).size))
        entry = {
            "headers": headers,
            "model": req.get("model"),
            "text": " ".join(texts),
            "sizes": sizes,
            "stream": bool(req.get("stream")),
        }
        self.log.append(entry)
        action = self.script.pop(0) if self.script else {}
        entry["action"] = action
        if "status" in action:
            extra = {"retry-after": action["retry_after"]} if "retry_after" in action else {}
            return await self.send(writer, action["status"], {"error": {"message": "scripted failure"}}, extra)
        if "sleep" in action:
            try:
                got = await asyncio.wait_for(reader.read(1), action["sleep"])
            except asyncio.TimeoutError:
                got = None
            if got == b"":
                self.log.append({"event": "client_gone"})
                return False
        answer = f"echo:{entry['text']}|images={len(sizes)}|sizes={','.join(sizes)}"
        if not req.get("stream"):
            if "reset_after_chunks" in action:
                writer.transport.abort()
                return False
            out = {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 0,
                "model": req.get("model"),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
                ],
            }
            return await self.send(writer, 200, out)
        head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        writer.write(head.encode())
        step = max(1, len(answer) // 20 + 1)
        pieces = [answer[i : i + step] for i in range(0, len(answer), step)]
        for n, piece in enumerate(pieces):
            if n == action.get("reset_after_chunks"):
                await writer.drain()
                writer.transport.abort()
                return False
            chunk = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "fake",
                "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
            }
            data = f"data: {json.dumps(chunk)}\n\n".encode()
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
            try:  # a pause between chunks; a client that leaves meanwhile is logged
                got = await asyncio.wait_for(reader.read(1), action.get("chunk_delay", 0.005))
            except asyncio.TimeoutError:
                got = None
            if got == b"":
                self.log.append({"event": "client_gone", "after_chunks": n + 1})
                return False
        data = b"data: [DONE]\n\n"
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
        await writer.drain()
        return True


async def _main(port: int) -> None:
    fake = FakeUpstream()
    server = await asyncio.start_server(fake.handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main(int(sys.argv[1])))
