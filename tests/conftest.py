import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ranks that the library launches itself (the CLI called in-process or as a subprocess, sp_core.memory) have no
# test-sized limit on the whole run; a hung collective there fails after this many seconds instead of the
# library's default 600 (the same bound as tests/support/multirank's SP_CORE_TEST_TIMEOUT).
os.environ.setdefault("SP_CORE_COLLECTIVE_TIMEOUT", "240")
sys.path.insert(0, os.path.dirname(__file__))
