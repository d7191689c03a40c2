"""Request validation errors in the caller's terms: the answer to FastAPI's ``RequestValidationError``.

Paths are written as a caller writes them (``messages[0].content[1].type``),
never as pydantic's locations (``body.messages.0.ChatMessage.content.list[TextPart].0``).
Invalid requests are 400, as OpenAI answers them; a body that is not JSON at
all (a form, plain text) is 415. One problem is reported: an unknown field
first, else the first in the body's field order; where a union failed, from
the alternative the caller got furthest into (a list of text parts rather
than "not a string").
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

from pydantic import BaseModel

from server.api.unsupported import CONTENT, UNSUPPORTED

BAD_REQUEST, UNSUPPORTED_MEDIA_TYPE = 400, 415
_WHERE = {"query": "query parameter ", "path": "path parameter ", "header": "header ", "cookie": "cookie "}
_WRAPPED_TAG = re.compile(r"[a-z][a-z-]*\[.*\]")  # list[int], function-after[_encodable(), str], literal['a']
_NOT_AN_OBJECT = {"model_attributes_type", "model_type", "dict_type"}


class Problem(NamedTuple):
    """What to answer: the fields of OpenAI's error body and the status."""

    status: int
    message: str
    code: str
    param: str | None = None


_SCALARS = {  # pydantic's names of the alternatives of a union -> (one, several)
    "str": ("a string", "strings"), "constrained-str": ("a string", "strings"),
    "int": ("an integer", "integers"), "constrained-int": ("an integer", "integers"),
    "float": ("a number", "numbers"), "constrained-float": ("a number", "numbers"),
    "bool": ("a boolean", "booleans"), "none": ("null", "nulls"),
}


def request_error(errors: Sequence[dict], body: Any, content_type: str | None) -> Problem:
    """The one error to answer for pydantic's ``errors`` on ``body`` (as FastAPI read it)."""
    if not errors:
        return Problem(BAD_REQUEST, "the request is invalid", "invalid_request")
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        why = first.get("ctx", {}).get("error", "parse error")
        at = f" (at character {loc[1]})" if len(loc) > 1 and isinstance(loc[1], int) else ""
        return Problem(BAD_REQUEST, f"the body is not valid JSON: {why}{at}", "invalid_json")
    if loc == ("body",):
        whole = _whole_body_error(first, body, content_type)
        if whole is not None:
            return whole
    # An unknown field first, as OpenAI reports it: a misspelt name explains the "required" error beside it.
    return _field_error(_chosen(sorted(errors, key=lambda e: e.get("type") != "extra_forbidden")))


def _whole_body_error(error: dict, body: Any, content_type: str | None) -> Problem | None:
    if isinstance(body, (bytes, bytearray)):  # FastAPI parses JSON only under a JSON content type
        got = f"got {content_type!r}" if content_type else "the request has no Content-Type header"
        return Problem(
            UNSUPPORTED_MEDIA_TYPE,
            f"the body must be JSON sent with Content-Type: application/json ({got})",
            "unsupported_media_type",
        )
    if error.get("type") == "missing":
        return Problem(
            BAD_REQUEST, "the request body is empty: send a JSON object (Content-Type: application/json)",
            "missing_body",
        )
    if error.get("type") in _NOT_AN_OBJECT:
        return Problem(BAD_REQUEST, f"the request body must be a JSON object, got {_json_kind(body)}",
                        "invalid_request")
    return None


def _field_error(error: dict) -> Problem:
    kind, ctx = error.get("type"), error.get("ctx") or {}
    loc = tuple(error.get("loc", ()))
    keep_last = kind == "extra_forbidden"  # the caller's own key, whatever it looks like
    path = user_path(loc, keep_last) if "param" not in ctx else join_path(user_path(loc), str(ctx["param"]))
    if loc and loc[0] in _WHERE:  # not in the body: say where
        return Problem(BAD_REQUEST, f"{_WHERE[loc[0]]}{path}: {_reworded(str(error.get('msg')))}",
                       "invalid_request", path)
    if kind == "extra_forbidden":
        return Problem(BAD_REQUEST, f"Unrecognized request argument supplied: {path}", "unknown_parameter", path)
    if kind == UNSUPPORTED:
        return Problem(BAD_REQUEST, f"{path} is not supported by this server; {ctx['accepted']}",
                        "unsupported_parameter", path)
    if kind == CONTENT:
        return Problem(BAD_REQUEST, f"{path}: {error['msg']}", "unsupported_content", path)
    if kind == "missing":
        return Problem(BAD_REQUEST, f"{path} is required", "invalid_request", path)
    message = _reworded(str(error.get("msg", "is invalid")))
    if error.get("union") is not None:
        message = "must be " + _alternatives(error["union"])
    if kind != "value_error" and "param" not in ctx and "input" in error:
        message += f" (got {_shown(error['input'])})"
    return Problem(BAD_REQUEST, f"{path}: {message}" if path else message, "invalid_request", path or None)


