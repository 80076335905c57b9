"""memwarden._checks.integer: the one definition of an integer argument."""
import numpy as np
import pytest

from memwarden._checks import INT32_MAX, integer


@pytest.mark.parametrize("value,kw,expected", [
    (3, {}, 3), (np.int64(7), {}, 7), (0, {"minimum": 0}, 0), (INT32_MAX, {"maximum": INT32_MAX}, INT32_MAX),
])
def test_accepts_integers_in_range(value, kw, expected):
    assert integer(value, "n", **kw) == expected and type(integer(value, "n", **kw)) is int


@pytest.mark.parametrize("value,kw,message", [
    (0, {}, "n must be a positive integer, got 0"),
    (-1, {"minimum": 0}, "n must be a non-negative integer, got -1"),
    (True, {}, "n must be a positive integer, got True (a bool)"),
    (4.0, {}, "n must be a positive integer, got 4.0 (float)"),
    ("4", {}, "n must be a positive integer, got '4' (a string)"),
    (2**70, {"minimum": 0, "maximum": 9}, f"n must be an integer in [0, 9], got {2**70}"),
    (1, {"minimum": 2}, "n must be an integer >= 2, got 1"),
])
def test_rejects_naming_the_argument(value, kw, message):
    with pytest.raises(ValueError) as e:
        integer(value, "n", where="op: ", **kw)
    assert str(e.value) == "op: " + message
