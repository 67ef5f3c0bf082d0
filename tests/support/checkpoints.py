"""Tiny checkpoints for tests: the embedded presets of sp_core.app.tiny (made by transformers itself)."""
import json
import shutil

from sp_core.app.tiny import TINY, hf_config, make_checkpoint, reference_logprobs  # noqa: F401


def with_edited_config(tmp_path, name: str, edit) -> str:
    """A new copy of the tiny ``name`` checkpoint (made once under ``tmp_path``) whose config.json dict
    ``edit`` changed in place."""
    src = tmp_path / f"{name}-src"
    if not src.exists():
        make_checkpoint(name, str(src))
    d = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)
