"""What a resumed run must agree on with the run it continues: the differences between two settings records.

A resumable job (GRPO, curation) saves the settings its results were made with; a rerun with other settings would
continue under the old ones (an optimiser's saved learning rate, a cache of the old target's answers) or mix two
kinds of rows in one output while the report names only the new settings. The jobs refuse such a rerun and list
what differs, from :func:`settings_diff`.
"""

from __future__ import annotations

import json

__all__ = ["settings_diff"]

_UNSET = "<unset>"


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def settings_diff(saved: dict, now: dict) -> list[str]:
    """``["key: old -> new", ...]`` for every setting that differs (nested dicts as dotted keys, sorted); ``[]``
    when they agree. Both are compared in their JSON form (tuples as lists, other objects as ``str``), as saved.

    >>> settings_diff({"lr": 0.01, "grpo": {"beta": 0.1}}, {"lr": 0.01, "grpo": {"beta": 0.2}, "k": 3})
    ['grpo.beta: 0.1 -> 0.2', "k: '<unset>' -> 3"]
    """
    a = _flatten(json.loads(json.dumps(saved, default=str)))
    b = _flatten(json.loads(json.dumps(now, default=str)))
    return [f"{k}: {a.get(k, _UNSET)!r} -> {b.get(k, _UNSET)!r}" for k in sorted(set(a) | set(b))
            if a.get(k, _UNSET) != b.get(k, _UNSET)]  # fmt: skip
