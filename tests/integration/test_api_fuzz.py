"""A property-based fuzz of every public route on a tiny model.

Hostile bodies, paths, headers and content types must never get a 5xx (other
than 503 with ``Retry-After``, or 504 when the request set a ``timeout``), an
error body outside OpenAI's shape, a malformed 2xx, or a hang; afterwards the
server serves a known adapter exactly as before and holds nothing. A second
server with API keys gets the inference routes with every kind of credential:
401 without a valid key, 403 for an adapter outside the key's globs (whether
or not it exists), else the same contract. Examples are derandomized: the same
calls on every run.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from server.adapters.commands import TakeSnapshot
from server.api.admin_schemas import AdapterInfo, AdapterList, UploadResult
from server.api.app import create_app
from server.api.tokenize_schemas import DetokenizeResponse, TokenizeResponse
from server.config import AdminConfig, AuthConfig, HttpConfig
from server.version import package_version
from tests.helpers import engine as eng
from tests.helpers.tiny import AdapterSpec, make_adapter, make_model, make_tokenizer
from tests.helpers.tiny_server import CHAT_TEMPLATE
from tests.helpers.uploads import folder_members, tar_gz, zip_bytes

KEEPER = "keeper"  # the adapter the final check needs: no fuzzed request may delete, evict or replace it
PAWNS = ("pawn-0", "pawn-1", "pawn-2")
PROMPT = "the quick brown fox"
HANG_S = 30.0  # a request not answered within this is a hang (admin waits are 5 s, adapter waits 2 s)
MAX_UPLOAD = 256 << 10
MAX_REQUEST = 64 << 10
BASE = "tiny"


@dataclass
class World:
    client: TestClient
    app: object
    baseline: str
    vocab: int
    src: Path  # the one directory /v1/load_lora_adapter may read
    blobs: dict[str, bytes]


def _complete_keeper(client: TestClient):
    return client.post("/v1/completions", json={"model": KEEPER, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})


def _stored_adapters(base, store: Path) -> Path:
    """The keeper, the pawns, and bad-shape, in ``store``."""
    make_adapter(base, AdapterSpec(KEEPER, 8, 16, ("q_proj", "v_proj", "down_proj")), store, seed=1)
    for i, name in enumerate(PAWNS):
        make_adapter(base, AdapterSpec(name, 4, 8, (("q_proj",), ("k_proj", "up_proj"), ("o_proj",))[i]), store, i + 2)
    bad = store / "bad-shape"  # stored by hand with a wrong shape: every use must be a 400
    shutil.copytree(store / "pawn-0", bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key][:, :10].contiguous()
    save_file(tensors, bad / "adapter_model.safetensors")
    return store


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    base = make_model("llama", len(tok), seed=5)
    store = _stored_adapters(base, tmp_path_factory.mktemp("store"))

    src = tmp_path_factory.mktemp("allowed")
    good = make_adapter(base, AdapterSpec("pawn-src", 4, 8, ("v_proj",)), src, seed=7)
    big = make_adapter(base, AdapterSpec("rank-32", 32, 32, ("q_proj",)), src, seed=8)  # the server allows 16
    (src / "not-a-dir.txt").write_text("x")
    os.symlink("/etc", src / "escape")
    linked = src / "linked"  # its weights are a link out of the allowed directory
    linked.mkdir()
    shutil.copy(good / "adapter_config.json", linked)
    os.symlink(store / KEEPER / "adapter_model.safetensors", linked / "adapter_model.safetensors")
    cfg, weights = (good / "adapter_config.json").read_bytes(), (good / "adapter_model.safetensors").read_bytes()
    members = folder_members(good)
    blobs = {
        "config": cfg,
        "weights": weights,
        "big-config": (big / "adapter_config.json").read_bytes(),
        "big-weights": (big / "adapter_model.safetensors").read_bytes(),
        "tar": tar_gz(members),
        "tar-nested": tar_gz({"inner/" + k: v for k, v in members.items()}),
        "tar-traversal": tar_gz({"../" + k: v for k, v in members.items()}),
        "tar-link": tar_gz({"adapter_config.json": cfg}, links={"adapter_model.safetensors": "/etc/passwd"}),
        "tar-truncated": tar_gz(members)[:200],
        "zip": zip_bytes(members),
        "zip-traversal": zip_bytes({"/abs/" + k: v for k, v in members.items()}),
        "config-junk": b'{"peft_type": "LORA", "r": -1, "target_modules": 7, "lora_alpha": "x"}',
        "config-nan": cfg.replace(b'"r": 4', b'"r": NaN'),
        "weights-truncated": weights[: len(weights) // 2],
        "weights-bad-header": (10**12).to_bytes(8, "little") + b"{}",
        "empty": b"",
        "garbage": bytes(range(256)) * 4,
        "over-upload-limit": b"\0" * (MAX_UPLOAD + 1),
    }

    cache = tmp_path_factory.mktemp("cache")
    admin = AdminConfig(max_upload_bytes=MAX_UPLOAD, allowed_lora_dirs=(src,), operation_timeout=5.0)
    http = HttpConfig(max_request_bytes=MAX_REQUEST)
    app = create_app(
        lambda: eng.build(base, tok, store, cache, kv_tokens=2048, adapter_wait_timeout=2.0, admin=admin, http=http)
    )
    with TestClient(app, raise_server_exceptions=False, follow_redirects=False) as client:
        r = _complete_keeper(client)
        assert r.status_code == 200, r.text
        yield World(client, app, r.json()["choices"][0]["text"], len(tok), src, blobs)


# -- calls -------------------------------------------------------------------------------------------------------------


@dataclass
class Call:
    route: tuple[str, str]  # (method, OpenAPI path) of the route this call fuzzes
    method: str
    url: str
    content: bytes | None = None
    headers: dict[str, str | bytes] = field(default_factory=dict)  # bytes: a value that is not ASCII
    body: object = None  # the JSON value ``content`` encodes, when it is one

    @property
    def timeout_sent(self) -> bool:
        return isinstance(self.body, dict) and self.body.get("timeout") is not None

    def __repr__(self) -> str:
        content = self.content if self.content is None or len(self.content) <= 400 else self.content[:400] + b"..."
        url = self.url if len(self.url) <= 300 else self.url[:300] + "..."
        return f"Call({self.method} {url!r}, headers={self.headers!r}, content={content!r})"


def _json_bytes(value: object) -> bytes:
    # ASCII-escaped, so lone surrogates travel as \ud800 escapes; NaN and Infinity as Python's json writes them.
    return json.dumps(value, ensure_ascii=True, allow_nan=True).encode()


# -- value strategies --------------------------------------------------------------------------------------------------

DROP = object()  # a mutation that removes the field


def rarely(hostile: st.SearchStrategy, usual: st.SearchStrategy) -> st.SearchStrategy:
    """``usual`` three draws in four, ``hostile`` the fourth."""
    return st.one_of(usual, usual, usual, hostile)


def odd(h: bool, hostile: st.SearchStrategy, usual: st.SearchStrategy) -> st.SearchStrategy:
    """In hostile bodies (``h``), ``hostile`` now and then; in plausible ones, always ``usual``."""
    return rarely(hostile, usual) if h else usual


short_text = st.text(max_size=12)
hostile_text = st.one_of(
    short_text,
    st.sampled_from(["", " ", "\0", "\ud800", "a\udfffb", "\u202e", "\U0001f999" * 5, "{{ 7*7 }}", "<|user|>", "\\"]),
    st.integers(300, 60_000).map(lambda n: "ab " * (n // 3)),  # past the context, and past the body limit
)
# Valid JSON strings: mostly words the tokenizer knows, now and then any code points, lone surrogates too
# (st.text would drop those from its alphabet).
any_text = st.one_of(
    st.lists(st.characters() | st.characters(categories=["Cs"]), min_size=1, max_size=20).map("".join),
    st.text(min_size=1, max_size=20),
)
plain_text = rarely(any_text, st.text(st.sampled_from("the quick brown fox jumps "), min_size=1, max_size=30))
big_ints = st.one_of(
    st.integers(-(2**80), 2**80), st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30])
)
numberish = st.one_of(
    big_ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["1", "-1", "1e309", "NaN", "Infinity", "0x10", "", "1_000"]),
)
junk = st.recursive(
    st.one_of(st.none(), st.booleans(), numberish, hostile_text),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(short_text, inner, max_size=3),
    max_leaves=8,
)


def mutated(base: st.SearchStrategy[dict], keys: list[str]) -> st.SearchStrategy[object]:
    """``base`` with a field or two dropped, replaced by junk, or added; now and then plain junk instead."""
    edit = st.tuples(st.sampled_from([*keys, "unknown_field", "\u00fcnknown"]), st.just(DROP) | junk)

    def apply(pair: tuple[dict, list]) -> dict:
        body, edits = pair
        body = dict(body)
        for key, value in edits:
            if value is DROP:
                body.pop(key, None)
            else:
                body[key] = value
        return body

    return rarely(junk, st.tuples(base, st.lists(edit, max_size=2)).map(apply))


CONTENT_TYPES = [
    "application/json",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/json; charset=latin-1",
    "",
]
raw_bytes = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [b"", b"{", b"null", b"[]", b"42", b'"x"', b'{"prompt": "x"', b"\xff\xfe{}", b'{"a":1}{"b":2}', b"NaN",
         b'{"prompt": "x", "prompt": 1}', b"[" * 5000, b'{"model": "\\ud800\\udc00\\ud800"}']
    ),
)
junk_headers = rarely(
    st.fixed_dictionaries({"content-length": st.sampled_from(["abc", "-1", "1e3", "99999999999999999999", "0"])}),
    st.fixed_dictionaries(
        {},
        optional={
            "authorization": st.sampled_from(["Bearer", "Bearer x", "Basic abc", "", "bearer " + "k" * 500]),
            "x-api-key": st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
            "accept": st.sampled_from(["text/event-stream", "application/xml", "*/*"]),
        },
    ),
)
headers = rarely(junk_headers, st.just({}))


def json_call(route: tuple[str, str], bodies: st.SearchStrategy, heads: st.SearchStrategy = st.just({})):
    def build(body: object, heads: dict) -> Call:
        return Call(route, route[0], route[1], _json_bytes(body), {"content-type": "application/json", **heads}, body)

    return st.builds(build, bodies, heads)


def json_calls(route: tuple[str, str], plausible: st.SearchStrategy, hostile: st.SearchStrategy):
    """Half plausible JSON bodies; the rest hostile ones (with odd headers), and now and then raw bytes."""
    method, url = route
    raw = st.builds(
        lambda c, ct, h: Call(route, method, url, c, ({"content-type": ct} if ct else {}) | h),
        raw_bytes, st.sampled_from(CONTENT_TYPES), headers,
    )
    return st.one_of(json_call(route, plausible), rarely(raw, json_call(route, hostile, headers)))


# -- generation bodies -------------------------------------------------------------------------------------------------

MODELS = [KEEPER, *PAWNS, "bad-shape", "", BASE, f"{BASE}:{KEEPER}", f"{BASE}:pawn-1", "ghost", f"{BASE}:", ":"]
TERM_NAMES = st.sampled_from([KEEPER, *PAWNS, "bad-shape", "ghost"])


def some_text(h: bool) -> st.SearchStrategy[str]:
    return odd(h, hostile_text, plain_text)


def generation_fields(h: bool) -> dict[str, st.SearchStrategy]:
    terms = st.lists(
        st.fixed_dictionaries(
            {"name": odd(h, hostile_text, TERM_NAMES)}, optional={"weight": odd(h, numberish, st.floats(-2, 2))}
        ),
        min_size=1,
        max_size=3,
    )
    return {
        "model": odd(h, hostile_text, st.sampled_from(MODELS)),
        "adapters": odd(h, st.lists(st.fixed_dictionaries({"name": TERM_NAMES}), min_size=7, max_size=9), terms),
        "temperature": st.sampled_from([0, 0.0, 0.7, 2.0]) | st.floats(0, 2),
        "top_p": st.floats(0.01, 1.0),
        "top_k": st.integers(-1, 400),
        "seed": odd(h, big_ints, st.integers(0, 2**63 - 1)),
        "stop": odd(h, st.lists(hostile_text, max_size=17), some_text(h) | st.lists(some_text(h), max_size=3)),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "n": st.just(1),
        "ignore_eos": st.booleans(),
        "user": some_text(h),
        # Too short for even the first output (504, or an error event when streaming), or long enough for all.
        "timeout": rarely(st.sampled_from([1e-9, 1e-6]), st.floats(10, 100)),
    }


def completion_bodies(vocab: int, h: bool) -> st.SearchStrategy[object]:
    ids = st.lists(st.integers(0, vocab - 1), min_size=1, max_size=20)
    odd_ids = st.lists(st.integers(0, vocab - 1) | st.integers(-3, vocab + 3) | big_ints, max_size=20)
    prompt = odd(
        h,
        st.one_of(
            odd_ids,
            st.lists(odd_ids, max_size=4),
            st.integers(30, 34).map(lambda n: ["x"] * n),  # about MAX_PROMPTS
            st.lists(st.one_of(st.integers(0, 9), short_text), min_size=2, max_size=3),
        ),
        st.one_of(
            some_text(h), ids, st.lists(some_text(h), min_size=1, max_size=4), st.lists(ids, min_size=1, max_size=3)
        ),
    )
    fields = {**generation_fields(h), "echo": st.just(False), "logprobs": st.none(), "suffix": st.none()}
    required = {"prompt": prompt, "max_tokens": st.integers(1, 6), "stream": st.booleans()}
    body = st.fixed_dictionaries(required, optional=fields)
    return mutated(body, [*required, *fields]) if h else body


ROLES = ["system", "developer", "user", "assistant"]


def chat_bodies(h: bool) -> st.SearchStrategy[object]:
    text_part = st.fixed_dictionaries({"type": st.just("text"), "text": some_text(h)})
    odd_part = st.fixed_dictionaries(
        {"type": st.sampled_from(["image_url", "", "TEXT"]) | junk}, optional={"text": junk, "image_url": junk}
    )
    message = st.fixed_dictionaries(
        {
            "role": odd(h, st.sampled_from(["tool", "", "USER"]) | junk, st.sampled_from(ROLES)),
            "content": odd(
                h,
                junk | st.lists(odd_part | text_part, max_size=3),
                some_text(h) | st.none() | st.lists(text_part, max_size=3),
            ),
        },
        optional={"name": odd(h, st.text(max_size=300), plain_text)},
    )
    messages = odd(
        h,
        st.just([]) | st.just([{"role": "user", "content": "x"}] * 513),  # about MAX_MESSAGES
        st.lists(message, min_size=1, max_size=4),
    )
    fields = {
        **generation_fields(h),
        "max_completion_tokens": st.integers(1, 6),
        "logprobs": odd(h, st.just(True), st.sampled_from([False, None])),
        "tools": odd(h, st.lists(st.dictionaries(short_text, junk, max_size=2), max_size=2), st.just([])),
        "add_generation_prompt": st.booleans(),
        "continue_final_message": st.booleans(),
    }
    required = {"messages": messages, "max_tokens": st.integers(1, 6), "stream": st.booleans()}
    body = st.fixed_dictionaries(required, optional=fields)
    return mutated(body, [*required, *fields]) if h else body


def tokenize_bodies(h: bool) -> st.SearchStrategy[object]:
    """vLLM's two forms: a prompt, or messages (the chat bodies' own, less what tokenizing does not take)."""
    keys = ("model", "messages", "add_generation_prompt", "continue_final_message")
    chat = st.tuples(
        chat_bodies(h).map(lambda b: {k: v for k, v in b.items() if k in keys} if isinstance(b, dict) else b),
        st.fixed_dictionaries({}, optional={"return_token_strs": st.booleans(),
                                            "add_special_tokens": odd(h, st.booleans(), st.just(False))}),
    ).map(lambda pair: pair[0] | pair[1] if isinstance(pair[0], dict) else pair[0])
    prompt = st.fixed_dictionaries(
        {"prompt": some_text(h)},
        optional={"model": odd(h, hostile_text, st.sampled_from(MODELS)), "add_special_tokens": st.booleans(),
                  "return_token_strs": st.booleans()},
    )
    if h:  # the chat bodies are already mutated
        prompt = mutated(prompt, ["model", "prompt", "messages", "add_special_tokens", "return_token_strs"])
    return prompt | chat


def detokenize_bodies(vocab: int, h: bool) -> st.SearchStrategy[object]:
    tokens = odd(h, st.lists(st.integers(-3, vocab + 3) | big_ints, max_size=20),
                 st.lists(st.integers(0, vocab - 1), max_size=20))
    body = st.fixed_dictionaries({"tokens": tokens}, optional={"model": odd(h, hostile_text, st.sampled_from(MODELS))})
    return mutated(body, ["tokens", "model"]) if h else body


# Every public route, and how many calls fuzz it.
ROUTES = {
    ("GET", "/health"): 30,
    ("GET", "/ready"): 30,
    ("GET", "/version"): 20,
    ("GET", "/metrics"): 20,
    ("GET", "/v1/models"): 40,
    ("GET", "/v1/models/{name}"): 100,
    ("POST", "/tokenize"): 250,
    ("POST", "/detokenize"): 150,
    ("POST", "/v1/completions"): 600,
    ("POST", "/v1/chat/completions"): 500,
    ("GET", "/admin/adapters"): 40,
    ("POST", "/admin/adapters"): 250,
    ("GET", "/admin/adapters/{name}"): 100,
    ("DELETE", "/admin/adapters/{name}"): 100,
    ("POST", "/admin/adapters/{name}/load"): 150,
    ("POST", "/admin/adapters/{name}/unpin"): 80,
    ("POST", "/admin/adapters/{name}/evict"): 100,
    ("POST", "/v1/load_lora_adapter"): 200,
    ("POST", "/v1/unload_lora_adapter"): 120,
}


# -- admin strategies --------------------------------------------------------------------------------------------------

NAMES = [KEEPER, *PAWNS, "bad-shape", "ghost", BASE, "fresh-1", "fresh.2"]
PATH_TRICKS = ["..", ".", "%2e%2e", "../..", "a/b", "..%2F..%2Fetc", "%00", "a" * 129, "x" * 3000, "with space",
               "\u00fcn\u00efcode", ".hidden", "-", "%2F", "%252e%252e", "pawn-0%00", "pawn-0/", "pawn-0/load"]


def _spares_keeper(text: str) -> bool:
    """True when no decoding of ``text`` can name the keeper adapter."""
    for _ in range(3):
        if KEEPER in text.lower():
            return False
        text = unquote(text)
    return KEEPER not in text.lower()


def path_names(spare_keeper: bool) -> st.SearchStrategy[str]:
    """A URL path segment naming an adapter: quoted names, raw path tricks, long and unicode names."""
    names = st.sampled_from([n for n in NAMES if not (spare_keeper and n == KEEPER)])
    segment = st.one_of(
        names.map(lambda n: quote(n, safe="")),
        names.map(lambda n: quote(n, safe="")),
        st.sampled_from(PATH_TRICKS),
        st.text(max_size=20, min_size=1).map(lambda n: quote(n, safe="")),
        st.text(max_size=10, min_size=1).map(lambda n: quote(quote(n, safe=""), safe="")),
    )
    return segment.filter(_spares_keeper) if spare_keeper else segment


def adapter_names(spare_keeper: bool) -> st.SearchStrategy[object]:
    names = rarely(hostile_text, st.sampled_from([n for n in NAMES if not (spare_keeper and n == KEEPER)]))
    return names.filter(lambda n: _spares_keeper(n)) if spare_keeper else names


def _part(field_name: bytes, filename: bytes | None, data: bytes, ctype: bytes | None = None) -> bytes:
    disposition = b'form-data; name="' + field_name + b'"'
    if filename is not None:
        disposition += b'; filename="' + filename + b'"'
    head = b"Content-Disposition: " + disposition + b"\r\n" + (b"Content-Type: " + ctype + b"\r\n" if ctype else b"")
    return b"--BoUnDaRy\r\n" + head + b"\r\n" + data + b"\r\n"


def upload_calls(w: World) -> st.SearchStrategy[Call]:
    route = ("POST", "/admin/adapters")
    name = rarely(
        st.one_of(
            st.text(max_size=20).map(lambda s: s.encode("utf-8")),
            st.binary(max_size=20),
            st.sampled_from([b"", b"../x", b"a" * 200, b"\xff\xfe", b"name\r\nX: y", b'q"uote']),
        ),
        st.sampled_from([n for n in NAMES if n != KEEPER]).map(str.encode),
    ).filter(lambda b: KEEPER.encode() not in b.lower())
    filenames = st.sampled_from(
        [b"adapter_config.json", b"adapter_model.safetensors", b"adapter.tar.gz", b"adapter.zip", b"x.tgz",
         b"../../adapter_config.json", b"adapter_model.bin", b"", b"f" * 300, b"\xff.json", b"a/b/adapter_config.json"]
    )
    file_part = st.builds(
        _part,
        st.sampled_from([b"files", b"files", b"file", b"name"]),
        filenames | st.none(),
        st.sampled_from(sorted(w.blobs)).map(w.blobs.__getitem__),
        st.sampled_from([None, b"application/octet-stream", b"application/json", b"\xff"]),
    )
    folder = [_part(b"files", b"adapter_config.json", w.blobs["config"]),
              _part(b"files", b"adapter_model.safetensors", w.blobs["weights"])]
    archives = [[_part(b"files", b"a.tar.gz", w.blobs["tar"])], [_part(b"files", b"a.zip", w.blobs["zip"])]]
    too_many = st.lists(file_part, min_size=17, max_size=18)
    files = rarely(st.lists(file_part, max_size=4) | too_many, st.just(folder) | st.sampled_from(archives))

    def build(name_value, has_name, parts, close, cut, query, ctype, headers) -> Call:
        body = b"".join(([_part(b"name", None, name_value)] if has_name else []) + parts)
        body += b"--BoUnDaRy--\r\n" if close else b""
        body = body[:cut] if cut is not None else body
        url = "/admin/adapters" + (f"?dry_run={quote(query)}" if query is not None else "")
        return Call(route, "POST", url, body, {"content-type": ctype} | headers)

    odd_types = st.sampled_from(
        [*CONTENT_TYPES[:3], "multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; boundary=x",
         "multipart/form-data; boundary=BoUnDaRy; charset=utf-16", "multipart/mixed; boundary=BoUnDaRy"]
    )
    return st.builds(
        build,
        name,
        rarely(st.just(False), st.just(True)),
        files,
        rarely(st.just(False), st.just(True)),
        rarely(st.integers(0, 400), st.none()),
        st.none() | st.sampled_from(["true", "false", "1", "0", "maybe", "", "TRUE", "true&dry_run=false"]),
        rarely(odd_types, st.just("multipart/form-data; boundary=BoUnDaRy")),
        headers.map(lambda h: {k: v for k, v in h.items() if k != "content-length"}),
    )


def load_bodies() -> st.SearchStrategy[object]:
    pin = st.fixed_dictionaries({"pin": st.booleans()})
    return rarely(mutated(pin, ["pin"]), st.none() | pin)


def name_route_calls(route: tuple[str, str], spare_keeper: bool, bodies: st.SearchStrategy | None = None):
    method, path = route

    def build(segment: str, body: object, send: bool, headers: dict) -> Call:
        url = path.replace("{name}", segment)
        if not send:
            return Call(route, method, url, None, headers)
        return Call(route, method, url, _json_bytes(body), {"content-type": "application/json"} | headers, body)

    if bodies is None:
        bodies, sends = st.none(), st.just(False)
    else:
        sends = st.booleans()
    return st.builds(build, path_names(spare_keeper), bodies, sends, headers)


def lora_load_calls(w: World) -> st.SearchStrategy[Call]:
    src = str(w.src)
    paths = st.sampled_from(
        [f"{src}/pawn-src", f"{src}/pawn-src", f"{src}/rank-32", src, f"{src}/missing", f"{src}/not-a-dir.txt",
         f"{src}/escape", f"{src}/linked", f"{src}/pawn-src/../..", f"{src}/../{Path(src).name}/pawn-src", "/etc",
         "relative/dir", "", "\0", f"{src}/\0", "~", "/", f"{src}/" + "a" * 300, f"{src}/" + "a/" * 2100,
         f"{src}/\ud800"]
    )
    body = st.fixed_dictionaries(
        {"lora_name": adapter_names(spare_keeper=True), "lora_path": paths}, optional={"load_inplace": st.booleans()}
    )
    hostile = mutated(body, ["lora_name", "lora_path", "load_inplace"]).filter(_body_spares_keeper)
    return json_calls(("POST", "/v1/load_lora_adapter"), body, hostile)


def unload_calls() -> st.SearchStrategy[Call]:
    body = st.fixed_dictionaries({"lora_name": adapter_names(spare_keeper=True)}, optional={"lora_int_id": big_ints})
    hostile = mutated(body, ["lora_name", "lora_int_id"]).filter(_body_spares_keeper)
    return json_calls(("POST", "/v1/unload_lora_adapter"), body, hostile)


def _body_spares_keeper(body: object) -> bool:
    """A mutation may put any junk under ``lora_name``: keep only bodies where it cannot be the keeper."""
    return not isinstance(body, dict) or not isinstance(body.get("lora_name"), str) or _spares_keeper(body["lora_name"])


def get_calls(route: tuple[str, str]) -> st.SearchStrategy[Call]:
    query = st.dictionaries(short_text, short_text, max_size=3)

    def build(q: dict, content: bytes | None, headers: dict) -> Call:
        url = route[1] + ("?" + "&".join(f"{quote(k)}={quote(v)}" for k, v in q.items()) if q else "")
        return Call(route, "GET", url, content, headers)

    return st.builds(build, query, st.none() | raw_bytes, headers)


def operations(w: World) -> dict[tuple[str, str], tuple[st.SearchStrategy[Call], int]]:
    """Every public route: the calls that fuzz it, and how many."""
    completions = ("POST", "/v1/completions")
    chat = ("POST", "/v1/chat/completions")
    name_routes = {  # spare the keeper?, bodies
        ("GET", "/v1/models/{name}"): (False, None),
        ("GET", "/admin/adapters/{name}"): (False, None),
        ("DELETE", "/admin/adapters/{name}"): (True, None),
        ("POST", "/admin/adapters/{name}/load"): (False, load_bodies()),
        ("POST", "/admin/adapters/{name}/unpin"): (False, None),
        ("POST", "/admin/adapters/{name}/evict"): (True, None),
    }
    strategies = {
        **{route: get_calls(route) for route in ROUTES if route[0] == "GET" and "{name}" not in route[1]},
        completions: json_calls(completions, completion_bodies(w.vocab, False), completion_bodies(w.vocab, True)),
        chat: json_calls(chat, chat_bodies(False), chat_bodies(True)),
        ("POST", "/tokenize"): json_calls(("POST", "/tokenize"), tokenize_bodies(False), tokenize_bodies(True)),
        ("POST", "/detokenize"): json_calls(
            ("POST", "/detokenize"), detokenize_bodies(w.vocab, False), detokenize_bodies(w.vocab, True)
        ),
        ("POST", "/admin/adapters"): upload_calls(w),
        **{route: name_route_calls(route, *how) for route, how in name_routes.items()},
        ("POST", "/v1/load_lora_adapter"): lora_load_calls(w),
        ("POST", "/v1/unload_lora_adapter"): unload_calls(),
    }
    return {route: (strategy, ROUTES[route]) for route, strategy in strategies.items()}


# -- properties --------------------------------------------------------------------------------------------------------


def send(client: TestClient, call: Call):
    """Send on a helper thread so a hang fails the test instead of stalling it."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["response"] = client.request(call.method, call.url, content=call.content, headers=call.headers)
        except BaseException as exc:  # reported below with the call
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_S)
    assert not thread.is_alive(), f"no answer within {HANG_S:g} s (a hang): {call!r}"
    if "error" in box:
        raise AssertionError(f"the client failed on {call!r}") from box["error"]  # type: ignore[misc]
    return box["response"]


