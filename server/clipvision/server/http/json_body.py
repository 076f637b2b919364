"""JSON request bodies parsed within limits: how many values and how deep, checked first.

A body within --max-message-bytes can still be millions of tiny values (``[[],[],...]``
parses to 64 bytes per 3 bytes sent) or thousands of levels deep. Before json parses
it, the values are counted: brackets, braces and commas, found by bytes.count (no
string of base64 holds one), and only when those exceed the limit are the strings
taken out with one regular expression and the count made exact (texts may hold
commas). Depth is checked on the parsed value, whose size is bounded by then.
"""

from __future__ import annotations

import json
import re
from typing import Any

from clipvision.server.errors import InvalidRequestError, Reason

# Deeper than any request of these protocols nests (OIP's JSON: four levels).
MAX_DEPTH = 16
# A JSON string, escapes and all, in one pass with no backtracking.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def parse_json(body: bytes, max_values: int) -> Any:
    """The parsed body; REQUEST_MALFORMED for a body that is not JSON, holds more than
    ``max_values`` values (arrays, objects, and items of them) or nests deeper than MAX_DEPTH."""
    if _values(body) > max_values and _values(_STRING.sub(b'""', body)) > max_values:
        raise InvalidRequestError(
            Reason.REQUEST_MALFORMED,
            f"The JSON body holds more than {max_values} values; send fewer items per "
            "request (the limits are in /v1/models and GetModelInfo).",
        )
    try:
        value = json.loads(body)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as exc:
        where = f" at character {exc.pos}" if isinstance(exc, json.JSONDecodeError) else ""
        raise InvalidRequestError(
            Reason.REQUEST_MALFORMED, f"The request body is not valid UTF-8 JSON{where}."
        ) from None
    _check_depth(value)
    return value


def _values(data: bytes) -> int:
    return data.count(b"[") + data.count(b"{") + data.count(b",")


def _check_depth(value: Any) -> None:
    level = [value]
    for _ in range(MAX_DEPTH + 1):
        children: list[Any] = []
        for item in level:
            if isinstance(item, dict):
                children.extend(item.values())
            elif isinstance(item, list):
                children.extend(item)
        if not children:
            return
        level = [child for child in children if isinstance(child, dict | list)]
        if not level:
            return
    raise _too_deep()


def _too_deep() -> InvalidRequestError:
    return InvalidRequestError(
        Reason.REQUEST_MALFORMED,
        f"The JSON body nests deeper than {MAX_DEPTH} levels; no request of this API does.",
    )


def field(
    body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None
) -> Any:
    """``body[name]`` if it has the type ``kind``, ``default`` when absent or null, else
    REQUEST_MALFORMED naming the field (JSON true is no number)."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)
        raise InvalidRequestError(
            Reason.REQUEST_MALFORMED, f"Field {name!r} must be a JSON {names}."
        )
    return value


def json_object(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else REQUEST_MALFORMED."""
    if not isinstance(value, dict):
        raise InvalidRequestError(
            Reason.REQUEST_MALFORMED, "The request body must be a JSON object."
        )
    return value


_JSON_NAMES = {str: "string", list: "array", dict: "object", int: "integer", bool: "boolean"}
