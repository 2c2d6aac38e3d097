"""`RecipeConfig`: what `DPrunerConfig` and `PATConfig` share — a dataclass recipe saved as one JSON file beside
the weights, together with record keys (what the run produced), and read back with errors that name the file."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .utils import read_json_object

C = TypeVar("C", bound="RecipeConfig")


class RecipeConfig:
    """Mixin for a recipe dataclass. Subclasses set `config_name` (the file), `record_keys` (the keys that
    `save_pretrained` may add beside the recipe) and `missing_hint` / `remedy` / `invalid_remedy` (error messages),
    and may override `check_record` to type-check the record keys."""

    config_name: ClassVar[str]
    record_keys: ClassVar[tuple[str, ...]] = ()
    missing_hint: ClassVar[str] = "is this a folder saved by hf_dpruner?"
    remedy: ClassVar[str] = "re-save the checkpoint"
    invalid_remedy: ClassVar[str] = "re-save or re-download the checkpoint"

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a JSON-serializable dict."""
        return asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, save_directory: str | os.PathLike, **record: Any) -> Path:
        """Write the config file: the recipe plus record keys (method, versions, what the run produced...)."""
        unknown = set(record) - set(self.record_keys)
        if unknown:
            raise ValueError(f"Unknown record keys {sorted(unknown)}; valid: {self.record_keys}.")
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        out = path / self.config_name
        out.write_text(json.dumps({**self.to_dict(), **record}, indent=2, sort_keys=True) + "\n")
        return out

    @classmethod
    def check_record(cls, data: Mapping[str, Any]) -> None:
        """Raise TypeError/ValueError if a record key of `data` has the wrong type (no check by default)."""

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """The config of a recipe dict (record keys allowed and checked, other keys rejected)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"A {cls.__name__} is read from a dict, got {type(data).__name__}.")
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names - set(cls.record_keys)
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} keys {sorted(unknown, key=str)}; valid: {sorted(names)}.")
        cls.check_record(data)
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def config_file(cls, path: str | os.PathLike) -> Path:
        """The config file inside a folder, or `path` itself when it is not a folder."""
        path = Path(path)
        return path / cls.config_name if path.is_dir() else path

    @classmethod
    def read_record(cls, path: str | os.PathLike) -> dict[str, Any]:
        """The whole config file (recipe and record) of a folder or file, with clear errors."""
        return read_json_object(cls.config_file(path), cls.missing_hint, cls.remedy)

    @classmethod
    def from_pretrained(cls: type[C], path: str | os.PathLike) -> C:
        """Read the recipe from a saved folder or its config file; errors name the file."""
        file = cls.config_file(path)
        data = cls.read_record(file)
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise cls.invalid_file(err, file) from err

    @classmethod
    def invalid_file(cls, err: Exception, source: str | os.PathLike) -> Exception:
        """`err` (TypeError or ValueError) restated with the file it came from and what to do."""
        kind = TypeError if isinstance(err, TypeError) else ValueError
        return kind(f"{source} is not a valid {cls.config_name}: {err} Fix it, or {cls.invalid_remedy}.")