def check_error_body(body: object, where: str) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, f"error body not in OpenAI's shape: {where}"
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, where
    assert isinstance(error["message"], str) and error["message"], where
    assert isinstance(error["type"], str) and error["type"], where
    assert error["param"] is None or isinstance(error["param"], str), where
    assert error["code"] is None or isinstance(error["code"], str), where


def check_usage(usage: object, where: str) -> None:
    assert isinstance(usage, dict), where
    assert all(isinstance(usage[k], int) and usage[k] >= 0 for k in ("prompt_tokens", "completion_tokens")), where
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], where


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def expected_choices(body: object) -> int | None:
    """One choice per prompt, when the prompt has the clean shape we generate (junk may be coerced otherwise)."""
    prompt = body.get("prompt") if isinstance(body, dict) else None
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)):
        return 1
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return len(prompt)
    if isinstance(prompt, list) and all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt):
        return len(prompt)
    return None


def token_limit(call: Call) -> int | None:
    """The ``max_tokens`` the server applies, when the body states it plainly."""
    sent = call.body if isinstance(call.body, dict) else {}
    if call.route[1] == "/v1/chat/completions" and sent.get("max_completion_tokens") is not None:
        limit = sent["max_completion_tokens"]
    else:
        limit = sent.get("max_tokens")
    return limit if _is_int(limit) else None


