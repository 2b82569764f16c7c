"""Dataclass configs from YAML files plus ``key.sub=value`` command-line overrides.

Every command defines its config as a tree of dataclasses (one docstring per field). This module
turns YAML + overrides into that tree, refusing unknown keys and mistyped values with one line
that names the key, before any model is built::

    cfg = load_config(PretrainConfig, "examples/cpu/pretrain.yaml", ["train.lr=3e-4"])
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

DERIVED = "derived_from"
"""Field metadata key: ``field(metadata={DERIVED: "train.seed"})`` marks a field that is not a config key
of its own but is filled from another key by the enclosing config (a library dataclass reused by a
command whose vocabulary spells the concept elsewhere). Derived fields are refused by the loader (the
command's ``_normalise_keys`` moves their old spelling to the new key first), left out of
``--help-config`` and of :func:`to_dict`."""


def _is_derived(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get(DERIVED))


class ConfigError(ValueError):
    """A config problem, phrased as one line naming the key and the fix."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _choice(value: Any, choices: tuple, key: str) -> Any:
    """``value`` if it is one of ``choices`` (YAML scalars compared as text too), else a one-line error."""
    for choice in choices:
        if value == choice and type(value) is type(choice):
            return choice
    for choice in choices:
        if str(value) == str(choice):
            return choice
    shown = ", ".join(str(c) for c in choices)
    raise ConfigError(f"{key}={value!r} must be one of: {shown}")


def check_choice(value: Any, tp: Any, key: str) -> Any:
    """Validate ``value`` against a ``Literal[...]`` type (Optional allowed) outside the loader (e.g.
    in ``__post_init__`` of a dataclass built in code): returns it, or raises a one-line ConfigError."""
    tp = _unwrap_optional(tp)
    if value is None and tp is not type(None):
        return None
    return _choice(value, typing.get_args(tp), key)


@functools.lru_cache(maxsize=None)
def _choice_fields(cls: type) -> tuple[tuple[str, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls)
                 if typing.get_origin(_unwrap_optional(hints[f.name])) is typing.Literal)


def validate_choices(obj: Any, prefix: str = "") -> None:
    """Check every ``Literal[...]``-typed field of the dataclass ``obj`` (call it in ``__post_init__``, so
    configs built in code are checked like loaded ones); one-line ConfigError naming key, value, choices."""
    for name, tp in _choice_fields(type(obj)):
        setattr(obj, name, check_choice(getattr(obj, name), tp, prefix + name))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    tp = _unwrap_optional(tp)
    if value is None:
        return None
    if typing.get_origin(tp) is typing.Literal:
        return _choice(value, typing.get_args(tp), key)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict) and getattr(tp, "_scalar_key", None):
            value = {tp._scalar_key: value}  # e.g. ``model: tiny`` = ``model: {preset: tiny}``
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{key}' must be true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}") from None
    if tp is str:
        return str(value)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    return value


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    # A config class may accept older spellings of its keys: ``_normalise_keys(data, prefix)``
    # returns ``data`` with them renamed (printing a one-line deprecation note per key).
    normalise = getattr(cls, "_normalise_keys", None)
    if normalise is not None:
        data = normalise(dict(data), prefix)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init and not _is_derived(f)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys under '{prefix or '<top>'}': {sorted(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid config under '{prefix or '<top>'}': {exc}") from None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> nested dict ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of '{part}'")
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def normalise_tree(cls: type, data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``data`` with every older key spelling renamed by the ``_normalise_keys`` of ``cls`` and of the
    dataclasses below it (the loader does the same while building; done per source first, so an override
    given in the new spelling wins over the YAML's old one, and the other way round)."""
    normalise = getattr(cls, "_normalise_keys", None)
    data = normalise(dict(data), prefix) if normalise is not None else dict(data)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _unwrap_optional(hints.get(f.name, f.type))
        if isinstance(data.get(f.name), dict) and _is_dataclass_type(tp):
            data[f.name] = normalise_tree(tp, data[f.name], prefix + f.name + ".")
    return data


def build_config(cls: type[T], data: dict[str, Any]) -> T:
    """Build the dataclass tree ``cls`` from a nested dict (same checks as :func:`load_config`)."""
    return _build(cls, data)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from a YAML file (optional) and ``key.sub=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist: pass --config with a YAML file path")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = loaded
    data = _merge(normalise_tree(cls, data), normalise_tree(cls, parse_overrides(overrides or [])))
    return _build(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass tree -> plain dict (for YAML/JSON dumps and reports); derived fields are left out."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if not _is_derived(f)}
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(to_dict(v) for v in cfg)
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return copy.deepcopy(cfg)


def resolved_yaml(cfg: Any, **resolved: Any) -> str:
    """What ``--dry-run`` prints, the same for every command: the config as loaded (unset ``model`` fields
    left out) followed by the ``resolved_*`` sections its early checks produced (None ones left out)."""
    shown = to_dict(cfg)
    if isinstance(shown.get("model"), dict):
        shown["model"] = {k: v for k, v in shown["model"].items() if v is not None}
    return yaml.safe_dump({**shown, **{k: v for k, v in resolved.items() if v is not None}}, sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a dataclass tree as YAML (the resolved config of a run, next to its outputs)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# --- Field documentation: one source of truth (the docstring under each field) ------------------

def _field_nodes(class_node: ast.ClassDef) -> dict[str, tuple[ast.AnnAssign, str]]:
    """``name -> (AnnAssign node, docstring)`` for the annotated fields of one class body."""
    out: dict[str, tuple[ast.AnnAssign, str]] = {}
    body = class_node.body
    for i, stmt in enumerate(body):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            doc = ""
            nxt = body[i + 1] if i + 1 < len(body) else None
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                doc = inspect.cleandoc(nxt.value.value)
            out[stmt.target.id] = (stmt, doc)
    return out


def field_docs(cls: type) -> dict[str, str]:
    """``field name -> docstring`` of a dataclass, from the string literal under each field in the source
    (base classes included; ``field(metadata={"help": ...})`` wins where given)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # built with make_dataclass / no source: no docstrings
            continue
        tree = ast.parse(source)
        node = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
        if node is not None:
            docs.update({name: doc for name, (_, doc) in _field_nodes(node).items() if doc})
    for f in dataclasses.fields(cls):
        if f.metadata.get("help"):
            docs[f.name] = str(f.metadata["help"])
    source = getattr(cls, "_field_docs_from", None)  # a mirror of another dataclass (e.g. ModelSpec)
    if source is not None and source is not cls:
        docs = {**{k: v for k, v in field_docs(source).items() if k in {f.name for f in dataclasses.fields(cls)}},
                **docs}
    return docs


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return "None" if tp is type(None) else str(tp).replace("typing.", "")


def describe_config(cls: type, prefix: str = "", instance: Any = None) -> list[tuple[str, str, Any, str]]:
    """Every leaf key of the dataclass tree ``cls``: ``(dotted key, type, default, docstring)``."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    if instance is None:
        try:
            instance = cls()
        except TypeError:  # required fields: defaults only where declared
            instance = None
    rows: list[tuple[str, str, Any, str]] = []
    for f in dataclasses.fields(cls):
        if not f.init or _is_derived(f):
            continue
        tp = hints.get(f.name, f.type)
        if instance is not None:
            default = getattr(instance, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        inner = _unwrap_optional(tp)
        if _is_dataclass_type(inner):
            sub = default if dataclasses.is_dataclass(default) else None
            rows.append((prefix + f.name, inner.__name__, None if sub is None else "{...}", docs.get(f.name, "")))
            rows.extend(describe_config(inner, prefix + f.name + ".", sub))
        else:
            rows.append((prefix + f.name, _type_name(tp), default, docs.get(f.name, "")))
    return rows


def format_config_help(cls: type, title: str = "") -> str:
    """``--help-config`` text: every key with its type, default and docstring."""
    lines = [f"{title + ': ' if title else ''}config keys of {cls.__name__} (YAML via --config, or key.sub=value "
             "overrides)", ""]
    for key, type_name, default, doc in describe_config(cls):
        shown = "" if default == "{...}" else f" = {default!r}"
        lines.append(f"{key}: {type_name}{shown}")
        for para in (doc or "(undocumented)").splitlines():
            lines.append(f"    {para}")
    return "\n".join(lines)


def source_defaults(module: str, class_name: str) -> dict[str, Any]:
    """Field defaults of a dataclass read from its source file without importing it (literal defaults,
    ``field(default=...)`` and ``field(default_factory=list|dict|tuple)``). For ``--help`` texts that
    must not import torch. Fields with other defaults are left out."""
    base = Path(__file__).resolve().parent.parent
    path = base / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == class_name)
    out: dict[str, Any] = {}
    factories = {"list": list, "dict": dict, "tuple": tuple}
    for name, (stmt, _) in _field_nodes(node).items():
        value = stmt.value
        if value is None:
            continue
        if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
            kw = {k.arg: k.value for k in value.keywords}
            if "default" in kw:
                value = kw["default"]
            elif "default_factory" in kw and getattr(kw["default_factory"], "id", None) in factories:
                out[name] = factories[kw["default_factory"].id]()
                continue
            else:
                continue
        try:
            out[name] = ast.literal_eval(value)
        except ValueError:
            continue
    return out
