"""The README's Megatron examples, pasted as they are into a script and run the way the README says
(``torchrun --nproc-per-node 2``), with "Qwen3-8B/" a tiny Qwen3 checkpoint (one KV head: fewer than
tp). On a CPU-only machine the ranks load tests/support/megatron_cpu.py's stand-ins first (a
sitecustomize), for megatron-core's CUDA-only RNG tracker and device calls."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

from sp_core.app.tiny import make_checkpoint

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOT_RUN = "pretrain("  # the Megatron-LM example: needs megatron.training (Python 3.12), see the README


def _megatron_examples():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Training with Megatron"):text.index("## Serving with sglang")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_has_the_megatron_examples():
    blocks = _megatron_examples()
    assert len(blocks) == 3 and sum(NOT_RUN in b for b in blocks) == 1


@pytest.mark.parametrize("index", [0, 1])
def test_readme_megatron_example_runs_as_pasted(index, tmp_path):
    block = [b for b in _megatron_examples() if NOT_RUN not in b][index]
    make_checkpoint("qwen3", str(tmp_path / "Qwen3-8B"))
    (tmp_path / "example.py").write_text(block + "\nprint('EXAMPLE DONE', flush=True)\n")
    (tmp_path / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "from support.megatron_cpu import install_megatron_cpu_shims\ninstall_megatron_cpu_shims()\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("EXAMPLE DONE") == 2
