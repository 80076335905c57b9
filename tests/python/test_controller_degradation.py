"""Degradation levels: threshold boundaries, hysteresis, policies applied to requests by
hand-computed numbers, validation; and hypothesis properties over pressure sequences
against a one-level-at-a-time reference walk."""
from __future__ import annotations

import subprocess
import sys

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from memwarden.controller.degradation import (
    DEFAULT_POLICIES, Applied, Degradation, DegradationPolicy, Level,
)

# -- levels -------------------------------------------------------------------------------


def test_level_labels_and_order():
    assert [level.label for level in Level] == ["low", "medium", "high", "critical", "emergency"]
    assert Level.LOW < Level.MEDIUM < Level.HIGH < Level.CRITICAL < Level.EMERGENCY
    assert [int(level) for level in Level] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("pressure,label", [
    (0.0, "low"), (0.6999, "low"), (0.70, "medium"), (0.7999, "medium"), (0.80, "high"),
    (0.8499, "high"), (0.85, "critical"), (0.8999, "critical"), (0.90, "emergency"),
    (1.0, "emergency"), (1.3, "emergency"),
])
def test_each_threshold_boundary_lands_on_its_level(pressure, label):
    assert Degradation().level_for(pressure).label == label
    assert Degradation().update(pressure).label == label  # from low, going up is immediate


def test_custom_thresholds_by_label_or_level():
    deg = Degradation(thresholds={"medium": 0.5, Level.EMERGENCY: 0.95})
    assert deg.thresholds == {"medium": 0.5, "high": 0.8, "critical": 0.85, "emergency": 0.95}
    assert deg.level_for(0.55) is Level.MEDIUM
    assert deg.level_for(0.92) is Level.CRITICAL


# -- hysteresis ---------------------------------------------------------------------------


def test_hysteresis_does_not_flap_around_a_threshold():
    deg = Degradation()  # medium at 0.70, hysteresis 0.02
    assert [deg.update(p).label for p in (0.69, 0.71, 0.695, 0.71)] == ["low", "medium", "medium", "medium"]
    assert deg.transitions[Level.MEDIUM] == 1
    assert deg.update(0.681) is Level.MEDIUM
    assert deg.update(0.68) is Level.MEDIUM  # 0.68 is not below 0.70 - 0.02
    assert deg.update(0.679) is Level.LOW
    assert deg.transitions == {Level.LOW: 1, Level.MEDIUM: 1, Level.HIGH: 0, Level.CRITICAL: 0,
                               Level.EMERGENCY: 0}


def test_falling_slowly_steps_down_falling_fast_skips():
    deg = Degradation()
    deg.update(0.95)
    assert deg.update(0.885) is Level.EMERGENCY  # inside emergency's band (0.88)
    assert deg.update(0.86) is Level.CRITICAL
    assert deg.update(0.79) is Level.HIGH  # below critical's band, inside high's (0.78)
    assert deg.update(0.5) is Level.LOW
    deg.update(0.95)
    assert deg.update(0.1) is Level.LOW


def test_zero_hysteresis_follows_the_thresholds():
    deg = Degradation(hysteresis=0.0)
    assert [deg.update(p).label for p in (0.71, 0.6999, 0.70)] == ["medium", "low", "medium"]


def test_on_change_callbacks_see_each_real_change():
    seen = []
    deg = Degradation(on_change=lambda old, new, p: seen.append((old.label, new.label, p)))
    deg.on_change.append(lambda old, new, p: seen.append("second"))
    for p in (0.5, 0.82, 0.81, 0.95, 0.2):
        deg.update(p)
    assert seen == [("low", "high", 0.82), "second", ("high", "emergency", 0.95), "second",
                    ("emergency", "low", 0.2), "second"]


# -- policies -----------------------------------------------------------------------------


