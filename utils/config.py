"""Layered YAML configs: full defaults, then an experiment file with ``_base_`` includes, then ``key=value``.

A run's config is built in three layers, each merged over the one before:

1. the defaults file (``cfgs/_base_/default.yaml``), which lists every key a config may set;
2. the experiment file, with its ``_base_`` includes resolved;
3. command-line overrides such as ``optimizer.kwargs.lr=5e-4``.

The result is checked against the defaults and returned as a :class:`Config` that remembers which file
(or ``"command line"``) set every key, so that later errors can name it.

Rules:

* ``_base_: path`` or ``_base_: [path, ...]`` may appear in any mapping, at the top level or nested
  (``dataset: {train: {_base_: cfgs/dataset_configs/ShapeNet-55.yaml, others: {subset: train}}}``).
  The base files are loaded (their own ``_base_`` keys resolved), merged in order (a later base wins over
  an earlier one), and the including mapping's own keys are merged over them. A relative path is looked
  up next to the including file first, then in the current working directory, then in the repository
  root. Including a file that is already being loaded is a cycle and an error.
* Merging is recursive for mappings; any other value (scalars, lists) replaces the one below it, so lists
  are never concatenated. A mapping holding ``_replace_: true`` replaces the mapping below it instead of
  being merged into it (after its own ``_base_`` is resolved); the marker sticks to that mapping through
  every later layer and is removed from the result. ``_delete_`` (the mmcv spelling) is rejected with a
  pointer to ``_replace_``.
* Scalars are parsed as YAML 1.1 (``yaml.SafeLoader``) with one fix: numbers in exponent notation
  without a dot (``1e-3``, ``5E4``) are floats, in files and in overrides alike. Duplicate keys in one
  mapping are an error.
* Validation (skipped when ``defaults=None``): every key must exist in the defaults, and every value must
  have the default's type. An int is accepted where the default is a float; anything is accepted where
  the default is null; null is accepted where the default is a scalar or a list (it conventionally means
  "off" or "none"); a list's elements are checked against the first element of the default list when it
  has one; a mapping where a scalar is expected, or a scalar where a mapping is expected, is an error.
  Keys at or below a free-form prefix (``model``, ``dataset``, ...) are not checked, since their
  constructors check them when they are built; the section itself must still be a mapping when its
  default is one. Every problem found is reported in one :class:`~utils.errors.ConfigError`.
* Ranges and enums: the defaults file may hold a top-level ``_rules_`` mapping, nested like the config,
  whose leaves are rules (the mapping is removed from the config). A rule is ``">= 1"``, ``"> 0"``,
  ``"<= 8"``, ``"< 1"``, an interval
  ``"in (0, 1)"`` / ``"in [0, 1]"`` (round brackets exclude the end), or ``"one of fp32, bf16, fp16"``;
  ``" | null"`` at the end also accepts null. A rule applies to a key wherever it is set, free-form
  sections included (``model.transformer_config.mask_ratio``); an absent key is not checked. A value
  outside its rule is reported as ``<key> = <value> (set in <file>) is out of range; allowed: <rule>``.

Example::

    cfg = load_config("cfgs/pretrain/point_mae.yaml", ["optimizer.kwargs.lr=5e-4"])
    cfg.model.transformer_config.mask_ratio      # attribute access
    cfg.source_of("model.num_group")             # 'cfgs/pretrain/point_mae.yaml'
    save_config(cfg, "experiments/x/config.yaml")
    load_config("experiments/x/config.yaml", defaults=None) == cfg
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from utils.errors import ConfigError
from utils.io import atomic_write

__all__ = [
    "COMMAND_LINE",
    "DEFAULTS_PATH",
    "FREE_FORM",
    "Config",
    "load_config",
    "parse_override",
    "save_config",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULTS_PATH = REPO_ROOT / "cfgs" / "_base_" / "default.yaml"
FREE_FORM = ("model", "dataset", "augment", "gm3d.teacher_model")
COMMAND_LINE = "command line"

_BASE = "_base_"
_REPLACE = "_replace_"
_RULES = "_rules_"
_DELETE = "_delete_"

_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``1e-3`` as a float and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes strings ``_Loader`` would read as floats and never writes aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


# --------------------------------------------------------------------------------------------------
# Config object
# --------------------------------------------------------------------------------------------------


def _to_plain(value: Any) -> Any:
    """Nested Mappings and sequences as plain dicts and lists (tuples become lists)."""
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _make_config(data: Mapping[str, Any], sources: dict[str, str], prefix: str,
                 origin: tuple[str, ...]) -> Config:
    """Build a Config sharing ``sources`` (provenance of the whole tree) at dotted ``prefix``."""
    cfg = Config.__new__(Config)
    dict.__init__(cfg)
    object.__setattr__(cfg, "_sources", sources)
    object.__setattr__(cfg, "_prefix", prefix)
    object.__setattr__(cfg, "_origin", origin)
    for key, value in data.items():
        dict.__setitem__(cfg, key, cfg._wrap(key, value))
    return cfg


class Config(dict):
    """A nested dict with attribute access and provenance.

    Nested mappings are stored as Config too (so ``cfg.model.transformer_config.mask_ratio`` works);
    assigning a mapping stores a Config copy of it. A key assigned in code has no recorded source. Keys
    that collide with dict methods (``items``,
    ``get``, ``copy``, ...) need item access. :meth:`to_dict` gives plain dicts and lists, for saving,
    pickling into checkpoints and :meth:`utils.registry.Registry.build`. A Config pickles and deep-copies
    with its provenance.

    Args:
        data: initial keys and values.
    """

    __slots__ = ("_sources", "_prefix", "_origin")

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "_sources", {})
        object.__setattr__(self, "_prefix", "")
        object.__setattr__(self, "_origin", ())
        for key, value in (data or {}).items():
            super().__setitem__(key, self._wrap(key, value))

    def _wrap(self, key: str, value: Any) -> Any:
        if isinstance(value, Mapping):
            return _make_config(value, self._sources, f"{self._prefix}{key}.", self._origin)
        if isinstance(value, list):
            return [self._wrap(f"{key}.{i}", item) for i, item in enumerate(value)]
        return value

    def _forget(self, key: str) -> None:
        """Drop the recorded source of ``key`` and everything under it (it is now set in code)."""
        full = self._prefix + key
        for path in [p for p in self._sources if p == full or p.startswith(full + ".")]:
            del self._sources[path]

    def __setitem__(self, key: str, value: Any) -> None:
        self._forget(key)
        super().__setitem__(key, self._wrap(key, value))

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._forget(key)

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Like ``dict.update``, storing nested mappings as Config."""
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: str, default: Any = None) -> Any:
        """Like ``dict.setdefault``, storing a mapping default as Config."""
        if key not in self:
            self[key] = default
        return self[key]

    def __ior__(self, other: Mapping[str, Any]) -> Config:
        self.update(other)
        return self

    def __getattr__(self, name: str) -> Any:
        if name in Config.__slots__ or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            close = difflib.get_close_matches(name, [k for k in self if isinstance(k, str)], n=3)
            hint = f"; did you mean {_or_list(close)}?" if close else ""
            raise AttributeError(f"config has no key '{self._prefix}{name}'{hint}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in Config.__slots__:
            raise AttributeError(f"'{name}' is reserved in Config")
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(f"config has no key '{self._prefix}{name}'") from None

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *(k for k in self if isinstance(k, str) and k.isidentifier())})

    def __reduce__(self) -> tuple[Any, ...]:
        return _make_config, (self.to_dict(), dict(self._sources), self._prefix, self._origin)

    def __deepcopy__(self, memo: dict[int, Any]) -> Config:
        return _make_config(copy.deepcopy(self.to_dict(), memo), dict(self._sources), self._prefix,
                            self._origin)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists, without provenance."""
        return _to_plain(self)

    def get_path(self, path: str, default: Any = None) -> Any:
        """The value at dotted ``path`` (list items by index, ``"a.0.b"``), or ``default`` if absent."""
        node: Any = self
        for part in path.split("."):
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return default
        return node

    def source_of(self, key: str) -> str | None:
        """The file (or ``"command line"``) that set dotted ``key``, relative to this section.

        For a mapping it is the last layer that set anything in it. None when the key was not loaded
        from a file (for example, set in code).
        """
        return self._sources.get(self._prefix + key)

    def where(self, key: str) -> str:
        """``"<files>: <dotted key>"`` for error messages: ``Registry.build(..., where=cfg.where("model"))``.

        The files are those that set the key or anything under it, the one that set the key itself first.
        """
        full = self._prefix + key
        files = self.sources(key)
        return f"{', '.join(files)}: {full}" if files else full

    def sources(self, key: str) -> list[str]:
        """The files (or ``"command line"``) that set dotted ``key`` or anything under it, the one that set
        the key itself first; empty when nothing was loaded for it."""
        full = self._prefix + key
        files: list[str] = []
        for path, source in self._sources.items():
            if (path == full or path.startswith(full + ".")) and source not in files:
                files.append(source)
        return files

    def source_files(self) -> list[str]:
        """Every file loaded for this config, then each override as ``"command line: k=v"``, in load order."""
        return list(self._origin)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Node:
    """A loaded value with the file that set it. A mapping's value is ``dict[str, _Node]``."""

    value: Any
    source: str
    replace: bool = False

    @property
    def is_map(self) -> bool:
        return isinstance(self.value, dict)


