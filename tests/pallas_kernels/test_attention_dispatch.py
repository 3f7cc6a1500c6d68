"""`pallas_kernels.dispatch`, the implementation selector the attention op (and every later op)
goes through, tested on toy ops so that the rules are checked independently of any kernel."""
from __future__ import annotations

import itertools
import logging

import jax
import numpy as np
import pytest

from pallas_kernels import dispatch

_ids = itertools.count()


def _refuse(reason):
    def fn(*args, **kwargs):
        raise NotImplementedError(reason)
    return fn


@pytest.fixture
def op():
    """A fresh op name per test: the registry is process-wide."""
    name = f"toy_op_{next(_ids)}"
    dispatch.register(name, "fast", lambda x, *, scale=1: ("fast", x * scale))
    dispatch.register(name, "slow", lambda x, *, scale=1: ("slow", x * scale))
    dispatch.set_order(name, ("fast", "slow"))
    return name


def test_default_order_uses_the_first_that_serves(op):
    assert dispatch.call(op, 2) == ("fast", 2)
    dispatch.register(op, "fast", _refuse("no fast path for this shape"))
    assert dispatch.call(op, 2, scale=3) == ("slow", 6)
    choice = dispatch.last(op)
    assert choice.implementation == "slow"
    assert choice.skipped == (("fast", "no fast path for this shape"),)


def test_explicit_choice_never_falls_back(op):
    dispatch.register(op, "fast", _refuse("too long"))
    with pytest.raises(NotImplementedError, match=rf"{op}.*'fast'.*too long"):
        dispatch.call(op, 2, implementation="fast")
    assert dispatch.call(op, 2, implementation="slow") == ("slow", 2)


def test_unknown_name_lists_the_accepted_ones(op):
    with pytest.raises(ValueError, match=r"'medium'.*\['fast', 'slow'\]"):
        dispatch.call(op, 2, implementation="medium")


def test_every_refusal_is_reported(op):
    dispatch.register(op, "fast", _refuse("reason one"))
    dispatch.register(op, "slow", _refuse("reason two"))
    with pytest.raises(NotImplementedError, match="reason one.*reason two"):
        dispatch.call(op, 2)


def test_platform_order_and_unregistered_names(op):
    platform = jax.default_backend()
    dispatch.set_order(op, ("pallas_not_installed", "slow", "fast"), platform=platform)
    assert dispatch.order(op) == ("pallas_not_installed", "slow", "fast")
    assert dispatch.call(op, 1) == ("slow", 1)  # the missing backend is skipped silently
    assert dispatch.order(op, "some_other_platform") == ("fast", "slow")


def test_logged_once_per_implementation_and_signature(op, caplog):
    x, y = np.zeros((2, 3), np.float32), np.zeros((4, 3), np.float32)
    with caplog.at_level(logging.INFO, logger="chimera.kernels"):
        for arg in (x, x, y, x):
            dispatch.call(op, arg)
    messages = [r.getMessage() for r in caplog.records if op in r.getMessage()]
    assert len(messages) == 2
    assert "float32[2,3]" in messages[0] and "float32[4,3]" in messages[1]


def test_last_and_describe_per_signature(op):
    assert dispatch.last(op) is None and "not called" in dispatch.describe(op)
    sig_a, sig_b = dispatch.signature(n=1), dispatch.signature(n=2)
    dispatch.call(op, 1, signature=sig_a)
    dispatch.register(op, "fast", _refuse("n too large"))
    dispatch.call(op, 2, signature=sig_b)
    assert dispatch.last(op, sig_a).implementation == "fast"
    assert dispatch.last(op, sig_b).implementation == "slow"
    assert dispatch.last(op).signature == sig_b
    assert "'slow' for n=2" in dispatch.describe(op)
    assert "'fast' for n=1" in dispatch.describe(op, sig_a)
