import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ranks that the library launches itself (the CLI called in-process or as a subprocess, sp_core.app.memory) have no
# test-sized limit on the whole run; a hung collective there fails after this many seconds instead of the
# library's default 600 (the same bound as tests/support/multirank's SP_CORE_TEST_TIMEOUT).
os.environ.setdefault("SP_CORE_COLLECTIVE_TIMEOUT", "240")
sys.path.insert(0, os.path.dirname(__file__))

# Rank launches fork from one fork server per pytest process; its preload decides what every rank imports
# again. The first launch of a full run comes from a core test (test_communicator), before any module imported
# sp_core_megatron.cli_engine.engine (whose own add_preload then comes too late), so without this every Megatron
# rank re-imported megatron-core (~5 s a rank on 2 cores). Importing happens in the fork server only, once.
import importlib.util  # noqa: E402

from sp_core.procs import launch as _launch  # noqa: E402

# megatron.core.parallel_state is what sp_core_megatron.cli_engine.engine preloads itself (it pulls in nearly all
# of megatron-core); the rest is what every rank unpickles its function with
_PRELOAD = ["sp_core.models", "sp_core.app.tiny", "pytest"]
if importlib.util.find_spec("megatron") is not None:
    _PRELOAD[:0] = ["megatron.core.parallel_state", "sp_core_megatron.cli_engine.engine"]
for _module in _PRELOAD:
    _launch.add_preload(_module)