def test_default_policies():
    table = {level.label: (p.max_tokens_factor, p.top_p_cap, p.temperature_cap, p.max_batch_size_factor,
                           p.refuse_new_sessions) for level, p in DEFAULT_POLICIES.items()}
    assert table == {
        "low": (1.0, 1.0, None, 1.0, False),
        "medium": (0.9, 0.95, None, 1.0, False),
        "high": (0.7, 0.9, 1.0, 0.75, False),
        "critical": (0.5, 0.85, 0.8, 0.5, False),
        "emergency": (0.3, 0.8, 0.7, 0.25, True),
    }


@pytest.mark.parametrize("pressure,expected", [
    (0.1, Applied(100, 1.2, 1.0, False, "low")),
    (0.75, Applied(90, 1.2, 0.95, True, "medium")),
    (0.82, Applied(70, 1.0, 0.9, True, "high")),
    (0.87, Applied(50, 0.8, 0.85, True, "critical")),
    (0.99, Applied(30, 0.7, 0.8, True, "emergency")),
])
def test_apply_gives_hand_computed_numbers(pressure, expected):
    deg = Degradation()
    deg.update(pressure)
    assert deg.apply(max_tokens=100, temperature=1.2, top_p=1.0) == expected


def test_apply_edge_cases():
    deg = Degradation()
    assert deg.apply(7) == Applied(7, None, None, False, "low")
    deg.update(0.95)  # emergency: x0.3, top_p <= 0.8, temperature <= 0.7
    assert deg.apply(1).max_tokens == 1  # 0.3 rounds down to 0, but a request asking 1 gets 1
    assert deg.apply(3).max_tokens == 1  # floor(0.9)
    assert deg.apply(10).max_tokens == 3
    assert deg.apply(0).max_tokens == 0
    assert deg.apply(100, temperature=0.2, top_p=0.5) == Applied(30, 0.2, 0.5, True, "emergency")
    assert deg.apply(100) == Applied(30, 0.7, 0.8, True, "emergency")  # absent -> the cap
    # below the caps and 1 token: nothing changes, so it is not reported as degraded
    assert deg.apply(1, temperature=0.5, top_p=0.5) == Applied(1, 0.5, 0.5, False, "emergency")


def test_factor_as_written():
    deg = Degradation(policies={"medium": DegradationPolicy(max_tokens_factor=0.29)})
    deg.update(0.75)
    assert deg.apply(100).max_tokens == 29  # 100 * 0.29 is 28.999999999999996 in binary


def test_max_batch_size():
    assert DEFAULT_POLICIES[Level.HIGH].max_batch_size(32) == 24
    assert DEFAULT_POLICIES[Level.EMERGENCY].max_batch_size(32) == 8
    assert DEFAULT_POLICIES[Level.EMERGENCY].max_batch_size(2) == 1
    with pytest.raises(ValueError, match="batch_size"):
        DEFAULT_POLICIES[Level.LOW].max_batch_size(0)


def test_custom_policy_and_refusal():
    strict = DegradationPolicy(max_tokens_factor=0.5, refuse_new_sessions=True)
    deg = Degradation(policies={Level.HIGH: strict})
    deg.update(0.81)
    assert deg.policy is strict and deg.policy_for("high") is strict
    assert deg.policy.refuse_new_sessions
    assert not deg.policy_for(Level.CRITICAL).refuse_new_sessions


# -- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("thresholds,match", [
    ({"high": 0.6}, r"thresholds\['high'\].*must be above thresholds\['medium'\]"),
    ({"critical": 0.80}, r"thresholds\['critical'\].*must be above thresholds\['high'\]"),
    ({"emergency": 1.0}, r"thresholds\['emergency'\] must be in \(0, 1\), got 1.0"),
    ({"medium": 0.0}, r"thresholds\['medium'\] must be in"),
    ({"medium": -0.1}, r"thresholds\['medium'\] must be in"),
    ({"high": float("nan")}, r"thresholds\['high'\] must be a number"),
    ({"high": "0.8"}, r"thresholds\['high'\] must be a number"),
    ({"severe": 0.8}, r"thresholds: unknown level 'severe'"),
    ({"low": 0.1}, r"thresholds\['low'\]"),
])
def test_bad_thresholds_name_the_key(thresholds, match):
    with pytest.raises(ValueError, match=match):
        Degradation(thresholds=thresholds)