def check_completion(call: Call, body: dict, where: str) -> None:
    chat = call.route[1] == "/v1/chat/completions"
    assert body["object"] == ("chat.completion" if chat else "text_completion"), where
    assert isinstance(body["id"], str) and isinstance(body["created"], int) and isinstance(body["model"], str), where
    choices = body["choices"]
    assert isinstance(choices, list) and choices, where
    for i, choice in enumerate(choices):
        assert choice["index"] == i and choice["finish_reason"] in ("stop", "length"), where
        text = choice["message"]["content"] if chat else choice["text"]
        assert isinstance(text, str), where
        if chat:
            assert choice["message"]["role"] == "assistant", where
    check_usage(body["usage"], where)
    if not chat and expected_choices(call.body) is not None:
        assert len(choices) == expected_choices(call.body), where
    if token_limit(call) is not None:
        assert body["usage"]["completion_tokens"] <= token_limit(call) * len(choices), where


def check_stream(call: Call, text: str, where: str) -> None:
    lines = [line for line in text.split("\n") if line]
    assert lines and all(line.startswith("data: ") for line in lines), f"not SSE data lines: {where}"
    data = [line[len("data: "):] for line in lines]
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1, f"the stream does not end with [DONE]: {where}"
    kind = "chat.completion.chunk" if call.route[1] == "/v1/chat/completions" else "text_completion"
    for item in data[:-1]:
        event = json.loads(item)
        if "error" in event:
            check_error_body(event, where)
            continue
        assert event["object"] == kind and isinstance(event["choices"], list), where
        if "usage" in event:
            check_usage(event["usage"], where)


