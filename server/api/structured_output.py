"""The grammar a request's output must follow, from whichever field asked for it, compiled before it is queued.

Fields: OpenAI's ``response_format`` (``json_object``, ``json_schema``), vLLM's ``guided_json``,
``guided_regex``, ``guided_choice``, ``guided_grammar`` and their newer ``structured_outputs``, and a forced tool
call (:mod:`server.api.tool_calls`). One per request: two are a 400 naming both. A grammar that does not
compile is a 400 naming its field, and nothing is queued.
"""

from __future__ import annotations

import asyncio
import json

import xgrammar as xgr

from server.api.errors import ApiError
from server.api.schemas import GenerationFields
from server.engine.grammar import GrammarError, Grammars, GrammarSpec

Constraint = tuple[GrammarSpec, str]  # the spec and the field that asked for it


def requested(body: GenerationFields) -> list[Constraint]:
    """Every output constraint the body sets."""
    found: list[Constraint] = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append((GrammarSpec("json_object"), "response_format"))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise ApiError(400, "response_format.json_schema is required when its type is json_schema",
                           "invalid_response_format", "response_format.json_schema")
        found.append((GrammarSpec("json", json.dumps(fmt.json_schema.schema_)), "response_format.json_schema.schema"))
    so = body.structured_outputs
    if so is not None:
        found += _fields(so.json_, so.regex, so.choice, so.grammar, "structured_outputs.{}")
        if so.json_object:
            found.append((GrammarSpec("json_object"), "structured_outputs.json_object"))
    found += _fields(body.guided_json, body.guided_regex, body.guided_choice, body.guided_grammar, "guided_{}")
    return found


def one(constraints: list[Constraint]) -> Constraint | None:
    """The request's constraint; 400 naming them when there are several."""
    if len(constraints) > 1:
        names = ", ".join(param for _, param in constraints)
        raise ApiError(400, f"a request takes one output constraint; this one sets {names}",
                       "invalid_structured_output", constraints[1][1])
    return constraints[0] if constraints else None


async def compile_constraint(grammars: Grammars, constraint: Constraint | None) -> xgr.CompiledGrammar | None:
    """Compiled off the event loop; 400 naming the field when it does not compile."""
    if constraint is None:
        return None
    spec, param = constraint
    try:
        return await asyncio.to_thread(grammars.compile, spec)
    except GrammarError as exc:
        raise ApiError(400, f"{param} cannot be used: {exc}", "invalid_structured_output", param) from None


def _fields(schema: object, regex: str | None, choice: list[str] | None, grammar: str | None,
            name: str) -> list[Constraint]:
    """vLLM's four constraints, from ``structured_outputs`` or the older ``guided_*`` fields (``name`` formats
    a field's name from its kind)."""
    found: list[Constraint] = []
    if schema is not None:
        found.append((GrammarSpec("json", schema if isinstance(schema, str) else json.dumps(schema)),
                      name.format("json")))
    if regex is not None:
        found.append((GrammarSpec("regex", regex), name.format("regex")))
    if choice is not None:
        found.append((GrammarSpec("choice", json.dumps(choice)), name.format("choice")))
    if grammar is not None:
        found.append((GrammarSpec("grammar", grammar), name.format("grammar")))
    return found
