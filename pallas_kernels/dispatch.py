"""Choose one implementation of an op per call, with fallback by `NotImplementedError`.

Every op in `pallas_kernels/` (attention, chunked linear attention, ...) registers its
implementations here under short names ("reference", "xla", later Pallas ones) and an order of
preference per platform. `call` then runs:

* `implementation=None`: the platform's order, first to last. An implementation that cannot
  serve the call raises `NotImplementedError(reason)` *before doing any work that matters* and
  the next one is tried. If none can serve it, the error lists every reason.
* `implementation="name"`: only that one. Its `NotImplementedError` propagates, re-raised with
  the op, the name and the reason: a user who forced a backend must learn that it did not run.
* an unknown name: `ValueError` listing the registered names.

Selection happens when the op is called in Python, i.e. once per trace under `jax.jit`, so the
fallback costs nothing at run time. Each choice is logged once per (op, implementation, shape
signature) on the logger "chimera.kernels", and recorded: `last(op)` returns the `Choice` of the
latest call of `op`, `last(op, signature)` the latest one with that signature, and
`describe(op)` a one-line summary (the model prints it per layer at start-up).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Callable, Hashable, Mapping, Sequence

import jax
import numpy as np

__all__ = [
    "Choice", "register", "set_order", "order", "implementations", "get", "call", "signature",
    "last", "describe", "target_platform", "available",
]

logger = logging.getLogger("chimera.kernels")

_DEFAULT = "default"  # key of the order used on platforms without their own

_lock = threading.Lock()  # registries are module state; tracing may happen on several threads
_impls: dict[str, dict[str, Callable[..., Any]]] = {}
_orders: dict[str, dict[str, tuple[str, ...]]] = {}
_last: dict[str, "Choice"] = {}
_last_by_signature: dict[tuple[str, Hashable], "Choice"] = {}
_logged: set[tuple[str, str, Hashable]] = set()


@dataclasses.dataclass(frozen=True)
class Choice:
    """Which implementation served a call of `op` with this `signature`.

    skipped: (name, reason) of the implementations tried first that refused the call.
    """
    op: str
    implementation: str
    signature: Hashable
    skipped: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        text = f"{self.op}: {self.implementation!r} for {_format_signature(self.signature)}"
        if self.skipped:
            text += " (skipped " + "; ".join(f"{n!r}: {r}" for n, r in self.skipped) + ")"
        return text


def register(op: str, name: str, fn: Callable[..., Any]) -> None:
    """Make `fn` available as implementation `name` of `op`; registering a name again replaces it."""
    with _lock:
        _impls.setdefault(op, {})[name] = fn


def set_order(op: str, names: Sequence[str], *, platform: str | None = None) -> None:
    """Order tried by `implementation=None` on `platform` ("cpu", "gpu", "tpu"; None: default).

    Names not registered (yet) are skipped at call time, so an order may list optional backends
    whose module failed to import (e.g. Pallas Triton without jax-triton).
    """
    with _lock:
        _orders.setdefault(op, {})[platform or _DEFAULT] = tuple(names)


def target_platform() -> str:
    """Platform being compiled for: an abstract mesh's device when one is set (cross-lowering
    for a GPU from a CPU host, pallas_kernels/lowering.py), else JAX's default backend."""
    try:
        device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    except Exception:  # noqa: BLE001 - older/newer jax without abstract meshes
        device = None
    if device is not None and getattr(device, "platform", None):
        return str(device.platform)
    return jax.default_backend()


def order(op: str, platform: str | None = None) -> tuple[str, ...]:
    """The order `implementation=None` tries on `platform` (default: `target_platform()`, so
    that a program lowered for a GPU from a CPU host gets the GPU's order)."""
    platform = _normalise_platform(platform or target_platform())
    orders = _orders.get(op, {})
    if platform in orders:
        return orders[platform]
    if _DEFAULT in orders:
        return orders[_DEFAULT]
    return tuple(_impls.get(op, {}))  # no order given: registration order


def available(op: str, platform: str | None = None) -> tuple[str, ...]:
    """`order(op, platform)` without the names not registered in this installation: what
    `implementation=None` actually tries, first to last."""
    return tuple(n for n in order(op, platform) if n in _impls.get(op, {}))


