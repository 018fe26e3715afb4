"""The model repository on disk: model directories, config files and version folders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from google.protobuf import json_format, text_format

from server.core.errors import InvalidInputError, ModelLoadError, ModelNotFoundError
from server.rpc.pb import model_config_pb2 as mc

CONFIG_FILES = ("config.pbtxt", "config.yaml", "config.yml", "config.json")
DEFAULT_MODEL_FILENAME = "model.onnx"
# A model name is one path component of ordinary characters: no separators, no dots-only names.
VALID_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


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

    def model_dir(self, name: str) -> Path:
        """The directory of model `name`, refusing names that would leave the repository.

        Raises:
            InvalidInputError: the name is not a plain model name.
            ModelNotFoundError: no such model directory.
        """
        if not VALID_MODEL_NAME.match(name or "") or name in (".", ".."):
            raise InvalidInputError(f"invalid model name {name!r}")
        path = (self.root / name).resolve()
        if path.parent != self.root:
            raise InvalidInputError(f"invalid model name {name!r}")
        if not path.is_dir():
            raise ModelNotFoundError(f"model '{name}' is not in the repository")
        return path

    def read_config(self, name: str) -> mc.ModelConfig:
        """Parses the model's config file (pbtxt, yaml or json); an absent file gives an empty config.

        Raises:
            ModelLoadError: the file does not parse, or names another model.
        """
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
        """Numbered version folders that hold the model file, by version number."""
        model_dir = self.model_dir(name)
        versions: dict[int, Path] = {}
        for child in model_dir.iterdir():
            if child.is_dir() and child.name.isdigit() and (child / model_filename).is_file():
                versions[int(child.name)] = child
        return versions

    def label_file(self, name: str, filename: str) -> list[str]:
        """Reads a label file (one label per line) from the model directory."""
        model_dir = self.model_dir(name)
        path = (model_dir / filename).resolve()
        if not path.is_relative_to(model_dir) or not path.is_file():
            raise ModelLoadError(f"label file '{filename}' is not a file inside the model directory")
        return [line.rstrip("\r") for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


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
