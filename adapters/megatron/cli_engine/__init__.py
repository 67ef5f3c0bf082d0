"""Not the adapter itself: the ``megatron`` engine of the ``sp-core`` command (``engine``, entry-point group
``sp_core.engines``: logits, ``sp-core train``, the round trip of ``verify``), the small training loop it runs in
Megatron's own machinery on a built-in token stream (``training``), and what runs megatron-core's training path
on a CPU-only machine (``cpu_training``). The adapter's modules never import it."""