def served_route(call: Call, r) -> tuple[str, str]:
    """The route the request reached: the client normalises dot segments, so it may not be the fuzzed one."""
    path = r.request.url.path.rstrip("/") or "/"
    for method, template in ROUTES:
        pattern = "^" + re.escape(template).replace(re.escape("{name}"), "[^/]+") + "$"
        if method == call.method and re.match(pattern, path):
            return method, template
    return call.route


def check_success(call: Call, r, where: str) -> None:
    method, path = served_route(call, r)
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        assert path in ("/v1/completions", "/v1/chat/completions"), where
        check_stream(call, r.text, where)
        return
    if path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        assert r.text.startswith("Success: "), where
        return
    if path == "/metrics":
        families = {f.name for f in text_string_to_metric_families(r.text)}
        assert "loraplex_requests" in families, where  # counters are named without _total by the parser
        return
    body = r.json()
    if path in ("/v1/completions", "/v1/chat/completions"):
        assert not (isinstance(call.body, dict) and call.body.get("stream") is True), f"stream asked, not sent: {where}"
        check_completion(call, body, where)
    elif path == "/health":
        assert body == {"status": "ok"}, where
    elif path == "/ready":
        assert body == {"status": "ready", "model": BASE}, where
    elif path == "/version":
        assert body == {"version": package_version()}, where
    elif path == "/v1/models/{name}":
        assert body["object"] == "model" and body["root"] == BASE, where
        assert body["parent"] == (None if body["id"] == BASE else BASE), where
    elif path == "/tokenize":
        TokenizeResponse.model_validate(body)
        assert body["count"] == len(body["tokens"]) and body["max_model_len"] > 0, where
        assert body["token_strs"] is None or len(body["token_strs"]) == body["count"], where
    elif path == "/detokenize":
        DetokenizeResponse.model_validate(body)
    elif path == "/v1/models":
        assert body["object"] == "list" and body["data"][0]["id"] == BASE, where
        assert all(card["parent"] == BASE for card in body["data"][1:]), where
    elif (method, path) == ("GET", "/admin/adapters"):
        AdapterList.model_validate(body)
    elif (method, path) == ("POST", "/admin/adapters"):
        assert r.status_code in (200, 201), where
        UploadResult.model_validate(body)
    elif method == "DELETE":
        assert body["deleted"] is True and body["object"] == "adapter" and body["id"] != KEEPER, where
    else:
        AdapterInfo.model_validate(body)


