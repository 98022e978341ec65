"""Typed configs, validated once, with a YAML round trip.

Every sub-command has one config class (a pydantic model). The CLI is generated from the fields
(``prunekit.cli.args``): a field ``batch_size`` is the flag ``--batch-size`` and the YAML key ``batch_size``;
its ``description`` is the flag's help. Values come, in order of precedence, from the command line,
``--config FILE.yaml``, then the field default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from prunekit.errors import ConfigError, closest


class Config(BaseModel):
    """Base of all configs: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              populate_by_name=True)

    @classmethod
    def keys(cls) -> list[str]:
        """The YAML keys (a field's alias when it has one, e.g. ``from`` for ``from_dir``)."""
        return [f.alias or n for n, f in cls.model_fields.items()]

    @classmethod
    def build(cls, values: dict[str, Any], source: str = "config") -> Config:
        """Validate ``values`` and turn any problem into one ``ConfigError`` naming the key and the fix."""
        valid = cls.keys()
        unknown = [k for k in values if k not in valid and k not in cls.model_fields]
        if unknown:
            k = unknown[0]
            near = closest(k, valid)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{source}: unknown key {k!r}{hint} Valid keys: {', '.join(valid)}")
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, source, values)) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def format_validation_error(e: ValidationError, source: str, values: dict[str, Any]) -> str:
    lines = []
    missing = [str(err["loc"][0]) for err in e.errors() if err["type"] == "missing" and err["loc"]]
    if missing and (source in ("command line", "config") or source.endswith((".yaml", ".yml"))):
        # the CLI: not given anywhere, so no value to show and no source to blame
        flags = [flag_name(k) for k in missing]
        lines.append(f"{' and '.join(flags)} {'is' if len(flags) == 1 else 'are'} required (on the command line, or "
                     f"as {', '.join(repr(k) for k in missing)} in --config FILE.yaml)")
    elif missing:  # a recipe stage, a Python call
        lines.append(f"{source}: {', '.join(repr(k) for k in missing)} {'is' if len(missing) == 1 else 'are'} "
                     "required")
    for err in e.errors():
        if err["type"] == "missing" and err["loc"]:
            continue
        loc = [str(p) for p in err["loc"]]
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if not loc:  # a model-level validator: the message names the fields itself
            lines.append(f"{source}: {msg}")
            continue
        key = loc[0]
        where = f"{flag_name(key)} ({key})" if source == "command line" else f"{key!r}"
        value = values.get(key, err.get("input"))
        lines.append(f"{source}: {where} = {value!r} is invalid: {msg}")
    return "\n".join(lines)


def read_yaml(path: str | Path, what: str = "--config") -> dict[str, Any]:
    """Read a YAML mapping; a missing file or bad YAML is a ``ConfigError`` naming ``what`` (the flag or argument
    that gave the file) and the file."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what}: {str(p)!r} is a directory, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"{what}: file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: {str(p)!r} is not valid YAML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: {str(p)!r} is not a text (YAML) file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {str(p)!r} must hold a mapping of keys to values, got {type(data).__name__}")
    return data