def _chosen(errors: Sequence[dict]) -> dict:
    """The first error; where it is one alternative of a union, the first error of the alternative that fits best.

    Best: the one the caller got furthest into (a list of parts rather than
    "not a string"), then one whose kind the value had (text with a lone
    surrogate), then the one with fewest errors. When the value is of none of
    the alternatives' kinds, the result carries ``union``: their names.
    """
    chosen, pool, start = errors[0], list(errors), 1
    while (tag := _next_tag(chosen, start)) is not None:
        prefix = tuple(chosen["loc"])[:tag]
        by_alternative: dict[str, list[dict]] = {}
        for e in pool:
            if tuple(e["loc"])[:tag] == prefix and _next_tag(e, start) == tag:
                by_alternative.setdefault(e["loc"][tag], []).append(e)
        rivals = [e for group in by_alternative.values() for e in group]
        if all(len(e["loc"]) == tag + 1 and _wrong_kind(e) for e in rivals):
            return {**chosen, "loc": prefix, "union": list(by_alternative)}
        pool = max(by_alternative.values(), key=_fit)  # the first of equals: pydantic keeps the schema's order
        chosen, start = pool[0], tag + 1
    return chosen


def _fit(group: list[dict]) -> tuple[int, bool, int]:
    return max(len(e["loc"]) for e in group), not all(_wrong_kind(e) for e in group), -len(group)


def _next_tag(error: dict, start: int) -> int | None:
    """Where the first union alternative at or after ``start`` is named in the error's location."""
    loc = tuple(error.get("loc", ()))
    end = len(loc) - 1 if error.get("type") == "extra_forbidden" else len(loc)  # its last part is the caller's key
    return next((i for i in range(start, end) if _is_union_tag(loc[i])), None)


def _wrong_kind(error: dict) -> bool:
    return str(error.get("type", "")).endswith(("_type", "_parsing"))


def _is_union_tag(part: object) -> bool:
    """pydantic names each alternative of a union in the location: a type (``str``, ``list[int]``) or a model."""
    return isinstance(part, str) and (part in _SCALARS or bool(_WRAPPED_TAG.fullmatch(part)) or _is_model(part))


def _is_model(name: str) -> bool:
    """Whether ``name`` is the name of a pydantic model class (the tag of a union of models)."""
    if not name[:1].isupper():
        return False
    todo = [BaseModel]
    while todo:
        cls = todo.pop()
        if cls.__name__ == name:
            return True
        todo.extend(cls.__subclasses__())
    return False


def user_path(loc: tuple, keep_last: bool = False) -> str:
    """``("body", "messages", 0, "content")`` -> ``messages[0].content``; union alternatives left out."""
    if not loc:
        return ""
    rest, path = list(loc[1:]), ""  # loc[0] says where: body, query, path, header or cookie
    for i, part in enumerate(rest):
        last = i == len(rest) - 1
        if isinstance(part, int):
            path += f"[{part}]"
        elif _is_union_tag(part) and not (keep_last and last):
            continue
        else:
            path = join_path(path, str(part))
    return path


def join_path(path: str, name: str) -> str:
    """``messages[0]`` + ``foo`` -> ``messages[0].foo``; a key that is not a plain name is quoted as JSON."""
    if not name.isidentifier():
        return f"{path}[{json.dumps(name)}]" if path else json.dumps(name)
    return f"{path}.{name}" if path else name


def _reworded(msg: str) -> str:
    msg = msg.removeprefix("Value error, ").replace(" after validation", "")
    if msg.startswith("Input should be"):
        return "must be" + msg.removeprefix("Input should be")
    return msg[:1].lower() + msg[1:]


def _alternatives(tags: list[str]) -> str:
    names = [_kind(t)[0] for t in tags]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _kind(tag: str) -> tuple[str, str]:
    """A union alternative as words: ``list[function-after[f(), str]]`` -> ("a list of strings", "lists of ...")."""
    wrapped = re.fullmatch(r"function-[a-z]+\[.*, (.+)\]", tag)
    if wrapped:
        return _kind(wrapped.group(1))
    listed = re.fullmatch(r"list\[(.+)\]", tag)
    if listed:
        several = _kind(listed.group(1))[1]
        return f"a list of {several}", f"lists of {several}"
    if tag in _SCALARS:
        return _SCALARS[tag]
    return "an object", "objects"


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _shown(value: Any) -> str:
    """A short, ASCII-safe rendering of what the caller sent (JSON can carry lone surrogates)."""
    if isinstance(value, (list, dict)):
        return _json_kind(value)
    text = json.dumps(value, ensure_ascii=True) if isinstance(value, (str, int, float, type(None))) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