@dataclass(frozen=True)
class _Ctx:
    """Where the mapping being resolved comes from."""

    source: str
    base_dir: Path
    chain: tuple[tuple[Path, str], ...]
    record: list[str]


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _or_list(items: Sequence[str]) -> str:
    quoted = [f"'{item}'" for item in items]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _display(path: Path) -> str:
    """``path`` relative to the working directory when inside it, else absolute."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(resolved)


def _parse_yaml(text: str, what: str) -> Any:
    """Parse YAML ``text``; a syntax error becomes a ConfigError naming ``what`` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" ({exc.context})" if exc.context else ""
        raise ConfigError(f"YAML syntax error in {what}{where}: {exc.problem}{context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error in {what}: {exc}") from None


def _load_file(path: Path, chain: tuple[tuple[Path, str], ...], record: list[str]) -> _Node:
    """Load and resolve one YAML file whose existence the caller has checked."""
    display = _display(path)
    real = path.resolve()
    if any(p == real for p, _ in chain):
        cycle = " -> ".join([name for _, name in chain] + [display])
        raise ConfigError(f"_base_ cycle: {cycle}")
    try:
        text = real.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {display}: {exc}") from None
    raw = _parse_yaml(text, display)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{display}: the top level must be a mapping of keys to values, "
                          f"got {type(raw).__name__} {_short(raw)}")
    record.append(display)
    return _resolve(raw, _Ctx(display, real.parent, chain + ((real, display),), record), "")


