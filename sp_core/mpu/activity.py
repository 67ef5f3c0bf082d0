"""What each launched rank is doing, in shared memory the parent reads: the hang detector and the
message about a killed rank both come from here.

Each rank owns one slot: a short text ("all_reduce (12, 64)", "running _core_rank") and the time it
entered the collective it is waiting in (0 when it is in none). Outside a launched rank (a framework
that binds sp_core.mpu in its own processes) there is no slot and every call is a no-op.
"""
from __future__ import annotations

import ctypes
import time
from typing import Optional

TEXT_BYTES = 160
PATHS_BYTES = 4096  # per rank: the partial outputs it registered (launch.remove_on_abort), one a line


class Board:
    """The shared slots of one launch: ``world`` texts and collective-entry times."""

    def __init__(self, ctx, world: int):
        self.texts = ctx.RawArray(ctypes.c_char, world * TEXT_BYTES)
        self.since = ctx.RawArray(ctypes.c_double, world)
        self.paths = ctx.RawArray(ctypes.c_char, world * PATHS_BYTES)

    def text(self, rank: int) -> str:
        raw = bytes(self.texts[rank * TEXT_BYTES:(rank + 1) * TEXT_BYTES])
        text = raw.split(b"\0", 1)[0].decode(errors="replace") or "starting"
        if text.startswith("in ") and self.since[rank] == 0.0:  # left the collective, nothing new written
            return "computing after " + text[3:]
        return text

    def waiting_since(self, rank: int) -> float:
        return self.since[rank]

    def partial_paths(self, rank: int) -> list:
        """What ``rank`` registered to be removed if the run is aborted (launch.remove_on_abort)."""
        raw = bytes(self.paths[rank * PATHS_BYTES:(rank + 1) * PATHS_BYTES])
        return [p for p in raw.split(b"\0", 1)[0].decode(errors="replace").split("\n") if p]


_BOARD: Optional[Board] = None
_RANK = 0
_DEPTH = 0  # collectives in flight on this rank (an async one overlaps compute)


def attach(board: Board, rank: int) -> None:
    global _BOARD, _RANK
    _BOARD, _RANK = board, rank


def doing(text: str) -> None:
    """Record what this rank is doing now (outside a collective)."""
    if _BOARD is None:
        return
    data = text.encode()[:TEXT_BYTES - 1] + b"\0"
    # memmove, not slice assignment: this runs around every collective, and a ctypes slice store costs
    # as much as a small kernel launch
    ctypes.memmove(ctypes.addressof(_BOARD.texts) + _RANK * TEXT_BYTES, data, len(data))


def note_partial_paths(paths) -> bool:
    """Record this rank's partial outputs where the parent reads them even after killing the rank (a
    synchronous write to shared memory, no message that a SIGKILL could cut short). False if they do not fit."""
    if _BOARD is None:
        return False
    data = "\n".join(paths).encode() + b"\0"
    if len(data) > PATHS_BYTES:
        return False
    ctypes.memmove(ctypes.addressof(_BOARD.paths) + _RANK * PATHS_BYTES, data, len(data))
    return True


def enter_collective(op: str, shape=None) -> None:
    global _DEPTH
    if _BOARD is None:
        return
    if _DEPTH == 0:
        _BOARD.since[_RANK] = time.time()
    _DEPTH += 1
    doing(f"in {op}" + (f" {tuple(shape)}" if shape is not None else ""))


def leave_collective() -> None:
    global _DEPTH
    if _BOARD is None or _DEPTH == 0:
        return
    _DEPTH -= 1
    if _DEPTH == 0:
        _BOARD.since[_RANK] = 0.0  # Board.text reads "in X" with no entry time as "computing after X"
