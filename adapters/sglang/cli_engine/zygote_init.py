"""Imported first in the fork server of ``forking`` (and nowhere else): sglang's workers report a failure
with SIGQUIT to their parent, which is this fork server; it passes the signal on to the engine host, the
parent sglang expects (its handler there ends the engine). Each worker restores SIGQUIT's default action."""
import os
import signal


def _forward(signum, frame):
    os.kill(os.getppid(), signal.SIGQUIT)


signal.signal(signal.SIGQUIT, _forward)
