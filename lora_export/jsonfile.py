"""Reading a JSON file a user hands us: every way it can be unreadable becomes one ``Problem``.

json.loads raises ValueError for bad syntax, UnicodeDecodeError for bad bytes and RecursionError for
pathological nesting (``[[[[...]]]]``); reading raises OSError. Each is the user's file, not our crash.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import Problem


def read_object(path: Path, fix: str, problems: list[Problem]) -> dict | None:
    """The JSON object in ``path``, or None with a problem added (unreadable, not JSON, not an object)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        problems.append(Problem(str(path), f"not valid JSON ({str(e)[:200]})", fix))
        return None
    except RecursionError:
        problems.append(Problem(str(path), "nested too deeply to read", fix))
        return None
    except OSError as e:
        problems.append(Problem(str(path), f"cannot be read ({e.strerror or e})", fix))
        return None
    if not isinstance(value, dict):
        problems.append(Problem(str(path), f"the top level is a JSON {type(value).__name__}, not an object", fix))
        return None
    return value
