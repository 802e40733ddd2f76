"""JSON from clients, parsed without surprises: what `json.loads` accepts but the rest of the runtime cannot use.

Refused (`UnsafeJSON`, a ValueError): invalid JSON or encodings, NaN / Infinity, integers of more digits than
Python converts (4,300), nesting deeper than `MAX_DEPTH` (json itself recurses until RecursionError, and so would
anything that walks or renders the value), and strings or keys holding a lone UTF-16 surrogate ("\\ud800" is
valid JSON but no Unicode text: it can be neither tokenized nor encoded back to UTF-8).
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 64  # nesting of arrays and objects; OpenAI's own request bodies need fewer than 10

_SURROGATE = re.compile("[\ud800-\udfff]")


class UnsafeJSON(ValueError):
    pass


def _not_json(constant: str):
    raise UnsafeJSON("NaN and Infinity are not JSON")


def loads(raw: str | bytes) -> Any:
    try:
        value = json.loads(raw, parse_constant=_not_json)
    except RecursionError:
        raise UnsafeJSON(f"nested too deeply (the limit is {MAX_DEPTH} levels)") from None
    except UnsafeJSON:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnsafeJSON(f"not valid JSON: {exc}") from None
    except ValueError:  # an integer of more than 4,300 digits
        raise UnsafeJSON("a number has too many digits") from None
    pending = [(value, 1)]
    while pending:  # iterative: the depth limit is what is checked, so the check must not recurse
        item, depth = pending.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise UnsafeJSON(f"nested too deeply (the limit is {MAX_DEPTH} levels)")
            if isinstance(item, dict):
                for key in item:
                    _check_text(key)
                item = item.values()
            pending.extend((child, depth + 1) for child in item if isinstance(child, (str, dict, list)))
    return value


def _check_text(text: str) -> None:
    if _SURROGATE.search(text):
        raise UnsafeJSON("a string holds a lone UTF-16 surrogate (such as \\ud800): strings must be valid Unicode")
