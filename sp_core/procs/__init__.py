"""Processes: starting local ranks and supervising them (``launch``: one process per rank, a rank's error or
death ends the run, the hang detector reads ``sp_core.mpu.activity``'s board, ranks die with their parent)."""
