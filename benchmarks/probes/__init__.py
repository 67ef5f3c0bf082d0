"""One-off diagnostics: each answered one question once; kept to be run again where the question comes
back, not maintained as benchmarks (``python -m benchmarks.probes.NAME``). What each showed:

- ``overlap_probe`` (issue 19, round 5, 2 x H200): an NCCL all-gather / reduce-scatter in flight beside a
  GEMM hides almost nothing (they share the SMs; fewer CTAs or a high-priority stream do not help), while
  copy engines do: the origin of async TP's "copy_engine" form (docs/async_tp.md, "Round 5").

Removed (in git history):

- ``_diag_ce.py`` (benchmarks/, before issue 29): the copy-engine form's hang at 32K tokens with its
  workspace grown mid-forward, gone with the workspace allocated up front; a growth now synchronizes the
  device and keeps the outgrown buffer (docs/async_tp.md, "A hang, fixed").
"""
