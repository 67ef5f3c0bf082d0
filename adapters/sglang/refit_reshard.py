"""How a server rank reads a refit from a trainer of another tp or MoE mode: whether the payloads need a reshard
(``matched_layout``) and, when they do, the copies that fill this rank's parameters from every trainer rank's
rows (``reshard_plan``), planned from the payloads' descriptions alone."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from sp_core.procs import refit_transport
from sp_core_sglang.refit_checks import RefitRefused, first_names


def matched_layout(payloads: List[dict], server_tp: int, model) -> bool:
    """One payload per server rank from a trainer of this tp and MoE mode (this rank's parameters: the mode
    the engine was started in, sglang's ``--ep-size``); otherwise the payloads are resharded."""
    from sp_core.models.refit_pieces import moe_mode

    mode = moe_mode(model.parameters())
    return len(payloads) == server_tp and all(p.get("layout", {}).get("tp", server_tp) == server_tp and
                                               p.get("layout", {}).get("moe_parallel", mode) == mode for p in payloads)


def reshard_plan(params: Dict[str, torch.Tensor], payloads: List[dict], server_tp: int,
                 entries: Optional[List[list]] = None) -> list:
    """The copies that fill this rank's parameters from every trainer rank's payload of another tp or MoE mode:
    each checkpoint tensor's rows this rank holds (``sp_core.models.refit_pieces``: routed experts per expert,
    so whole experts and experts split over TP map onto each other), read from the trainer rank(s) that hold them
    (their payload's ``layout``), straight into the parameter -- no full tensor is built. A piece that is a whole
    tensor on one side is read or written along the other side's split dim. Planned from the payloads'
    descriptions alone (no byte is read: the values are checked as they are copied, ``first_not_finite``); a copy
    is ``(name, index, dim, offset, rows, (payload, tensor, index there), offset there)``. Refused (one line) when
    a tensor's checkpoint shape differs, it is split along another dim and neither side holds it whole, rows are
    missing, a tensor is unexpected or a dtype differs. ``entries``: ``shared_memory.described`` of each payload."""
    from sp_core.models.refit_pieces import refit_keys, refit_pieces

    if any("layout" not in p for p in payloads):
        raise RefitRefused(f"{len(payloads)} payloads for a server of tp {server_tp}, without the trainer's layout "
                           f"to reshard them")
    entries = [refit_transport.described(p) for p in payloads] if entries is None else entries
    trainer_tp = payloads[0]["layout"]["tp"]
    index: Dict[str, list] = {}
    for p, payload in enumerate(payloads):
        sent = {entry[0]: (at, entry[1], entry[2]) for at, entry in enumerate(entries[p])}
        for name, pieces in payload["layout"]["pieces"].items():
            if name not in sent:
                raise RefitRefused(f"{name}: described by trainer rank {payload['layout']['rank']} but not sent")
            at, dtype, shape = sent[name]
            for key, sub, dim, start, rows, offset, full in pieces:
                index.setdefault(key, []).append((dim, start, rows, (p, at, sub), shape if sub is None else shape[1:],
                                                  dtype, offset, tuple(full)))
    copies = []
    for name, param in params.items():
        for key, at, dim, start, rows, offset, full in refit_pieces(name, param):
            if key not in index:
                raise RefitRefused(f"{key}: missing from the trainer's tensors")
            target = param if at is None else param[at]
            sources = [_along(key, s, dim, full, trainer_tp, server_tp) for s in index[key]]
            if dim not in {s[0] for s in sources} and rows == full[dim] and tuple(target.shape) == tuple(full):
                dim = sources[0][0]  # whole here, split there: written along the trainer's split dim
                start, rows, offset = 0, full[dim], 0
                sources = [_along(key, s, dim, full, trainer_tp, server_tp) for s in sources]
            end, here = start + rows, start
            for src_dim, src_start, src_rows, src, _, dtype, src_offset, _ in sorted(sources, key=lambda s: s[1]):
                if src_dim != dim:
                    raise RefitRefused(f"{key} cannot be mapped from trainer tp {trainer_tp} to server tp {server_tp}: "
                                       f"split along dim {src_dim} there, dim {dim} here, held whole on neither side")
                if dtype != param.dtype:
                    raise RefitRefused(f"{key}: dtype {dtype}, this rank's parameter is {param.dtype}")
                lo, hi = max(here, src_start), min(end, src_start + src_rows)
                if lo > here:
                    break
                if hi > lo:
                    copies.append((name, at, dim, offset + lo - start, hi - lo, src, src_offset + lo - src_start))
                    here = hi
                if here == end:
                    break
            if here < end:
                raise RefitRefused(f"{key}: rows {here}..{end} are in no trainer rank's payload")
    unexpected = sorted(set(index) - {key for name, param in params.items() for key in refit_keys(name, param)})
    if unexpected:
        raise RefitRefused(f"{len(unexpected)} unexpected tensors ({first_names(unexpected)})")
    return copies


def _along(key: str, source: tuple, dim: int, full: tuple, trainer_tp: int, server_tp: int) -> tuple:
    """A trainer piece ``(dim, start, rows, source, shape, dtype, offset, full)``, checked against the checkpoint
    shape ``full`` this rank expects, and re-described along ``dim`` when it is a whole tensor split along another
    dim."""
    src_dim, src_start, src_rows, src, shape, dtype, src_offset, src_full = source
    if src_full != tuple(full):
        raise RefitRefused(f"{key} cannot be mapped from trainer tp {trainer_tp} to server tp {server_tp}: "
                           f"checkpoint shape {list(src_full)} there, {list(full)} here")
    if src_dim != dim and src_rows == full[src_dim] and tuple(shape) == tuple(full):
        return dim, 0, full[dim], src, shape, dtype, 0, src_full
    return source