def _base_specs(value: Any, ctx: _Ctx, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{ctx.source}: {_BASE} at {where} must be a path or a list of paths, "
                      f"got {_short(value)}")


def _find_base(spec: str, ctx: _Ctx, where: str) -> Path:
    """Resolve a ``_base_`` path: next to the including file, then the working directory, then the repo."""
    path = Path(spec).expanduser()
    candidates = [path] if path.is_absolute() else [ctx.base_dir / path, Path.cwd() / path, REPO_ROOT / path]
    unique: list[Path] = []
    for candidate in candidates:
        if candidate.resolve() not in [u.resolve() for u in unique]:
            unique.append(candidate)
    for candidate in unique:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c.resolve()) for c in unique)
    raise ConfigError(f"base file '{spec}' not found (included from {ctx.source} at {where}); "
                      f"looked for: {looked}")


def _resolve(raw: Any, ctx: _Ctx, keypath: str) -> _Node:
    """Tag ``raw`` with its source, resolving ``_base_`` and ``_replace_`` in every mapping."""
    if isinstance(raw, list):
        items = [_plain(_resolve(item, ctx, f"{keypath}[{i}]")) for i, item in enumerate(raw)]
        return _Node(items, ctx.source)
    if not isinstance(raw, dict):
        return _Node(raw, ctx.source)
    where = f"'{keypath}'" if keypath else "the top level"
    replace = False
    specs: list[str] = []
    own: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"{ctx.source}: key {key!r} at {where} is not a string; quote it")
        if key == _BASE:
            specs = _base_specs(value, ctx, where)
        elif key == _REPLACE:
            if not isinstance(value, bool):
                raise ConfigError(f"{ctx.source}: {_REPLACE} at {where} must be true or false, "
                                  f"got {_short(value)}")
            replace = value
        elif key == _DELETE:
            raise ConfigError(f"{ctx.source}: '{_DELETE}' at {where} is not supported; write "
                              f"'{_REPLACE}: true' to replace a mapping instead of merging into it")
        elif not key or "." in key:
            raise ConfigError(f"{ctx.source}: key {key!r} at {where} must be non-empty and contain no '.'")
        else:
            own[key] = value
    inherited: _Node | None = None
    for spec in specs:
        base = _load_file(_find_base(spec, ctx, where), ctx.chain, ctx.record)
        inherited = base if inherited is None else _merge(inherited, base)
    node = _Node({key: _resolve(value, ctx, _join(keypath, key)) for key, value in own.items()}, ctx.source)
    if inherited is not None:
        node = _merge(inherited, node)
    return _Node(node.value, node.source, replace or node.replace)


