"""Short name -> attention class, so configs say `attn=nystrom` and not a module path."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, type[nn.Module]] = {}
CONTEXT_KEYS = ("head_dim", "num_heads", "max_length", "prefix_tokens")


def _options_repr(self: nn.Module) -> str:
    """The default extra_repr of an attention: the constructor options it keeps as attributes."""
    params = inspect.signature(type(self).__init__).parameters
    return ", ".join(f"{p}={getattr(self, p)}" for p in params if p != "self" and hasattr(self, p))


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make an attention available as `attn=<name>`."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"attention {name!r} is registered twice")
        _REGISTRY[name] = cls
        if cls.extra_repr is nn.Module.extra_repr:
            cls.extra_repr = _options_repr
        return cls

    return wrap


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> type[nn.Module]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention {name!r}; valid names: {', '.join(names())}")
    return _REGISTRY[name]


def check_at_least(minimum: float, **options) -> None:
    """Raise a ValueError naming the first option below `minimum` (or None)."""
    for key, value in options.items():
        if value is None or value < minimum:
            hint = " (the encoder passes it in `context`)" if key in CONTEXT_KEYS else ""
            raise ValueError(f"{key} must be >= {minimum}, got {value}{hint}")


def check_length(n: int, max_length: int) -> None:
    """For attentions whose parameters are sized by max_length: refuse a longer sequence."""
    if n > max_length:
        raise ValueError(f"sequence length {n} > max_length {max_length} (the parameters' size)")


def build(name: str, *, context: dict | None = None, **options) -> nn.Module:
    """Build attention `name` with `options` (from the `attn` config group).

    `context` carries what the encoder knows (CONTEXT_KEYS; prefix_tokens is 1 when a CLS token
    leads); each is passed only to classes whose constructor names it.
    """
    cls = get(name)
    params = inspect.signature(cls.__init__).parameters
    accepted = {p for p in params if p != "self"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        valid = sorted(accepted - set(context or {}))
        drop = " ".join(f"'~attn.{key}'" for key in unknown)
        raise ValueError(
            f"attention {name!r} got unknown option(s) {unknown}; valid options: {valid}. If "
            f"an experiment config set them for another attention (experiment=demo sets MRA's "
            f"block_per_row), drop them on the command line: {drop}"
        )
    kwargs = {k: v for k, v in (context or {}).items() if k in accepted}
    kwargs.update(options)
    return cls(**kwargs)