def check_response(call: Call, r) -> None:
    """No 5xx but 503 with Retry-After (or 504 after a ``timeout``); errors in OpenAI's shape; well-formed 2xx."""
    where = f"{call!r} -> {r.status_code} {r.text[:600]!r}"
    status = r.status_code
    if status >= 500:
        assert status in (503, 504), f"server error: {where}"
        if status == 503:
            assert "retry-after" in r.headers, f"503 without Retry-After: {where}"
        else:
            assert call.timeout_sent, f"504 without a timeout in the request: {where}"
    if status >= 400:
        try:
            body = r.json()
        except ValueError:
            raise AssertionError(f"error body is not JSON: {where}") from None
        check_error_body(body, where)
    elif 200 <= status < 300:
        check_success(call, r, where)
    else:
        assert status in (307, 308) and r.headers.get("location"), f"unexpected status: {where}"


FUZZ = settings(
    deadline=None,
    database=None,  # nothing written into the checkout
    derandomize=True,  # the same examples on every run: a CI failure is reproduced by running it again
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.large_base_example],
)


def test_every_route_in_the_schema_is_fuzzed(world):
    """A route added to the app without a strategy here fails this test."""
    schema = world.client.get("/openapi.json").json()
    routes = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
    assert {p for _, p in routes} == {p for _, p in ROUTES}
    assert routes == set(ROUTES) == set(operations(world))


