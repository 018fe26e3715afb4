"""Reading a model directory's side files (tokenizer, chat template, generation configs) safely."""

from __future__ import annotations

from pathlib import Path

from server.core.errors import ModelLoadError


def read_inside(model_dir: Path, name: str, limit: int) -> str | None:
    """A file of the model directory as UTF-8 text, or None when absent.

    Raises:
        ModelLoadError: the file is a link out of the directory, not a regular file, over `limit`
            bytes (read whole, so bounded), or unreadable.
    """
    path = model_dir / name
    if not path.exists():
        return None
    resolved = path.resolve()
    if not resolved.is_relative_to(model_dir.resolve()) or not resolved.is_file():
        raise ModelLoadError(f"{name} must be a file inside the model directory")
    size = resolved.stat().st_size
    if size > limit:
        raise ModelLoadError(f"{name} is {size} bytes; at most {limit} are read")
    try:
        return resolved.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{name} cannot be read: {exc}") from exc
