"""A streamed refit's handshake: a trainer rank's shared-memory buckets (``sp_core.procs.shared_memory``) written,
consumed and removed one at a time, twice, so that a rank holds at most two buckets at once.

The payload is described in full before any byte is written and carries ``"stream": {"timeout": seconds}``.
The trainer rank writes its buckets in order, pass 1 then pass 2 (``bucket_path``: a file appears complete),
keeping at most two: after writing one it waits for the engine's acknowledgement of the one before
(``ack_path``, written once every server rank has dropped its mapping of that bucket) and removes it. Server
ranks wait for each bucket at most ``timeout`` seconds. Either side ends the stream early with ``stop_path``:
the server when it refuses or gives up, the trainer's rank 0 when the engine call returns or fails; the trainer
ranks then stop writing (each in a ``Writer`` thread, while rank 0 calls the engine). Files, not sockets: both
sides only poll paths, so a side that dies leaves the other a timeout, never a blocked read."""
from __future__ import annotations

import os
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from sp_core.procs import shared_memory

PASSES = (1, 2)
_POLL_MIN, _POLL_MAX = 0.0002, 0.005  # seconds between two looks at a path


class Stalled(RuntimeError):
    """A bucket that did not appear in time (one line)."""


def bucket_path(payload: dict, index: int, pass_: int) -> str:
    return f"{payload['files'][index][0]}.pass{pass_}"


def ack_path(payload: dict, index: int, pass_: int) -> str:
    return os.path.join(os.path.dirname(payload["files"][0][0]), f"ack-{pass_}-{index}")


def stop_path(payload: dict) -> str:
    return os.path.join(os.path.dirname(payload["files"][0][0]), "stop")


def wait_until(ready: Callable[[], bool], timeout: Optional[float], stop: Optional[str] = None) -> bool:
    """True once ``ready()``; False when ``stop`` exists or ``timeout`` seconds have passed (None: no limit)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = _POLL_MIN
    while not ready():
        if (stop is not None and os.path.exists(stop)) or (deadline is not None and time.monotonic() > deadline):
            return False
        time.sleep(pause)
        pause = min(pause * 2, _POLL_MAX)
    return True


def touch(path: str, text: str = "") -> None:
    """Write a small marker; a directory already removed (its owner is gone) is not an error."""
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError:
        pass


# -- trainer side ----------------------------------------------------------------------------------------------

def produce(tensors: List[Tuple[str, torch.Tensor]], payload: dict) -> bool:
    """Write this rank's buckets, pass 1 then pass 2, each once the engine acknowledged the one two before (at
    most two files at once); True if every bucket was acknowledged, False if the stream was stopped."""
    order = [(pass_, index) for pass_ in PASSES for index in range(len(payload["files"]))]
    stop = stop_path(payload)
    for at in range(len(order) + 1):
        if at < len(order):
            if os.path.exists(stop):
                return False
            pass_, index = order[at]
            shared_memory.write_bucket(tensors, payload, index, bucket_path(payload, index, pass_))
        if at > 0:
            pass_, index = order[at - 1]
            ack = ack_path(payload, index, pass_)
            if not wait_until(lambda: os.path.exists(ack), None, stop):
                return False
            os.remove(bucket_path(payload, index, pass_))
            os.remove(ack)
    return True


def answered(call: Callable[[], dict]) -> dict:
    """``call()``, the engine's answer; a call that failed becomes a refusal of one line."""
    try:
        return call()
    except Exception as err:  # noqa: BLE001 - reported to every trainer rank by the caller
        text = str(err).splitlines()[0] if str(err) else ""
        return {"success": False, "message": f"refit: the engine call failed ({type(err).__name__}: {text})"}


class Writer:
    """``produce`` in a thread, beside the engine call that TP rank 0 makes in its own thread (an ``sglang.Engine``
    in the trainer's process runs its event loop there); ``join`` returns the error it ended with, if any."""

    def __init__(self, tensors: List[Tuple[str, torch.Tensor]], payload: dict):
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, args=(tensors, payload), name="sp-core-refit-writer",
                                        daemon=True)
        self._thread.start()

    def _run(self, tensors, payload) -> None:
        try:
            produce(tensors, payload)
        except BaseException as err:  # noqa: BLE001 - raised by the caller once every rank has the answer
            self._error = err

    def join(self) -> Optional[BaseException]:
        self._thread.join()
        return self._error


# -- server side -----------------------------------------------------------------------------------------------

def wait_buckets(payloads: List[dict], which: List[int], index: int, pass_: int) -> Dict[int, str]:
    """The paths of bucket ``index`` of pass ``pass_`` of the payloads ``which``, once all exist; ``Stalled`` after
    the stream's timeout."""
    paths = {p: bucket_path(payloads[p], index, pass_) for p in which}
    timeout = float(payloads[0]["stream"]["timeout"])
    if not wait_until(lambda: all(os.path.exists(path) for path in paths.values()), timeout):
        late = [p for p, path in paths.items() if not os.path.exists(path)]
        raise Stalled(f"trainer rank {late[0]} wrote no bucket {index} of pass {pass_} within {timeout:g} s")
    return paths


def ack(payloads: List[dict], index: int, pass_: int) -> None:
    for payload in payloads:
        touch(ack_path(payload, index, pass_))


def stop(payloads: List[dict], message: str) -> None:
    for payload in payloads:
        touch(stop_path(payload), message)
