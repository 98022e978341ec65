"""Typed configs, validated once, with a YAML round trip.

Every sub-command has one config class (a pydantic model). The CLI is generated from the fields
(``prunekit.cli.args``): a field ``batch_size`` is the flag ``--batch-size`` and the YAML key ``batch_size``;
its ``description`` is the flag's help. Values come, in order of precedence, from the command line,
``--config FILE.yaml``, then the field default.

Configs nest by composition: a field typed as another ``Config`` is a *section* (``StructuredConfig.reconstruction``
is a ``Reconstruction``). Every leaf of a section also has one *flat key*, generated as the section class's
``flat_prefix`` + the field name (``reconstruction.steps`` -> ``reconstruct_steps``) unless the field names its own
(``json_schema_extra={"flat": "compensate"}``). Flags, YAML keys and Python keyword shortcuts are those flat keys;
``build`` takes flat keys, nested mappings or both, so ``{"reconstruct_steps": 8}`` and
``{"reconstruction": {"steps": 8}}`` are the same config.
"""

from __future__ import annotations

import contextvars
import logging
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from prunekit.errors import ConfigError, closest

_INIT_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("prunekit_config_init", default=0)


class Config(BaseModel):
    """Base of all configs: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              populate_by_name=True)
    flat_prefix: ClassVar[str] = ""  # a section's flat keys: flat_prefix + field name
    # flat keys a container holds once for all its sections (e.g. a stage's ``seed`` is also its pruning ``seed``):
    # the sections' own leaves of that key get no flag and take the container's value
    shared_keys: ClassVar[tuple[str, ...]] = ()
    # old flat key -> its new name: still read (flags, YAML, keywords), with a warning naming the new one
    renamed: ClassVar[dict[str, str]] = {}

    def __init__(self, **data: Any) -> None:
        """Direct construction is validated like ``build``: a bad value is one ``ConfigError`` naming it (the
        outermost call only: a section built inside another config's validation reports through it)."""
        outer = not _INIT_DEPTH.get()
        token = _INIT_DEPTH.set(_INIT_DEPTH.get() + 1)
        try:
            if type(self).sections() or any(k not in type(self).model_fields for k in data):
                data = type(self).nest(data, type(self).__name__)  # flat keys, and the container's section defaults
            super().__init__(**data)
        except ValidationError as e:
            if not outer:
                raise
            raise ConfigError(format_validation_error(e, type(self).__name__, data, type(self))) from None
        finally:
            _INIT_DEPTH.reset(token)

    @classmethod
    def sections(cls) -> dict[str, type[Config]]:
        """Field name -> section class, for the fields typed as a ``Config``."""
        return {n: t for n, f in cls.model_fields.items() if (t := section_type(f)) is not None}

    @classmethod
    def flat_fields(cls) -> dict[str, tuple[tuple[str, ...], FieldInfo]]:
        """Flat key -> (path of field names, field) for every leaf, sections flattened (generated, never kept by
        hand). Two leaves with one flat key are a programming error, raised here."""
        out: dict[str, tuple[tuple[str, ...], FieldInfo]] = {}
        for name, f in cls.model_fields.items():
            sub = section_type(f)
            if sub is None:
                items = [((name,), f.alias or name, f)]
            else:  # the section's own leaves take its prefix; deeper ones keep the key their section gave them
                items = [((name, *path), _flat_name(sub, path[0], leaf) if len(path) == 1 else key, leaf)
                         for key, (path, leaf) in sub.flat_fields().items()]
            for path, key, leaf in items:
                if len(path) > 1 and key in cls.shared_keys:
                    continue
                if key in out:
                    raise TypeError(f"{cls.__name__}: flat key {key!r} is both {'.'.join(out[key][0])} and "
                                    f"{'.'.join(path)}")
                out[key] = (path, leaf)
        return out

    @classmethod
    def keys(cls) -> list[str]:
        """The flat YAML keys (a field's alias when it has one, e.g. ``from`` for ``from_dir``)."""
        return list(cls.flat_fields())

    @classmethod
    def nest(cls, values: dict[str, Any], source: str = "config") -> dict[str, Any]:
        """Flat keys (and nested mappings) -> the nested mapping pydantic validates; an unknown key is a
        ``ConfigError`` naming the closest valid one."""
        flat, sections = cls.flat_fields(), cls.sections()
        out: dict[str, Any] = {}
        for k, v in values.items():
            if k in cls.renamed:
                if cls.renamed[k] in values:
                    raise ConfigError(f"{source}: {k!r} is the old name of {cls.renamed[k]!r}; give only "
                                      f"{cls.renamed[k]!r}")
                logging.getLogger("prunekit").warning("%s: %r is renamed %r; the old name will go", source, k,
                                                      cls.renamed[k])
                k = cls.renamed[k]
            if k in sections and (isinstance(v, (dict, Config)) or v is None):
                v = v.to_nested() if isinstance(v, Config) else sections[k].nest(v or {}, f"{source}: {k}")
                _merge(out.setdefault(k, {}), v)
            elif k in flat or k in cls.model_fields:
                path = flat[k][0] if k in flat else (k,)
                node = out
                for part in path[:-1]:
                    node = node.setdefault(part, {})
                node[path[-1]] = v
            else:
                valid = [*flat, *sections]
                near = closest(k, valid)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ConfigError(f"{source}: unknown key {k!r}{hint} Valid keys: {', '.join(valid)}")
        for name in sections:  # a container's own defaults for a section's fields (``section(..., epochs=5)``)
            for key, value in section_defaults(cls.model_fields[name]).items():
                out.setdefault(name, {}).setdefault(key, value)
        for key in (k for k in cls.shared_keys if k in cls.model_fields):  # the container's value reaches every
            given = key in out  # section holding that key (a section's own value only when the container has none)
            for name, sec in sections.items():
                node = out.setdefault(name, {}) if key in sec.model_fields else None
                if node is not None and (given or key not in node):
                    node[key] = out.get(key, cls.model_fields[key].default)
        return out

    @classmethod
    def flat_defaults(cls) -> dict[str, Any]:
        """Flat key -> its default in this container (a section's field default, unless the container sets its
        own for that section); ``...`` for a required field."""
        out = {}
        for key, (path, leaf) in cls.flat_fields().items():
            default = leaf.get_default(call_default_factory=True) if not leaf.is_required() else ...
            node: type[Config] = cls
            for part in path[:-1]:
                override = section_defaults(node.model_fields[part])
                node = section_type(node.model_fields[part])  # type: ignore[assignment]
                if len(path) == 2 and path[-1] in override:
                    default = override[path[-1]]
            out[key] = default
        return out

    @classmethod
    def build(cls, values: dict[str, Any], source: str = "config") -> Config:
        """Validate ``values`` (flat keys and/or nested sections) and turn any problem into one ``ConfigError``
        naming the key and the fix."""
        nested = cls.nest(values, source)
        token = _INIT_DEPTH.set(_INIT_DEPTH.get() + 1)  # sections report through this call, not on their own
        try:
            return cls.model_validate(nested)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, source, values, cls)) from None
        finally:
            _INIT_DEPTH.reset(token)

    def updated(self, values: dict[str, Any], source: str = "config") -> Config:
        """A copy with ``values`` (flat keys or sections) applied, validated as a whole."""
        return type(self).build(_nest_into(self.to_nested(), type(self).nest(values, source)), source)

    def flat(self) -> dict[str, Any]:
        """Flat key -> value (Python objects), the shape of flags and keyword shortcuts."""
        out = {}
        for key, (path, _) in type(self).flat_fields().items():
            node: Any = self
            for part in path:
                node = getattr(node, part)
            out[key] = node
        return out

    def to_nested(self) -> dict[str, Any]:
        return self.model_dump(mode="python", by_alias=True)

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON form (what ``config.yaml`` holds and ``build`` reads back)."""
        nested = self.model_dump(mode="json", by_alias=True)
        out = {}
        for key, (path, leaf) in type(self).flat_fields().items():
            node: Any = nested
            for part in path[:-1]:
                node = node[part]
            out[key] = node[leaf.alias or path[-1]]
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def section(cls: type[Config], description: str = "", **defaults: Any) -> Any:
    """A section field of type ``cls`` whose fields default to ``defaults`` where given (the container's own
    defaults: a fine-tune's ``epochs`` is 5 where training's is 10), in one place for flags, YAML and Python."""
    return Field(default_factory=lambda: cls(**defaults), description=description,
                 json_schema_extra={"section_defaults": defaults})


def section_defaults(f: FieldInfo) -> dict[str, Any]:
    extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
    return dict(extra.get("section_defaults") or {})


def section_type(f: FieldInfo) -> type[Config] | None:
    """The ``Config`` class a field holds, if it is a section."""
    t = f.annotation
    return t if isinstance(t, type) and issubclass(t, Config) else None


def _flat_name(cls: type[Config], name: str, f: FieldInfo) -> str:
    extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
    return str(extra.get("flat") or cls.flat_prefix + (f.alias or name))


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _nest_into(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    _merge(out, new)
    return out


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def format_validation_error(e: ValidationError, source: str, values: dict[str, Any],
                            cls: type[Config] | None = None) -> str:
    """pydantic's errors as lines naming each flat key (the flag or YAML key the user typed) and its value."""
    by_path = {path: key for key, (path, _) in cls.flat_fields().items()} if cls is not None else {}

    def key_of(loc: tuple) -> str:
        path = tuple(str(p) for p in loc)
        while path and path not in by_path:  # a list index or a dict key below the field
            path = path[:-1]
        return by_path.get(path, str(loc[0]))

    lines = []
    missing = [key_of(err["loc"]) for err in e.errors() if err["type"] == "missing" and err["loc"]]
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
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if not err["loc"] or (cls is not None and tuple(map(str, err["loc"])) in
                              {(n,) for n in cls.sections()}):  # a model-level validator names the fields itself
            lines.append(f"{source}: {msg}")
            continue
        key = key_of(err["loc"])
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