def implementations(op: str) -> tuple[str, ...]:
    """Registered implementation names of `op`, in registration order."""
    return tuple(_impls.get(op, {}))


def get(op: str, name: str) -> Callable[..., Any]:
    """The function registered as `name` for `op` (ValueError if there is none)."""
    _check_name(op, name)
    return _impls[op][name]


def call(op: str, *args: Any, implementation: str | None = None,
         signature: Hashable | None = None, **kwargs: Any) -> Any:
    """Run `op` on (args, kwargs) with the chosen implementation; see the module docstring.

    signature: hashable description of the call used for logging and `last`; by default built
    from the shapes and dtypes of the array arguments and the other keyword values.
    """
    if signature is None:
        signature = _default_signature(args, kwargs)
    if implementation is not None:
        _check_name(op, implementation)
        try:
            result = _impls[op][implementation](*args, **kwargs)
        except NotImplementedError as e:
            raise NotImplementedError(
                f"{op}: implementation {implementation!r} was requested explicitly but cannot "
                f"serve this call ({_format_signature(signature)}): {e}") from e
        _record(Choice(op, implementation, signature))
        return result

    names = order(op)
    skipped: list[tuple[str, str]] = []
    for name in names:
        fn = _impls.get(op, {}).get(name)
        if fn is None:
            continue  # listed in the order but not available in this installation
        try:
            result = fn(*args, **kwargs)
        except NotImplementedError as e:
            skipped.append((name, str(e) or type(e).__name__))
            continue
        _record(Choice(op, name, signature, tuple(skipped)))
        return result
    if not _impls.get(op):
        raise ValueError(f"no implementation of op {op!r} is registered")
    reasons = "; ".join(f"{n!r}: {r}" for n, r in skipped) or "none of them is registered"
    raise NotImplementedError(
        f"{op}: no implementation in {list(names)} can serve this call "
        f"({_format_signature(signature)}): {reasons}")


def signature(**named: Any) -> tuple[tuple[str, Any], ...]:
    """A hashable call signature: arrays become "dtype[shape]" strings, other values stay."""
    return tuple((k, _describe_value(v)) for k, v in named.items())


def last(op: str, signature: Hashable | None = None) -> Choice | None:
    """The `Choice` of the latest call of `op` (with `signature` if given), None if none yet."""
    if signature is None:
        return _last.get(op)
    return _last_by_signature.get((op, signature))


def describe(op: str, signature: Hashable | None = None) -> str:
    """One line saying which implementation served the latest call of `op` (and `signature`)."""
    choice = last(op, signature)
    return str(choice) if choice is not None else f"{op}: not called yet"


# ----------------------------------------------------------------------------- helpers

def _record(choice: Choice) -> None:
    key = (choice.op, choice.implementation, choice.signature)
    with _lock:
        _last[choice.op] = choice
        _last_by_signature[(choice.op, choice.signature)] = choice
        first_time = key not in _logged
        _logged.add(key)
    if first_time:
        logger.info("%s", choice)


def _check_name(op: str, name: str) -> None:
    known = _impls.get(op, {})
    if name not in known:
        raise ValueError(
            f"unknown implementation {name!r} for op {op!r}; accepted: {sorted(known)} "
            f"or None (best available)")


def _normalise_platform(platform: str) -> str:
    return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)


def _describe_value(v: Any) -> Any:
    if hasattr(v, "shape") and hasattr(v, "dtype"):
        return f"{np.dtype(v.dtype).name}[{','.join(str(d) for d in v.shape)}]"
    return v


def _default_signature(args: tuple, kwargs: Mapping[str, Any]) -> tuple:
    parts = [(f"arg{i}", _describe_value(a)) for i, a in enumerate(args)]
    parts += [(k, _describe_value(v)) for k, v in kwargs.items()]
    try:
        hash(tuple(parts))
    except TypeError:  # an unhashable option: fall back to its repr
        parts = [(k, v if _hashable(v) else repr(v)) for k, v in parts]
    return tuple(parts)


def _hashable(v: Any) -> bool:
    try:
        hash(v)
    except TypeError:
        return False
    return True


def _format_signature(sig: Hashable) -> str:
    if isinstance(sig, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in sig):
        return ", ".join(f"{k}={v}" for k, v in sig)
    return str(sig)