@pytest.mark.parametrize("kwargs,match", [
    ({"hysteresis": -0.01}, "hysteresis"),
    ({"hysteresis": 1.5}, "hysteresis"),
    ({"policies": {"high": 0.5}}, r"policies\['high'\] must be a DegradationPolicy"),
    ({"policies": {"extreme": DegradationPolicy()}}, "policies: unknown level"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Degradation(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"max_tokens_factor": 0.0}, "max_tokens_factor"),
    ({"max_tokens_factor": 1.5}, "max_tokens_factor"),
    ({"top_p_cap": 0}, "top_p_cap"),
    ({"max_batch_size_factor": -1}, "max_batch_size_factor"),
    ({"temperature_cap": -0.1}, "temperature_cap"),
    ({"temperature_cap": float("inf")}, "temperature_cap"),
    ({"refuse_new_sessions": 1}, "refuse_new_sessions"),
])
def test_bad_policy_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DegradationPolicy(**kwargs)


@pytest.mark.parametrize("pressure", [-0.1, float("nan"), float("inf"), True, "0.5", None])
def test_bad_pressure(pressure):
    with pytest.raises(ValueError, match="pressure"):
        Degradation().update(pressure)


@pytest.mark.parametrize("kwargs,match", [
    ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": 10, "temperature": -1.0}, "temperature"),
    ({"max_tokens": 10, "temperature": float("inf")}, r"temperature must be in \[0, inf\)"),
    ({"max_tokens": 10, "top_p": 1.1}, "top_p"),
])
def test_bad_request_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Degradation().apply(**kwargs)


def test_import_stays_light():
    code = "import sys, memwarden.controller.degradation; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


# -- properties ---------------------------------------------------------------------------

pressures = st.lists(st.floats(0.0, 1.2, allow_nan=False), max_size=60)
hysteresis_values = st.sampled_from([0.0, 0.01, 0.02, 0.05, 0.2])


def reference_step(level: int, pressure: float, thresholds: list[float], hysteresis: float) -> int:
    """The spec, one level at a time: climb while the next threshold is reached; otherwise
    descend while below the current threshold minus hysteresis."""
    climbed = level
    while climbed < 4 and pressure >= thresholds[climbed + 1]:
        climbed += 1
    if climbed > level:
        return climbed
    while level > 0 and pressure < thresholds[level] - hysteresis:
        level -= 1
    return level


@settings(max_examples=150, deadline=None)
@given(pressures, hysteresis_values)
def test_level_stays_within_one_band_of_the_pressure(sequence, hysteresis):
    deg = Degradation(hysteresis=hysteresis)
    thresholds = [0.0, *deg.thresholds.values()]
    expected, changes = 0, 0
    for pressure in sequence:
        level = deg.update(pressure)
        raw = deg.level_for(pressure)
        # either the pressure's own level, or above it only while inside that level's band
        assert level >= raw
        assert level == raw or pressure >= thresholds[level] - hysteresis
        new = reference_step(expected, pressure, thresholds, hysteresis)
        changes += new != expected
        expected = new
        assert level == expected and deg.level is level and deg.policy is deg.policy_for(level)
    assert sum(deg.transitions.values()) == changes


@settings(max_examples=100, deadline=None)
@given(pressures)
def test_transitions_and_callbacks_count_only_real_changes(sequence):
    calls = []
    deg = Degradation(on_change=lambda old, new, p: calls.append((old, new)))
    history = [Level.LOW] + [deg.update(p) for p in sequence]
    real = [(old, new) for old, new in zip(history, history[1:]) if old != new]
    assert calls == real
    for level in Level:
        assert deg.transitions[level] == sum(1 for _, new in real if new == level)
