"""Name -> class registries built with keyword arguments, so a misspelled key fails loudly.

Usage::

    MODELS = Registry("models")

    @MODELS.register("PointMAE")
    class PointMAE(nn.Module):
        def __init__(self, num_group: int = 64, ...): ...

    model = MODELS.build({"NAME": "PointMAE", "num_group": 64}, where="cfgs/x.yaml: model")

``build`` checks every key against the constructor's signature and every value against the
parameter's annotation (int, float, bool, str, list, dict, Literal, Optional), and raises
:class:`~utils.errors.ConfigError` naming the place, the key and what was expected.
"""

from __future__ import annotations

import inspect
import typing
import warnings
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin
from collections.abc import Callable

from utils.errors import ConfigError

__all__ = ["Registry", "check_kwargs"]


def _type_ok(value: Any, annotation: Any) -> bool:
    """Loose runtime check of ``value`` against a (possibly string-resolved) annotation."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = get_origin(annotation)
    if origin is Literal:
        return value in get_args(annotation)
    if origin is Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return any(_type_ok(value, a) for a in get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        return all(_type_ok(v, args[0]) for v in value) if args else True
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        return isinstance(value, Mapping)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _describe(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return "any value"
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def check_kwargs(fn: Callable, kwargs: Mapping[str, Any], where: str) -> None:
    """Raise ConfigError if ``kwargs`` has a key ``fn`` does not take or a value of the wrong type."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # unresolvable forward references: fall back to raw annotations
        hints = {}
    params = sig.parameters
    takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key, value in kwargs.items():
        if key not in params:
            if takes_var_kw:
                continue
            raise ConfigError(f"{where}: unknown key '{key}'; expected one of: {', '.join(sorted(accepted))}")
        ann = hints.get(key, params[key].annotation)
        if not _type_ok(value, ann):
            raise ConfigError(
                f"{where}: key '{key}' has value {value!r} of type {type(value).__name__}; "
                f"expected {_describe(ann)}"
            )
    missing = [n for n in accepted if params[n].default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise ConfigError(f"{where}: missing required key(s): {', '.join(missing)}")


class Registry:
    """A named mapping from strings to classes or factory functions."""

    def __init__(self, name: str):
        self.name = name
        self._items: dict[str, Callable] = {}

    def register(self, name: str | None = None, *aliases: str) -> Callable:
        def deco(obj: Callable) -> Callable:
            for key in (name or obj.__name__, *aliases):
                if key in self._items and self._items[key] is not obj:
                    warnings.warn(f"{self.name} registry: '{key}' re-registered, the later one wins", stacklevel=2)
                self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> Callable:
        if name not in self._items:
            raise ConfigError(
                f"unknown {self.name} NAME '{name}'; registered: {', '.join(self.list()) or '(none)'}"
            )
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def list(self) -> list[str]:
        return sorted(self._items)

    def build(self, cfg: Mapping[str, Any], where: str = "", **extra: Any) -> Any:
        """Build ``cfg['NAME']`` with the other keys (plus ``extra``) as keyword arguments."""
        where = where or self.name
        if "NAME" not in cfg:
            raise ConfigError(f"{where}: missing key 'NAME'; registered: {', '.join(self.list())}")
        obj = self.get(cfg["NAME"])
        kwargs = {k: v for k, v in cfg.items() if k != "NAME"}
        kwargs.update(extra)
        check_kwargs(obj, kwargs, f"{where} ({cfg['NAME']})")
        return obj(**kwargs)