@pytest.mark.parametrize("route", ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_fuzz_route(world, route):
    """Every response to hostile calls keeps the contract (see :func:`check_response`)."""
    strategy, examples = operations(world)[route]

    @settings(FUZZ, max_examples=examples)
    @given(call=strategy)
    def fuzz(call: Call) -> None:
        check_response(call, send(world.client, call))

    fuzz()


def test_fuzz_expired_timeouts(world):
    """Requests whose ``timeout`` passes before their first output: 504 (or a 200 if the output won the race)."""
    expired = {"timeout": 1e-6}
    calls = st.one_of(
        json_call(route, bodies.map(lambda b: b | expired))
        for route, bodies in (
            (("POST", "/v1/completions"), completion_bodies(world.vocab, False)),
            (("POST", "/v1/chat/completions"), chat_bodies(False)),
        )
    )

    @settings(FUZZ, max_examples=60)
    @given(call=calls)
    def fuzz(call: Call) -> None:
        check_response(call, send(world.client, call))

    fuzz()


def test_fuzz_wrong_methods_and_unknown_paths(world):
    """A wrong method is a 405 and an unknown path a 404, both in OpenAI's error shape."""
    methods = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
    allowed = {p: {m for m, q in ROUTES if q == p} for _, p in ROUTES}
    no_dot_segments = path_names(spare_keeper=True).filter(lambda seg: not {".", ".."} & set(unquote(seg).split("/")))

    @settings(FUZZ, max_examples=100)
    @given(path=st.sampled_from(sorted(allowed)), method=methods, segment=no_dot_segments,
           extra=st.text(max_size=10).map(lambda s: quote(s, safe="")))
    def fuzz(path: str, method: str, segment: str, extra: str) -> None:
        if method in allowed[path]:  # a wrong method on a real path, else a path nobody serves
            path = path + "/no-such-route/" + extra
        url = path.replace("{name}", segment)
        call = Call((method, path), method, url, b"{}", {"content-type": "application/json"})
        r = send(world.client, call)
        assert r.status_code in (404, 405, 307), f"{call!r} -> {r.status_code} {r.text[:300]!r}"
        check_response(call, r)

    fuzz()


def test_server_is_whole_after_fuzzing(world):
    """Runs last: the server still answers, the keeper adapter gives the same text, and nothing is held."""
    client = world.client
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 200
    r = _complete_keeper(client)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == world.baseline
    state = world.app.state.loraplex
    scheduler = state.serving.engine.scheduler
    deadline = time.monotonic() + 5.0
    while True:
        held = (len(scheduler.running), len(scheduler.waiting), scheduler.blocks.used_blocks, state.admission.in_flight)
        if held == (0, 0, 0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert held == (0, 0, 0, 0), f"(running, waiting, used KV blocks, admitted) still held after fuzzing: {held}"
    assert_nothing_leased(state)


def assert_nothing_leased(state, within: float = 5.0) -> None:
    """No request holds an adapter version, and the only adapter slots in use are the pins'."""
    engine = state.serving.engine

    deadline = time.monotonic() + within
    while True:
        snapshot = engine.send(TakeSnapshot()).result(30)
        held = {key: r.refs for key, r in snapshot.records.items() if r.refs}
        pins = sum(r.pinned for r in snapshot.records.values())
        running = dict(engine.call(engine.scheduler.busy_slots).result(30))
        if (not held and snapshot.slots_in_use == pins and not running) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not held, f"versions still held: {held}"
    assert snapshot.slots_in_use == pins and not running, (
        f"{snapshot.slots_in_use} slots in use for {pins} pins; running on them: {running}"
    )


# -- with API keys -----------------------------------------------------------------------------------------------------

KEY_ALL = "sk-fuzz-all-0001"  # every adapter
KEY_PAWNS = "sk-fuzz-pawns-01"  # only adapters matching PAWN_GLOB
PAWN_GLOB = "pawn-*"
WRONG_KEYS = [
    "sk-wrong-key-0001",
    KEY_ALL[:-1],  # prefixes of a real key
    KEY_PAWNS[:3],
    KEY_ALL + "1",
    KEY_ALL.upper(),
    "k" * 20_000,
    "sk-fuzz-\u00e4ll-0001",  # not ASCII: sent as UTF-8 bytes
    "\u043a\u043b\u044e\u0447-\U0001f511" * 3,
]
KEYED_ROUTES = {("POST", "/v1/completions"): 300, ("POST", "/v1/chat/completions"): 250, ("GET", "/v1/models"): 40,
                ("POST", "/tokenize"): 120, ("POST", "/detokenize"): 80}


@dataclass(frozen=True)
class Credential:
    headers: dict[str, str | bytes]
    key: str | None  # the valid key it carries, or None


def _header(value: str) -> str | bytes:
    return value if value.isascii() else value.encode("utf-8")


def credentials() -> st.SearchStrategy[Credential]:
    wrong = st.sampled_from(WRONG_KEYS)
    good = st.sampled_from([KEY_ALL, KEY_PAWNS])
    return st.one_of(
        st.just(Credential({}, None)),
        wrong.map(lambda k: Credential({"authorization": _header(f"Bearer {k}")}, None)),
        wrong.map(lambda k: Credential({"x-api-key": _header(k)}, None)),
        st.sampled_from(["Bearer", "Bearer ", "Basic " + KEY_ALL, KEY_ALL, "Token " + KEY_ALL, ""]).map(
            lambda v: Credential({"authorization": v}, None)  # no bearer token in it
        ),
        st.builds(
            lambda k, form: Credential({"authorization": form.format(k)}, k),
            good, st.sampled_from(["Bearer {}", "bearer {}", "BEARER  {} "]),
        ),
        good.map(lambda k: Credential({"x-api-key": k}, k)),
        good.map(lambda k: Credential({"authorization": "Basic abc", "x-api-key": k}, k)),
    )


def keyed_calls(route: tuple[str, str], vocab: int) -> st.SearchStrategy[tuple[Call, Credential]]:
    if route == ("POST", "/v1/completions"):
        calls = json_calls(route, completion_bodies(vocab, False), completion_bodies(vocab, True))
    elif route == ("POST", "/v1/chat/completions"):
        calls = json_calls(route, chat_bodies(False), chat_bodies(True))
    elif route == ("POST", "/tokenize"):
        calls = json_calls(route, tokenize_bodies(False), tokenize_bodies(True))
    elif route == ("POST", "/detokenize"):
        calls = json_calls(route, detokenize_bodies(vocab, False), detokenize_bodies(vocab, True))
    else:
        calls = get_calls(route)

    def with_credential(call: Call, cred: Credential) -> tuple[Call, Credential]:
        # The fuzzed headers' own credentials give way to this one; a broken Content-Length is the framing's
        # business (400 or 413 before any route), not the key's.
        kept = {k: v for k, v in call.headers.items() if k not in ("authorization", "x-api-key", "content-length")}
        return Call(call.route, call.method, call.url, call.content, kept | cred.headers, call.body), cred

    return st.builds(with_credential, calls, credentials())


def named_adapters(body: object) -> list[str]:
    """The adapter names a generation body asks for, where it says so plainly."""
    if not isinstance(body, dict):
        return []
    names = []
    model = body.get("model")
    if isinstance(model, str) and model.removeprefix(f"{BASE}:") not in ("", BASE):
        names.append(model.removeprefix(f"{BASE}:"))
    terms = body.get("adapters")
    if isinstance(terms, list):
        names += [t["name"] for t in terms if isinstance(t, dict) and isinstance(t.get("name"), str)]
    return names


def allowed(key: str, name: str) -> bool:
    return key == KEY_ALL or fnmatch.fnmatchcase(name, PAWN_GLOB)


def check_keyed(call: Call, cred: Credential, r) -> None:
    """401 without a valid key; 403 only for an adapter outside the key's globs; else the open server's contract."""
    where = f"{call!r} -> {r.status_code} {r.text[:600]!r}"
    if cred.key is None:
        assert r.status_code == 401, f"no valid key, not 401: {where}"
        check_error_body(r.json(), where)
        assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer", where
        return
    assert r.status_code != 401, f"a valid key refused: {where}"
    check_response(call, r)
    outside = [n for n in named_adapters(call.body) if not allowed(cred.key, n)]
    if r.status_code == 403:
        assert r.json()["error"]["code"] == "adapter_not_allowed" and cred.key != KEY_ALL, where
    elif r.status_code == 404:  # "does not exist" must not tell a key about adapters outside its globs
        assert not outside, f"404 for an adapter the key may not use (403 expected): {where}"
    elif 200 <= r.status_code < 300 and call.route[1] == "/v1/models":
        names = [card["id"] for card in r.json()["data"][1:]]
        assert all(allowed(cred.key, n) for n in names), where
    elif 200 <= r.status_code < 300 and call.route[1] in ("/tokenize", "/detokenize"):
        assert not outside, f"answered for an adapter outside the key's globs: {where}"
    elif 200 <= r.status_code < 300:
        served = [ref.rsplit("@", 1)[0] for ref in r.headers.get("x-loraplex-adapter", "").split(",") if ref]
        assert all(allowed(cred.key, n) for n in served), f"served an adapter outside the key's globs: {where}"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    base = make_model("llama", len(tok), seed=5)
    store = _stored_adapters(base, tmp_path_factory.mktemp("keyed-store"))
    auth = AuthConfig(api_keys={KEY_ALL: (), KEY_PAWNS: (PAWN_GLOB,)})
    cache = tmp_path_factory.mktemp("keyed-cache")
    app = create_app(lambda: eng.build(base, tok, store, cache, kv_tokens=2048, adapter_wait_timeout=2.0, auth=auth))
    with TestClient(app, raise_server_exceptions=False, follow_redirects=False) as client:
        yield client, app


def test_keys_decide_before_anything_else(keyed):
    """The rules the fuzz below checks, on plain examples."""
    client, _ = keyed

    def post(key: str | None, **body):
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, **body}, headers=headers)

    assert post(None, model=KEEPER).status_code == 401
    assert post(KEY_ALL, model=KEEPER).status_code == 200
    assert post(KEY_PAWNS, model="pawn-1").status_code == 200
    assert post(KEY_PAWNS, model="").status_code == 200  # the base model is open to every key
    for body in ({"model": KEEPER}, {"model": "ghost"}, {"adapters": [{"name": "pawn-0"}, {"name": "ghost"}]}):
        r = post(KEY_PAWNS, **body)
        assert r.status_code == 403 and r.json()["error"]["code"] == "adapter_not_allowed", (body, r.text)
    assert post(KEY_PAWNS, model="pawn-ghost").status_code == 404  # inside the globs: it may know
    assert post(KEY_ALL, model="ghost").status_code == 404


@pytest.mark.parametrize("route", KEYED_ROUTES, ids=[f"{m} {p}" for m, p in KEYED_ROUTES])
def test_fuzz_keyed_inference_routes(keyed, world, route):
    client, app = keyed

    @settings(FUZZ, max_examples=KEYED_ROUTES[route])
    @given(pair=keyed_calls(route, world.vocab))
    def fuzz(pair: tuple[Call, Credential]) -> None:
        call, cred = pair
        check_keyed(call, cred, send(client, call))

    fuzz()
    state = app.state.loraplex
    deadline = time.monotonic() + 5.0
    while state.admission.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.admission.in_flight == 0
    assert_nothing_leased(state)