def _merge(base: _Node, over: _Node) -> _Node:
    """``over`` merged over ``base``: mappings recursively unless ``over.replace``, anything else replaced."""
    if over.replace or not (base.is_map and over.is_map):
        return over
    merged = dict(base.value)
    for key, child in over.value.items():
        merged[key] = _merge(merged[key], child) if key in merged else child
    return _Node(merged, over.source, base.replace)


def _plain(node: _Node) -> Any:
    if node.is_map:
        return {k: _plain(v) for k, v in node.value.items()}
    return node.value


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``"a.b.c=value"`` into the dotted key and the YAML-parsed value.

    ``1e-3`` parses as a float, ``true`` as a bool, ``[1, 2]`` as a list, ``null`` (or nothing after the
    ``=``) as None, ``{NAME: X, _replace_: true}`` as a mapping.

    Raises:
        ConfigError: no ``=``, an empty key or key part, a ``_base_`` / ``_replace_`` key part, or a value
            that is not valid YAML.
    """
    if not isinstance(text, str):
        raise ConfigError(f"override {text!r} must be a string 'key=value'")
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"malformed override {text!r}: expected key=value, e.g. optimizer.kwargs.lr=1e-3")
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"malformed override {text!r}: empty part in key '{key}'")
    if _BASE in parts or _REPLACE in parts:
        raise ConfigError(f"override {text!r}: set '{_BASE}' / '{_REPLACE}' inside a mapping value, "
                          f"e.g. {parts[0]}={{{_BASE}: path.yaml}}")
    return key, _parse_yaml(raw, f"override {text!r}")


def _apply_override(root: _Node, text: str, record: list[str]) -> _Node:
    key, value = parse_override(text)
    parts = key.split(".")
    node = root
    for i, part in enumerate(parts[:-1]):
        child = node.value.get(part)
        if child is None or child.value is None:
            break
        if not child.is_map:
            raise ConfigError(f"override {text!r}: '{'.'.join(parts[:i + 1])}' is {_short(child.value)} "
                              f"(set in {child.source}), not a mapping")
        node = child
    record.append(f"{COMMAND_LINE}: {text}")
    tagged = _resolve(value, _Ctx(COMMAND_LINE, Path.cwd(), (), record), key)
    for part in reversed(parts):
        tagged = _Node({part: tagged}, COMMAND_LINE)
    return _merge(root, tagged)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def _expected(default: Any) -> str:
    if isinstance(default, float):
        return "float (or int)"
    if isinstance(default, list):
        return f"list of {_expected(default[0])}" if default else "list"
    return _kind(default)


def _value_ok(value: Any, default: Any) -> bool:
    """Whether a non-mapping ``value`` may replace ``default`` (see the module docstring)."""
    if default is None:
        return True
    if value is None:
        return not isinstance(default, dict)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, list):
        return isinstance(value, list) and (not default or all(_value_ok(v, default[0]) for v in value))
    if isinstance(default, dict):
        return isinstance(value, dict)
    return isinstance(value, type(default))


def _paths(node: _Node, prefix: str = "") -> Iterator[str]:
    if node.is_map:
        for key, child in node.value.items():
            path = _join(prefix, key)
            yield path
            yield from _paths(child, path)


def _type_error(path: str, node: _Node, default: _Node) -> str:
    return (f"wrong type for key '{path}' (set in {node.source}): got {_short(_plain(node))} "
            f"({_kind(node.value)}), expected {_expected(default.value)} "
            f"(default: {_short(_plain(default))})")


def _unknown_key(path: str, node: _Node, default: _Node | None, all_paths: list[str]) -> str:
    parent, _, key = path.rpartition(".")
    siblings = list(default.value) if default is not None and default.is_map else []
    matches = [_join(parent, m) for m in difflib.get_close_matches(key, siblings, n=3, cutoff=0.6)]
    if not matches:
        matches = [p for p in all_paths
                   if difflib.SequenceMatcher(None, key, p.rpartition(".")[2]).ratio() >= 0.8][:3]
    message = f"unknown key '{path}' (set in {node.source})"
    if matches:
        return f"{message}; did you mean {_or_list(matches)}?"
    if siblings:
        where = f"under '{parent}'" if parent else "at the top level"
        return f"{message}; valid keys {where}: {', '.join(siblings)}"
    return message


def _check(node: _Node, default: _Node | None, prefix: str, free: tuple[str, ...], all_paths: list[str],
           errors: list[str]) -> None:
    """Append to ``errors`` every problem in mapping ``node`` compared with ``default``."""
    for key, child in node.value.items():
        path = _join(prefix, key)
        ref = default.value.get(key) if default is not None and default.is_map else None
        if path in free:
            if ref is not None and ref.is_map and not child.is_map:
                errors.append(_type_error(path, child, ref))
        elif ref is None:
            if any(f.startswith(path + ".") for f in free):
                if child.is_map:
                    _check(child, None, path, free, all_paths, errors)
                else:
                    errors.append(f"wrong type for key '{path}' (set in {child.source}): got "
                                  f"{_short(_plain(child))} ({_kind(child.value)}), expected mapping")
            else:
                errors.append(_unknown_key(path, child, default, all_paths))
        elif child is ref:
            continue
        elif ref.is_map:
            if child.is_map:
                _check(child, ref, path, free, all_paths, errors)
            else:
                errors.append(_type_error(path, child, ref))
        elif not _value_ok(child.value, ref.value):
            errors.append(_type_error(path, child, ref))


_RANGE = re.compile(r"^(>=|<=|>|<)\s*(\S+)$")
_INTERVAL = re.compile(r"^in\s*([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])$")


def parse_rule(text: str, where: str = "rule") -> tuple[Any, bool]:
    """Parse one ``_rules_`` entry into ``(check(value) -> bool, null_ok)``; see the module docstring."""
    if not isinstance(text, str):
        raise ConfigError(f"{where}: a rule must be a string such as '>= 1', got {_short(text)}")
    body, null_ok = text.strip(), False
    if body.endswith("| null"):
        body, null_ok = body[: -len("| null")].strip(), True

    def number(tok: str) -> float:
        try:
            return float(tok)
        except ValueError:
            raise ConfigError(f"{where}: '{tok}' in rule {text!r} is not a number") from None

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    m = _RANGE.match(body)
    if m:
        op, bound = m.group(1), number(m.group(2))
        cmp = {">=": lambda v: v >= bound, "<=": lambda v: v <= bound, ">": lambda v: v > bound,
               "<": lambda v: v < bound}[op]
        return (lambda v: is_num(v) and cmp(v)), null_ok
    m = _INTERVAL.match(body)
    if m:
        lo, hi = number(m.group(2)), number(m.group(3))
        lo_ok = (lambda v: v >= lo) if m.group(1) == "[" else (lambda v: v > lo)
        hi_ok = (lambda v: v <= hi) if m.group(4) == "]" else (lambda v: v < hi)
        return (lambda v: is_num(v) and lo_ok(v) and hi_ok(v)), null_ok
    if body.startswith("one of "):
        choices = [c.strip() for c in body[len("one of "):].split(",") if c.strip()]
        if not choices:
            raise ConfigError(f"{where}: rule {text!r} lists no choices")
        return (lambda v: isinstance(v, str) and v in choices), null_ok
    raise ConfigError(f"{where}: cannot read rule {text!r}; expected '>= N', '> N', '<= N', '< N', "
                      f"'in (a, b)' / 'in [a, b]' or 'one of x, y', optionally followed by '| null'")


def _find(root: _Node, path: str) -> _Node | None:
    node: _Node | None = root
    for part in path.split("."):
        if node is None or not node.is_map or part not in node.value:
            return None
        node = node.value[part]
    return node


def _rule_leaves(rules: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in rules.items():
        if isinstance(value, Mapping):
            yield from _rule_leaves(value, _join(prefix, key))
        else:
            yield _join(prefix, key), value


def _check_rules(root: _Node, rules: Mapping[str, Any], rules_source: str, errors: list[str]) -> None:
    for key, text in _rule_leaves(rules):
        check, null_ok = parse_rule(text, f"{rules_source}: {_RULES}.{key}")
        node = _find(root, key)
        if node is None:
            continue
        value = _plain(node)
        if value is None and null_ok:
            continue
        if value is None or isinstance(value, (dict, list)) or not check(value):
            allowed = text if not text.strip().endswith("| null") else text.replace("| null", "or null")
            errors.append(f"{key} = {_short(value)} (set in {node.source}) is out of range; allowed: {allowed.strip()}")


def _validate(root: _Node, defaults: _Node, free_form: Sequence[str], rules: _Node | None = None) -> None:
    errors: list[str] = []
    _check(root, defaults, "", tuple(f.strip(".") for f in free_form), list(_paths(defaults)), errors)
    if rules is not None and not errors:  # ranges only make sense once the types are right
        _check_rules(root, _plain(rules), rules.source, errors)
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"{len(errors)} config errors:\n" + "\n".join(f"  - {e}" for e in errors))


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _to_config(root: _Node, origin: Sequence[str]) -> Config:
    sources: dict[str, str] = {}

    def strip(node: _Node, path: str) -> Any:
        if path:
            sources[path] = node.source
        if node.is_map:
            return {k: strip(v, _join(path, k)) for k, v in node.value.items()}
        return node.value

    data = strip(root, "")
    return _make_config(data, sources, "", tuple(origin))


def _existing_file(path: str | os.PathLike[str], what: str) -> Path:
    candidate = Path(path).expanduser()
    if not candidate.is_file():
        state = "is not a file" if candidate.exists() else "not found"
        raise ConfigError(f"{what} {state}: {path}")
    return candidate


def load_config(
    path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    defaults: str | os.PathLike[str] | None = DEFAULTS_PATH,
    free_form: Sequence[str] = FREE_FORM,
) -> Config:
    """Load an experiment config over the defaults, apply overrides, and validate the result.

    Args:
        path: experiment YAML file.
        overrides: ``"dotted.key=value"`` strings, applied in order after the files; values are YAML.
        defaults: the defaults file every config is merged over and checked against; None loads ``path``
            alone without checks (for example a saved, already resolved config).
        free_form: dotted prefixes whose contents are not checked against the defaults.

    Returns:
        The resolved config, with each key's source available through :meth:`Config.source_of`.

    Raises:
        ConfigError: a missing or unreadable file (naming the including file for a ``_base_``), a YAML
            syntax error (with file and line), a ``_base_`` cycle, a malformed override, an unknown key
            (with close matches) or a value of the wrong type (naming the key, the file that set it and
            the expected type).
    """
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of 'key=value' strings, not the string {overrides!r}")
    record: list[str] = []
    default_node: _Node | None = None
    rules: _Node | None = None
    if defaults is not None:
        default_node = _load_file(_existing_file(defaults, "defaults file"), (), record)
        rules = default_node.value.get(_RULES)
        if rules is not None:
            if not rules.is_map:
                raise ConfigError(f"{rules.source}: {_RULES} must be a mapping of dotted key -> rule")
            default_node = _Node({k: v for k, v in default_node.value.items() if k != _RULES},
                                 default_node.source, default_node.replace)
    root = _load_file(_existing_file(path, "config file"), (), record)
    if default_node is not None:
        root = _merge(default_node, root)
    for text in overrides:
        root = _apply_override(root, text, record)
    if default_node is not None:
        _validate(root, default_node, free_form, rules)
    return _to_config(root, record)


def save_config(cfg: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the resolved ``cfg`` as block-style YAML, keys in order, atomically (temp file + rename).

    A header comment lists the files and overrides it came from. ``load_config(path, defaults=None)``
    reads back an equal config.

    Args:
        cfg: a Config (or any nested mapping).
        path: destination file; missing parent folders are created.

    Returns:
        The path written.

    Raises:
        ConfigError: a value YAML cannot represent.
    """
    target = Path(path)
    try:
        body = yaml.dump(_to_plain(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                         allow_unicode=True)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot save config to {target}: {exc}") from None
    lines = ["# Resolved config written by utils.config.save_config; "
             "reload it with load_config(path, defaults=None)."]
    origin = cfg.source_files() if isinstance(cfg, Config) else []
    if origin:
        lines.append("# Sources, in load order:")
        lines.extend(f"#   {source.replace(chr(10), ' ')}" for source in origin)
    atomic_write(target, lambda fh: fh.write("\n".join(lines) + "\n" + body), binary=False)
    return target
