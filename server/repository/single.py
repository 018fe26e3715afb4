"""Serving one model without a repository, as TF Serving does: `ortserve serve path/to/model.onnx`.

The path may be an ONNX file, a folder holding a model file (served as version 1), or a model
directory as it would sit in a repository (config file and/or numeric version folders). It is
laid out as a one-model repository in a temporary directory, so the server takes one code
path. The files are hard-linked there (copied where the temporary directory is on another
file system); not symlinked, because the repository refuses links that lead outside a model
directory, and that check must stay.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from server.repository.repository import CONFIG_FILES, VALID_MODEL_NAME, parse_version


def is_single_model(path: Path) -> bool:
    """Whether `path` names one model rather than a repository of model directories."""
    if path.is_file():
        return path.suffix == ".onnx"
    if not path.is_dir():
        return False
    if any((path / name).is_file() for name in CONFIG_FILES) or any(path.glob("*.onnx")):
        return True
    return any(p.is_dir() and parse_version(p.name) is not None for p in path.iterdir())


def model_name_for(path: Path, given: str | None) -> str:
    """The served name: the one given, else the file's stem or the folder's name, made a valid model name."""
    if given:
        if not VALID_MODEL_NAME.match(given):
            raise ValueError(f"invalid model name {given!r}: letters, digits, '_', '.' and '-' only")
        return given
    stem = path.stem if path.is_file() else path.resolve().name
    if stem == "model" and path.is_file():
        # .../resnet/model.onnx serves as "resnet", and so does .../resnet/1/model.onnx.
        folder = path.resolve().parent
        stem = folder.parent.name if parse_version(folder.name) is not None else folder.name
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", stem).lstrip(".-") or "model"
    return name[:128]


def _link_file(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed there
        shutil.copy2(source, target)


def _link_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, copy_function=lambda s, t: _link_file(Path(s), Path(t)))


def build_repository(path: Path, name: str) -> Path:
    """A temporary one-model repository serving `path` as `name`; the caller removes it (shutil.rmtree).

    Returns:
        The repository directory.
    """
    root = Path(tempfile.mkdtemp(prefix="ortserve-model-"))
    model_dir = root / name
    try:
        if path.is_file():
            # Version 1 holds the file as model.onnx, and its neighbours (external weights,
            # which ONNX Runtime looks for next to the model) under their own names.
            version = model_dir / "1"
            version.mkdir(parents=True)
            for neighbour in path.parent.iterdir():
                if neighbour.is_file() and neighbour != path and neighbour.suffix != ".onnx":
                    _link_file(neighbour, version / neighbour.name)
            _link_file(path, version / "model.onnx")
        elif any(p.is_dir() and parse_version(p.name) is not None for p in path.iterdir()):
            _link_tree(path, model_dir)  # already laid out as a model directory
        else:
            # A folder of files: the model's files are version 1, a config file stays beside them.
            model_dir.mkdir()
            version = model_dir / "1"
            version.mkdir()
            for entry in path.iterdir():
                target = model_dir / entry.name if entry.name in CONFIG_FILES else version / entry.name
                if entry.is_dir():
                    _link_tree(entry, target)
                elif entry.is_file():
                    _link_file(entry, target)
            models = sorted(version.glob("*.onnx"))
            if not (version / "model.onnx").exists() and len(models) == 1:
                models[0].rename(version / "model.onnx")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return root
