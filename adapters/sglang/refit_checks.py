"""What a refit payload must be, checked on the server rank that reads it: a full update of this rank's
parameters by name, shape and dtype (``check_payload``), values that are finite (``first_not_finite``), and the
one-line refusal (``RefitRefused``) every failed check ends in."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch


class RefitRefused(ValueError):
    pass


def check_payload(params: Dict[str, torch.Tensor], described: List[tuple]) -> str:
    """The first thing wrong with ``described`` (``(name, dtype, shape, ...)`` per tensor: a payload's
    ``shared_memory.described``) as a full update of ``params`` (one line), or "". Values are checked as they
    are read (``first_not_finite``)."""
    names = [entry[0] for entry in described]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        return f"{len(dup)} tensors given twice ({first_names(dup)})"
    missing, unexpected = sorted(set(params) - set(names)), sorted(set(names) - set(params))
    if missing:
        return f"{len(missing)} tensors missing ({first_names(missing)})"
    if unexpected:
        return f"{len(unexpected)} unexpected tensors ({first_names(unexpected)}); expected the core's parameter names"
    for name, dtype, shape, *_ in described:
        param = params[name]
        if tuple(shape) != tuple(param.shape):
            return f"{name}: shape {list(shape)}, this rank's parameter is {list(param.shape)}"
        if dtype != param.dtype:
            return f"{name}: dtype {dtype}, this rank's parameter is {param.dtype}"
    return ""


def first_names(names: List[str]) -> str:
    return ", ".join(names[:3]) + (f", ... {len(names) - 3} more" if len(names) > 3 else "")


def first_not_finite(copies: list, views: Dict[tuple, torch.Tensor]) -> str:
    """The first copy whose source rows hold NaN or inf (one line), or ""."""
    for name, _, dim, _, rows, (p, at, index), src_offset in copies:
        view = source_view(views, p, at, index)
        if dim is not None:
            view = view.narrow(dim, src_offset, rows)
        if view.is_floating_point() and not bool(torch.isfinite(view).all()):
            return f"{name}: holds NaN or inf"
    return ""


def source_view(views: Dict[tuple, torch.Tensor], p: int, at: int, index: Optional[int]) -> torch.Tensor:
    view = views[(p, at)]
    return view if index is None else view[index]
