"""``compare``'s selection language: ``r=8,targets=qv`` -> the trials whose params have those values."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from lora_ablate.errors import UserError, choices
from lora_ablate.export.axes import sort_key
from lora_ablate.export.runs import NON_PARAM_COLUMNS, PARAM_TYPES, SCALARS
from lora_ablate.vocab import ROLES, format_value, targets_text

_LONGEST_FIRST = sorted(ROLES, key=len, reverse=True)  # so a role is never split into shorter ones


def canonical_targets(text: str) -> str:
    """``qv``, ``q,v``, ``v,q`` and ``q v`` -> ``q,v`` (the tracking form: roles in q,k,v,o,mlp order)."""
    s = "".join(str(text).replace(",", " ").split())
    roles, i = [], 0
    while i < len(s):
        role = next((r for r in _LONGEST_FIRST if s.startswith(r, i)), None)
        if role is None:
            raise UserError(f"targets={text!r} is not valid; write roles from: {choices(ROLES)} (e.g. qv or q,v)")
        roles.append(role)
        i += len(role)
    return targets_text(roles)


def parse_selection(text: str) -> dict[str, str]:
    """``"r=8,targets=q,v"`` (or ``"r=8 targets=qv"``) -> ``{"r": "8", "targets": "q,v"}``: a piece without ``=``
    continues the previous value, so the tracking form of targets needs no quoting."""
    out: dict[str, str] = {}
    last = None
    # pairs are separated by commas or by spaces ("r=64 seed=0"); "targets=q v" keeps its space
    for piece in (p.strip() for p in re.split(r",|\s+(?=[\w.]+\s*=)", str(text).strip())):
        if not piece:
            continue
        if "=" in piece:
            key, value = (s.strip() for s in piece.split("=", 1))
            if not key:
                raise UserError(f"selection {text!r} is not valid; write key=value pairs, e.g. r=8,targets=qv")
            out[key] = value
            last = key
        elif last is not None:
            out[last] += "," + piece
        else:
            raise UserError(f"selection {text!r} is not valid; write key=value pairs, e.g. r=8,targets=qv")
    if not out:
        raise UserError(f"selection {text!r} is empty; write key=value pairs, e.g. r=8,targets=qv")
    return out


def _param_names(frame: pd.DataFrame) -> list[str]:
    """The trial params a selection names: the documented ones, then a space's other Optuna params. Not the
    ``cfg.*`` copy of the resolved config: its ~60 keys would bury the few a user filters on."""
    names = [c for c in frame.columns if c not in NON_PARAM_COLUMNS and c not in SCALARS
             and not str(c).startswith(("final/", "cfg.")) and not str(c).endswith(" bin")]
    order = list(PARAM_TYPES)
    return sorted(names, key=lambda c: (order.index(c) if c in order else len(order), c))


def select(frame: pd.DataFrame, selection: dict[str, str], what: str = "selection") -> pd.DataFrame:
    """Rows of ``frame`` whose params equal every ``selection`` value (numbers compared as numbers,
    targets in canonical form). No match is an error that lists the values present."""
    mask = pd.Series(True, index=frame.index)
    for key, raw in selection.items():
        if key not in frame or key in ("run_id", "state"):
            cfg = ", or any cfg.<section>.<key> of the resolved config" if any(
                str(c).startswith("cfg.") for c in frame.columns) else ""
            raise UserError(f"{what}: unknown parameter {key!r}; choose from: {choices(_param_names(frame))}{cfg}")
        col = frame[key]
        if key == "targets":
            mask &= col == canonical_targets(raw)
        elif pd.api.types.is_numeric_dtype(col):
            try:
                value = float(raw)
            except ValueError:
                raise UserError(f"{what}: {key}={raw!r} is not a number") from None
            values = col.astype(float)
            exact = np.isclose(values, value, rtol=1e-9, atol=0)
            # a value copied from a table has 4 significant digits (format_value)
            mask &= exact if exact.any() else np.isclose(values, value, rtol=5e-4, atol=0)
        else:
            mask &= col.astype(str) == raw
    hit = frame[mask]
    if hit.empty:
        def values(k):
            return ", ".join(format_value(v) for v in sorted(frame[k].dropna().unique(), key=sort_key(k)))
        present = "; ".join(f"{k} in {{{values(k)}}}" for k in selection)
        raise UserError(f"{what} {','.join(f'{k}={v}' for k, v in selection.items())} matches no complete "
                        f"trial; present: {present}")
    return hit
