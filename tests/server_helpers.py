"""A live tokensteer server on 127.0.0.1 for tests: uvicorn in a thread on a free port."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import uvicorn


class LiveServer:
    """Serve ``app`` until ``stop``; ``url`` is its root, ``client()`` an openai client for it."""

    def __init__(self, app) -> None:
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        t = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t > 30 or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    @property
    def ctx(self):
        return self.app.state.ctx

    def client(self, api_key: str = "none", **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120, **kw)

    def post(self, path: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict | str]:
        """POST raw bytes (or a JSON object) and return the status and the parsed JSON body."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST", headers={"Content-Type": "application/json", **(headers or {})})
        return _send(req)

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict | str]:
        return _send(urllib.request.Request(self.url + path, headers=headers or {}))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _send(req) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, raw, ctype = r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, raw, ctype = e.code, e.read(), e.headers.get("content-type", "")
    text = raw.decode("utf-8")
    return status, json.loads(text) if "json" in ctype else text


def sse_frames(text: str) -> list[str]:
    """The data payloads of an SSE body, in order."""
    return [block[len("data: "):] for block in text.split("\n\n") if block.startswith("data: ")]


def fields_of(obj, model) -> list[str]:
    """Keys of a JSON response that the openai package's type ``model`` does not define (recursively);
    our own ``tokensteer`` extension is allowed anywhere."""
    import typing

    from pydantic import BaseModel

    extra = []

    def walk(value, ann, path):
        origin = typing.get_origin(ann)
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
            for a in args:
                if isinstance(value, dict) and isinstance(a, type) and issubclass(a, BaseModel):
                    return walk(value, a, path)
                if isinstance(value, list) and typing.get_origin(a) is list:
                    return walk(value, a, path)
            return None
        if origin is list and isinstance(value, list) and args:
            for i, v in enumerate(value):
                walk(v, args[0], f"{path}[{i}]")
        elif isinstance(ann, type) and issubclass(ann, BaseModel) and isinstance(value, dict):
            for k, v in value.items():
                if k == "tokensteer":
                    continue
                if k not in ann.model_fields:
                    extra.append(f"{path}.{k}")
                else:
                    walk(v, ann.model_fields[k].annotation, f"{path}.{k}")

    walk(obj, model, "$")
    return extra
