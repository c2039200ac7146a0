"""What a resumed run must agree on with the run it continues: the differences between two settings records.

A resumable job (GRPO, curation) saves the settings its results were made with; a rerun with other settings would
continue under the old ones (an optimiser's saved learning rate, a cache of the old target's answers) or mix two
kinds of rows in one output while the report names only the new settings. The jobs refuse such a rerun and list
what differs, from :func:`settings_diff`.

An evaluation run identifies its policy by name (``proposals:runs/x/final``); the files behind that name can change
between two invocations (a retrained checkpoint saved over the old one), and a resume would then mix rows of two
policies under one name. :func:`files_digest` fingerprints those files and :func:`code_version` the code, so the
run can refuse the first and record the second.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterable
from functools import cache
from pathlib import Path

__all__ = ["code_version", "files_digest", "settings_diff"]

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


def files_digest(paths: Iterable[str | Path]) -> str | None:
    """SHA-256 (hex, first 16 characters) of the files at ``paths`` (files, or folders read recursively; hidden
    files and folders skipped), over each file's path relative to its root, size and content, in sorted order.

    Paths that do not exist locally (a hub id such as ``HuggingFaceTB/SmolVLM-256M-Instruct``) are skipped;
    ``None`` when nothing local remains (nothing to fingerprint). A 500 MB checkpoint hashes in about a second.
    """
    h = hashlib.sha256()
    found = False
    for root in sorted({Path(p).resolve() for p in paths}):
        if not root.exists():
            continue
        if root.is_file():
            files = {root.name: root}
        else:
            files = {str(f.relative_to(root)): f for f in root.rglob("*") if f.is_file()}
            files = {k: f for k, f in files.items() if not any(part.startswith(".") for part in Path(k).parts)}
        for rel, f in sorted(files.items()):
            found = True
            h.update(f"{rel}\0{f.stat().st_size}\0".encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16] if found else None


@cache
def code_version() -> str:
    """``"<zoomvlm version>"``, plus ``+g<commit>`` (and ``.dirty`` for uncommitted changes to tracked files)
    when the package runs from a git checkout; recorded beside results, not compared."""
    import zoomvlm

    version = zoomvlm.__version__
    here = Path(zoomvlm.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", str(here)], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit}" + (".dirty" if dirty else "") if commit else version
