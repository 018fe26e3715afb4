"""The model repository on disk: model directories, config files and version folders."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import yaml
from google.protobuf import json_format, text_format

from server.core.errors import InvalidInputError, ModelLoadError, ModelNotFoundError, ServerError, quoted
from server.schema import model_config_pb2 as mc

logger = logging.getLogger(__name__)

CONFIG_FILES = ("config.pbtxt", "config.yaml", "config.yml", "config.json")
DEFAULT_MODEL_FILENAME = "model.onnx"
# Read by the loader from the model directory besides the config (see loader.GENERATION_FILE).
GENERATION_FILE = "generation.json"
# A model name is one path component of ordinary characters: no separators, no dots-only names.
VALID_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
# Versions are ASCII decimal numbers that fit Triton's int64 (str.isdigit() would also take
# "²" or "١", which int() then refuses or reads as another digit).
ASCII_DECIMAL = re.compile(r"^[0-9]+$")
MAX_VERSION = 2**63 - 1


def parse_version(text: str) -> int | None:
    """The version number `text` names, or None when it is not an ASCII decimal in int64 range."""
    if not ASCII_DECIMAL.match(text):
        return None
    # At most 19 significant digits: int() never sees a huge string.
    digits = text.lstrip("0") or "0"
    if len(digits) > 19 or int(digits) > MAX_VERSION:
        return None
    return int(digits)


class VersionLoadError(ModelLoadError):
    """One version of a model could not be loaded; `version` says which (RepositoryIndex shows its row)."""

    def __init__(self, version: int, reason: str) -> None:
        super().__init__(f"version {version}: {reason}")
        self.version = version


class LoadAbandonedError(ModelLoadError):
    """A load stopped early because its client went away or the server is stopping."""


def leads_outside(path: Path, model_dir: Path) -> bool:
    """Whether `path` (a symlink or under one) resolves to somewhere outside `model_dir`."""
    try:
        return not path.resolve().is_relative_to(model_dir)
    except (OSError, RuntimeError):  # a symlink loop
        return True


class ModelRepository:
    """Reads models from `<root>/<model>/config.*` and `<root>/<model>/<version>/`.

    Args:
        root: The repository directory.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def model_names(self) -> list[str]:
        """Every directory in the repository that looks like a model, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and VALID_MODEL_NAME.match(p.name))

    def invalid_names(self) -> list[str]:
        """Directories that cannot be models because of their names (spaces, non-ASCII letters...).

        Hidden directories (a leading '.', such as .git) are not models by convention and
        are not listed.
        """
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and not VALID_MODEL_NAME.match(p.name)
        )

    def model_dir(self, name: str) -> Path:
        """The directory of model `name`, refusing names that would leave the repository.

        Raises:
            InvalidInputError: the name is not a plain model name.
            ModelNotFoundError: no such model directory.
        """
        if not VALID_MODEL_NAME.match(name or "") or name in (".", ".."):
            raise InvalidInputError(f"invalid model name {quoted(name)}")
        path = (self.root / name).resolve()
        if path.parent != self.root:
            raise InvalidInputError(f"invalid model name {quoted(name)}")
        if not path.is_dir():
            raise ModelNotFoundError(f"model '{name}' is not in the repository")
        return path

    def check_links(self, name: str) -> None:
        """Refuses a config or generation file that is a symlink leading outside the model directory.

        Symlinks that stay inside the model directory are allowed (for example a version
        folder that points at another version folder).

        Raises:
            ModelLoadError: naming the file.
        """
        model_dir = self.model_dir(name)
        for filename in (*CONFIG_FILES, GENERATION_FILE):
            path = model_dir / filename
            if path.is_symlink() and leads_outside(path, model_dir):
                raise ModelLoadError(f"'{filename}' is a symbolic link that leads outside the model directory")

    def read_config(self, name: str) -> mc.ModelConfig:
        """Parses the model's config file (pbtxt, yaml or json); an absent file gives an empty config.

        Raises:
            ModelLoadError: the file does not parse, or names another model.
        """
        self.check_links(name)
        model_dir = self.model_dir(name)
        found = [model_dir / f for f in CONFIG_FILES if (model_dir / f).is_file()]
        if len(found) > 1:
            raise ModelLoadError(f"more than one config file: {', '.join(p.name for p in found)}")
        config = mc.ModelConfig()
        if found:
            config = parse_config(found[0].read_text(encoding="utf-8"), found[0].suffix)
        if config.name and config.name != name:
            raise ModelLoadError(f"config names model '{config.name}' but its directory is '{name}'")
        config.name = name
        return config

    def version_dirs(self, name: str, model_filename: str) -> dict[int, Path]:
        """Numbered version folders that hold the model file, by version number (refused ones left out)."""
        return self.scan_versions(name, model_filename)[0]

    def numbered_dirs(self, name: str) -> dict[int, list[Path]]:
        """Every folder of the model named by an ASCII decimal version number, by number."""
        numbered: dict[int, list[Path]] = {}
        for child in sorted(self.model_dir(name).iterdir()):
            version = parse_version(child.name)
            if version is not None and child.is_dir():
                numbered.setdefault(version, []).append(child)
        return numbered

    def scan_versions(self, name: str, model_filename: str) -> tuple[dict[int, Path], dict[int, str]]:
        """The usable version folders holding the model file, and the refused ones with the reason.

        A version folder, or its model file, that is a symlink leading outside the model
        directory is refused; so are two folders naming one number ('1' and '01').
        Folders without the model file are not versions (an ensemble's empty folder).
        """
        model_dir = self.model_dir(name)
        usable: dict[int, Path] = {}
        refused: dict[int, str] = {}
        for version, dirs in self.numbered_dirs(name).items():
            holding = [d for d in dirs if (d / model_filename).is_file() or (d / model_filename).is_symlink()]
            if not holding:
                continue
            if len(holding) > 1:
                refused[version] = f"folders {', '.join(repr(d.name) for d in holding)} all name version {version}"
                continue
            folder = holding[0]
            if leads_outside(folder, model_dir):
                refused[version] = f"folder '{folder.name}' is a symbolic link that leads outside the model directory"
            elif leads_outside(folder / model_filename, model_dir):
                refused[version] = (
                    f"'{folder.name}/{model_filename}' is a symbolic link that leads outside the model directory"
                )
            elif not (folder / model_filename).is_file():
                continue  # a dangling link: no model file
            else:
                usable[version] = folder
        return usable, refused

    def fingerprint(self, name: str) -> tuple[tuple[str, str, int, int], ...]:
        """What the model's files look like now: changes mean reload (poll mode).

        Covers the config, label and generation files, and every file in the model's
        folders, following symlinked folders that stay inside the model directory (as the
        loader does) and recording where each symlink points, so retargeting one counts.
        """
        try:
            model_dir = self.model_dir(name)
        except ServerError:
            return ()
        parts: list[tuple[str, str, int, int]] = []
        for entry in sorted(model_dir.iterdir()):
            if entry.is_dir():
                parts.append(_stamp(entry, entry.name))
                if leads_outside(entry, model_dir):
                    continue
                real = entry.resolve()
                for path in sorted(real.rglob("*")):
                    if path.is_file() or path.is_symlink():
                        parts.append(_stamp(path, f"{entry.name}/{path.relative_to(real)}"))
            elif entry.name in CONFIG_FILES or entry.name == GENERATION_FILE or entry.suffix == ".txt":
                parts.append(_stamp(entry, entry.name))
        return tuple(parts)

    def label_file(self, name: str, filename: str) -> list[str]:
        """Reads a label file (one label per line) from the model directory."""
        model_dir = self.model_dir(name)
        path = (model_dir / filename).resolve()
        if not path.is_relative_to(model_dir) or not path.is_file():
            raise ModelLoadError(f"label file '{filename}' is not a file inside the model directory")
        return [line.rstrip("\r") for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def _stamp(path: Path, relative: str) -> tuple[str, str, int, int]:
    """(relative path, symlink target, size, mtime); a dangling link has size and mtime -1."""
    target = os.readlink(path) if path.is_symlink() else ""
    if path.is_dir():
        return (relative, target, 0, 0)
    try:
        stat = path.stat()
    except OSError:
        return (relative, target, -1, -1)
    return (relative, target, stat.st_size, stat.st_mtime_ns)


def parse_config(text: str, suffix: str) -> mc.ModelConfig:
    """Parses a model config in text format (.pbtxt), YAML or JSON into the one schema.

    Raises:
        ModelLoadError: naming the problem (unknown field, bad value, syntax).
    """
    config = mc.ModelConfig()
    try:
        if suffix == ".pbtxt":
            text_format.Parse(text, config)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
            if not isinstance(data, dict):
                raise ModelLoadError("config.yaml must hold a mapping")
            json_format.ParseDict(data, config)
        else:
            json_format.ParseDict(json.loads(text or "{}"), config)
    except (text_format.ParseError, json_format.ParseError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"config does not parse: {exc}") from exc
    return config
