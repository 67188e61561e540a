"""A local HTTP server that speaks the Gemini REST API's batchEmbedContents and the Files API's resumable
upload and ``files.get`` (the only stand-in the project allows, because the hosted API is out of reach).
The real google-genai client talks to it.

It checks what the real API checks (API key, <= 100 requests, well-formed parts, base64 media, MIME
types, outputDimensionality), returns deterministic vectors (one per Content, aggregated over its parts,
Matryoshka-style: a 3,072-d vector truncated), and injects scripted faults: 429 with Retry-After, 500,
slow answers, malformed bodies, short answers, and 400 for any batch holding a "poisoned" item. Uploaded
videos stay PROCESSING for their first ``files.get`` (as the real service makes callers wait); an upload
whose bytes hold the poison marker ends FAILED; ``upload_faults`` script the answers to upload starts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

PATH = re.compile(r"^/(v1|v1beta|v1alpha)/models/([^/:]+):batchEmbedContents$")
UPLOAD = re.compile(r"^/upload/(v1|v1beta|v1alpha)/files$")
FILE = re.compile(r"^/(v1|v1beta|v1alpha)/files/([^/:?]+)$")
MIMES = {"image/png", "image/jpeg", "audio/mpeg", "audio/mp3", "audio/wav", "audio/x-wav", "audio/wave",
         "video/mp4", "video/mpeg", "application/pdf"}
FULL_DIM = 3072


def part_vector(kind: str, payload: bytes) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(kind.encode() + b"\0" + payload).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(FULL_DIM)


@dataclass
class Fault:
    """One scripted answer: kind in {"429", "500", "503", "slow", "malformed", "short", "nan"}."""

    kind: str
    retry_after: float | None = None
    delay_s: float = 0.0


@dataclass
class FakeGemini:
    api_key: str = "test-key"
    poison: str = "POISON"  # a text part containing this makes the whole batch a 400
    faults: list[Fault] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)  # what the server saw: sizes, times, in-flight count
    in_flight: int = 0
    max_in_flight: int = 0
    delay_s: float = 0.0  # every embedding request takes at least this long (to make requests overlap)
    upload_faults: list[Fault] = field(default_factory=list)
    files: dict[str, dict] = field(default_factory=dict)  # name -> {"data", "mime", "state", "polls"}

    def __post_init__(self):
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes | dict, headers: dict | None = None):
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

            def _error(self, code: int, status: str, message: str, headers: dict | None = None):
                self._send(code, {"error": {"code": code, "status": status, "message": message}}, headers)

            def do_POST(self):
                with fake._lock:
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    self._handle()
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

            def _file_json(self, name: str) -> dict:
                f = fake.files[name]
                out = {"name": name, "uri": f"{fake.url}/v1beta/{name}", "mimeType": f["mime"],
                       "sizeBytes": str(len(f["data"])), "state": f["state"]}
                if f["state"] == "FAILED":
                    out["error"] = {"code": 400, "message": "the file could not be processed"}
                return out

            def do_GET(self):
                m = FILE.match(self.path.split("?")[0])
                if not m:
                    return self._error(404, "NOT_FOUND", f"no route {self.path}")
                if self.headers.get("x-goog-api-key") != fake.api_key:
                    return self._error(403, "PERMISSION_DENIED", "API key not valid")
                name = f"files/{m.group(2)}"
                with fake._lock:
                    if name not in fake.files:
                        return self._error(404, "NOT_FOUND", f"{name} does not exist")
                    f = fake.files[name]
                    answer = self._file_json(name)
                    if f["state"] == "PROCESSING":
                        f["polls"] -= 1
                        if f["polls"] < 0:
                            f["state"] = "FAILED" if fake.poison.encode() in f["data"] else "ACTIVE"
                return self._send(200, answer)

            def _upload(self, body: bytes):
                """Resumable upload: a "start" answers with the upload URL; "upload, finalize" stores the bytes."""
                command = self.headers.get("x-goog-upload-command", "")
                if "start" in command:
                    if self.headers.get("x-goog-api-key") != fake.api_key:
                        return self._error(403, "PERMISSION_DENIED", "API key not valid")
                    with fake._lock:
                        fault = fake.upload_faults.pop(0) if fake.upload_faults else None
                    if fault is not None and fault.kind in ("429", "500", "503"):
                        return self._error(int(fault.kind), "UNAVAILABLE", f"injected {fault.kind}")
                    mime = self.headers.get("x-goog-upload-header-content-type", "")
                    if mime not in MIMES:
                        return self._error(400, "INVALID_ARGUMENT", f"unsupported MIME type {mime}")
                    with fake._lock:
                        name = f"files/f{len(fake.files)}"
                        fake.files[name] = {"data": b"", "mime": mime, "state": "UPLOADING", "polls": 1}
                    return self._send(200, {}, {"x-goog-upload-url": f"{fake.url}/upload/v1beta/files?upload_id={name[6:]}",
                                                "x-goog-upload-status": "active"})
                upload_id = self.path.split("upload_id=")[-1]
                name = f"files/{upload_id}"
                with fake._lock:
                    if name not in fake.files:
                        return self._error(404, "NOT_FOUND", f"no upload {upload_id}")
                    f = fake.files[name]
                    f["data"] += body
                    if "finalize" not in command:
                        return self._send(200, {}, {"x-goog-upload-status": "active"})
                    if f["mime"].startswith("video/"):
                        f["state"] = "PROCESSING"
                    else:
                        f["state"] = "FAILED" if fake.poison.encode() in f["data"] else "ACTIVE"
                    return self._send(200, {"file": self._file_json(name)}, {"x-goog-upload-status": "final"})

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if UPLOAD.match(self.path.split("?")[0]):
                    return self._upload(body)
                m = PATH.match(self.path.split("?")[0])
                if not m:
                    return self._error(404, "NOT_FOUND", f"no route {self.path}")
                if self.headers.get("x-goog-api-key") != fake.api_key:
                    return self._error(403, "PERMISSION_DENIED", "API key not valid")
                try:
                    payload = json.loads(body)
                    reqs = payload["requests"]
                except (ValueError, KeyError, TypeError):
                    return self._error(400, "INVALID_ARGUMENT", "body is not a batchEmbedContents request")
                if fake.delay_s:
                    time.sleep(fake.delay_s)
                with fake._lock:
                    fake.requests.append({"n": len(reqs), "t": time.time(), "model": m.group(2), "bytes": len(body)})
                    fault = fake.faults.pop(0) if fake.faults else None
                if fault is not None:
                    if fault.kind in ("429", "500", "503"):
                        headers = {"retry-after": str(fault.retry_after)} if fault.retry_after is not None else None
                        status = {"429": "RESOURCE_EXHAUSTED", "500": "INTERNAL", "503": "UNAVAILABLE"}[fault.kind]
                        return self._error(int(fault.kind), status, f"injected {fault.kind}", headers)
                    if fault.kind == "slow":
                        time.sleep(fault.delay_s)
                    if fault.kind == "malformed":
                        return self._send(200, b'{"embeddings": [{"values": [0.1, ')
                if len(reqs) > 100:
                    return self._error(400, "INVALID_ARGUMENT", f"at most 100 requests per batch, got {len(reqs)}")
                out = []
                for k, r in enumerate(reqs):
                    dim = r.get("outputDimensionality", r.get("output_dimensionality", FULL_DIM))
                    if not isinstance(dim, int) or not 128 <= dim <= FULL_DIM:
                        return self._error(400, "INVALID_ARGUMENT", f"requests[{k}]: outputDimensionality {dim} not in 128..3072")
                    parts = (r.get("content") or {}).get("parts") or []
                    if not parts:
                        return self._error(400, "INVALID_ARGUMENT", f"requests[{k}]: content has no parts")
                    vec = np.zeros(FULL_DIM)
                    for p in parts:
                        if "text" in p:
                            if fake.poison in p["text"]:
                                return self._error(400, "INVALID_ARGUMENT", f"requests[{k}]: unsupported content")
                            vec += part_vector("text", p["text"].encode())
                            continue
                        ref = p.get("file_data") or p.get("fileData")
                        if ref:
                            uri = ref.get("file_uri") or ref.get("fileUri") or ""
                            name = "files/" + uri.rsplit("/files/", 1)[-1]
                            f = fake.files.get(name)
                            if f is None:
                                return self._error(400, "INVALID_ARGUMENT", f"requests[{k}]: file {uri} does not exist")
                            if f["state"] != "ACTIVE":
                                return self._error(400, "FAILED_PRECONDITION", f"requests[{k}]: file {name} is {f['state']}, not ACTIVE")
                            vec += part_vector(f["mime"], f["data"])
                            continue
                        blob = p.get("inline_data") or p.get("inlineData")
                        if not blob:
                            return self._error(400, "INVALID_ARGUMENT", f"requests[{k}]: part without text or inline_data")
                        mime = blob.get("mime_type") or blob.get("mimeType")
                        if mime not in MIMES:
                            return self._error(400, "INVALID_ARGUMENT", f"requests[{k}]: unsupported MIME type {mime}")
                        try:  # proto3 JSON bytes: standard or URL-safe base64, padded or not
                            raw = str(blob.get("data", "")).replace("-", "+").replace("_", "/")
                            data = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
                        except (binascii.Error, ValueError):
                            return self._error(400, "INVALID_ARGUMENT", f"requests[{k}]: inline data is not base64")
                        vec += part_vector(mime, data)
                    vec = vec[:dim] / np.linalg.norm(vec[:dim])
                    out.append({"values": vec.round(6).tolist()})
                if fault is not None and fault.kind == "short":
                    out = out[:-1]
                if fault is not None and fault.kind == "nan":
                    return self._send(200, json.dumps({"embeddings": [{"values": ["NaN"] * len(o["values"])} for o in out]}).encode())
                return self._send(200, {"embeddings": out})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def expected(self, texts_and_media: list[tuple[str, bytes]], dim: int) -> np.ndarray:
        """The vector this server returns for one content with these (kind or MIME, bytes) parts."""
        vec = sum(part_vector(k, d) for k, d in texts_and_media)
        return vec[:dim] / np.linalg.norm(vec[:dim])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
