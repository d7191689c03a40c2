"""One greedy completion through a test client, with the adapter version its response header names."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient


def complete(
    client: TestClient, model: str, prompt: str, max_tokens: int, stream: bool
) -> tuple[int, str | None, str]:
    """(status, the version's first 12 hex digits or None for the base model, the text or the error body).
    A stream that carries an error event counts as status 500."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    r = client.post("/v1/completions", json=body)
    if r.status_code != 200:
        return r.status_code, None, r.text
    header = r.headers.get("x-loraplex-adapter")
    version = header.split("@")[1] if header else None
    if not stream:
        return 200, version, r.json()["choices"][0]["text"]
    text = ""
    for line in r.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return 500, version, json.dumps(chunk)
            text += "".join(c["text"] for c in chunk["choices"])
    return 200, version, text
