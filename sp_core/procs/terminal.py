"""The terminal of the command that runs: where its own lines go while the frameworks' output is sent to a
log (``sp_core.app.console.quiet`` points these at the terminal's copies; otherwise they are sys.stdout and
sys.stderr). The launcher prints ranks' progress lines here."""
from __future__ import annotations

import sys
from typing import Optional, TextIO

_OUT: Optional[TextIO] = None
_ERR: Optional[TextIO] = None


def use(out_stream: Optional[TextIO], err_stream: Optional[TextIO]) -> None:
    """The streams the command's own lines go to (None: sys.stdout / sys.stderr)."""
    global _OUT, _ERR
    _OUT, _ERR = out_stream, err_stream


def out() -> TextIO:
    return _OUT or sys.stdout


def err() -> TextIO:
    return _ERR or sys.stderr


def say(line: str) -> None:
    """A progress or status line of the command, on the terminal's stderr."""
    print(line, file=err(), flush=True)
