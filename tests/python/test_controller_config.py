"""MemwardenConfig: layers (defaults < TOML file < environment < overrides) and the sources
they record, parsing per kind, and errors that name the key and where it came from."""
from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings, strategies as st

from memwarden.controller.config import ConfigError, MemwardenConfig

MIB, GIB = 2**20, 2**30


def write(tmp_path, text: str):
    path = tmp_path / "memwarden.toml"
    path.write_text(text)
    return path


# ---- defaults and layers ------------------------------------------------------------------

def test_defaults():
    config = MemwardenConfig.load(env={})
    assert config == MemwardenConfig()
    assert config.sessions.per_session_limit == 512 * MIB and config.sessions.global_limit == 20 * GIB
    assert config.admission.policy == "memwarden" and config.admission.queue_limit == 64
    assert config.degradation.thresholds == (0.70, 0.80, 0.85, 0.90)
    assert config.degradation.max_tokens_factors == (1.0, 0.9, 0.7, 0.5, 0.3)
    assert config.monitor.thresholds == (0.75, 0.85, 0.95)
    assert config.server.host == "127.0.0.1" and config.server.port == 8000
    assert set(config.sources().values()) == {"default"}


def test_each_layer_overrides_the_one_before(tmp_path):
    path = write(tmp_path, """
        [sessions]
        idle_timeout = 10
        global_limit = "8GiB"
        per_session_limit = "1GiB"
        [server]
        port = 9000
    """)
    env = {"MEMWARDEN_SESSIONS_IDLE_TIMEOUT": "20", "MEMWARDEN_SESSIONS_GLOBAL_LIMIT": "4 GiB"}
    config = MemwardenConfig.load(path, env=env, overrides={"sessions.idle_timeout": 30,
                                                            "server.port": None})
    assert config.sessions.idle_timeout == 30.0  # override over env over file
    assert config.sessions.global_limit == 4 * GIB  # env over file
    assert config.sessions.per_session_limit == GIB and config.server.port == 9000  # file
    sources = config.sources()
    assert sources["sessions.idle_timeout"] == "override"
    assert sources["sessions.global_limit"] == "env MEMWARDEN_SESSIONS_GLOBAL_LIMIT"
    assert sources["sessions.per_session_limit"] == f"file {path}"
    assert sources["server.port"] == f"file {path}"  # a None override is a flag not given
    assert sources["monitor.interval"] == "default"


def test_describe_shows_values_and_sources(tmp_path):
    config = MemwardenConfig.load(env={"MEMWARDEN_SERVER_MAX_MEMORY": "12GiB"},
                                  overrides={"degradation.thresholds": "0.5,0.6,0.7,0.8"})
    lines = config.describe().splitlines()
    assert lines[0] == "memwarden configuration"
    row = next(line.split() for line in lines if "server.max_memory" in line)
    assert row == ["server.max_memory", "12.00", "GiB", "env", "MEMWARDEN_SERVER_MAX_MEMORY"]
    row = next(line for line in lines if "degradation.thresholds" in line)
    assert "0.5, 0.6, 0.7, 0.8" in row and row.endswith("override")
    assert len(lines) == 2 + len(config.sources())


def test_to_dict_holds_bytes_and_lists():
    tree = MemwardenConfig.load(env={"MEMWARDEN_ALLOCATOR_CPU_MEMORY_LIMIT": "2GiB"}).to_dict()
    assert tree["allocator"]["cpu_memory_limit"] == 2 * GIB and tree["allocator"]["cuda_memory_limit"] is None
    assert tree["degradation"]["thresholds"] == [0.70, 0.80, 0.85, 0.90]
    assert list(tree) == ["allocator", "admission", "sessions", "degradation", "monitor", "server"]


def test_other_memwarden_variables_are_not_config():
    config = MemwardenConfig.load(env={"MEMWARDEN_CUDA": "OFF", "MEMWARDEN_FUZZ_LONG": "1", "HOME": "/"})
    assert set(config.sources().values()) == {"default"}


def test_construction_parses_and_validates():
    config = MemwardenConfig(sessions=MemwardenConfig().sessions.__class__(global_limit="1GiB"))
    assert config.sessions.global_limit == GIB and config.sources()["sessions.global_limit"] == "given"
    with pytest.raises(ConfigError, match=r"given sessions\.idle_timeout: must be positive"):
        dataclasses.replace(config, sessions=dataclasses.replace(config.sessions, idle_timeout=0))


# ---- parsing ------------------------------------------------------------------------------

@pytest.mark.parametrize("variable,text,section,key,value", [
    ("MEMWARDEN_SERVER_ALLOW_REMOTE", "yes", "server", "allow_remote", True),
    ("MEMWARDEN_SERVER_ALLOW_REMOTE", "Off", "server", "allow_remote", False),
    ("MEMWARDEN_SERVER_MODEL", "none", "server", "model", None),
    ("MEMWARDEN_SERVER_MODEL", "Qwen/Qwen3-0.6B", "server", "model", "Qwen/Qwen3-0.6B"),
    ("MEMWARDEN_ADMISSION_ROUTE_ABOVE_TOKENS", " 8192 ", "admission", "route_above_tokens", 8192),
    ("MEMWARDEN_ADMISSION_ROUTE_ABOVE_TOKENS", "", "admission", "route_above_tokens", None),
    ("MEMWARDEN_ALLOCATOR_MAX_SPLIT_SIZE", "64MB", "allocator", "max_split_size", 64 * 10**6),
    ("MEMWARDEN_DEGRADATION_MAX_TOKENS_FACTORS", "1, 0.8, 0.6, 0.4, 0.2", "degradation",
     "max_tokens_factors", (1.0, 0.8, 0.6, 0.4, 0.2)),
])
def test_environment_text_is_parsed_to_the_key_type(variable, text, section, key, value):
    pool = {"MEMWARDEN_ADMISSION_UPSTREAM_URL": "http://127.0.0.1:9"} if text.strip() and "ROUTE" in variable else {}
    config = MemwardenConfig.load(env={variable: text, **pool})  # routing needs a pool to route to
    assert getattr(getattr(config, section), key) == value


@settings(max_examples=60, deadline=None)
@given(st.floats(0.001, 1e6, allow_nan=False))
def test_a_number_reads_the_same_from_env_and_file(tmp_path_factory, seconds):
    path = write(tmp_path_factory.mktemp("toml"), f"[sessions]\nidle_timeout = {seconds!r}\n")
    from_file = MemwardenConfig.load(path, env={}).sessions.idle_timeout
    env = {"MEMWARDEN_SESSIONS_IDLE_TIMEOUT": repr(seconds)}
    from_env = MemwardenConfig.load(env=env).sessions.idle_timeout
    assert from_file == from_env == seconds


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2**40), st.sampled_from(["B", "KiB", "MB", "GiB", " MiB"]))
def test_a_size_reads_the_same_from_env_file_and_override(tmp_path_factory, number, unit):
    text = f"{number}{unit}"
    path = write(tmp_path_factory.mktemp("toml"), f'[server]\nmax_memory = "{text}"\n')
    values = {MemwardenConfig.load(path, env={}).server.max_memory,
              MemwardenConfig.load(env={"MEMWARDEN_SERVER_MAX_MEMORY": text}).server.max_memory,
              MemwardenConfig.load(env={}, overrides={"server.max_memory": text}).server.max_memory}
    assert len(values) == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.01, 1.0), min_size=1, max_size=6, unique=True).map(sorted))
def test_any_increasing_thresholds_round_trip(thresholds):
    gaps = [b - a for a, b in zip([0.0, *thresholds], thresholds)]
    overrides = {"degradation.thresholds": ",".join(map(repr, thresholds)),
                 "degradation.max_tokens_factors": [1.0] * (len(thresholds) + 1),
                 "degradation.hysteresis": min(gaps) / 2}
    config = MemwardenConfig.load(env={}, overrides=overrides)
    assert config.degradation.thresholds == tuple(thresholds)
    assert config.to_dict()["degradation"]["thresholds"] == thresholds


# ---- errors name the key and the source ---------------------------------------------------

@pytest.mark.parametrize("text,message", [
    ("[sesions]\nidle_timeout = 1", r"\[sesions\]: unknown section.*did you mean 'sessions'"),
    ("[sessions]\nidle_timout = 1", r"\[sessions\] idle_timout: unknown key.*did you mean 'idle_timeout'"),
    ("[sessions]\nidle_timeout = 'soon'", r"\[sessions\] idle_timeout: expected a finite number"),
    ("[sessions]\nidle_timeout = -5", r"\[sessions\] idle_timeout: must be positive"),
    ("[sessions]\nper_session_limit = '512'", r"\[sessions\] per_session_limit: cannot parse"),
    ("[server]\nport = 70000", r"\[server\] port: must be a TCP port"),
    ("[server]\nport = 80.5", r"\[server\] port: expected an integer"),
    ("[server]\nallow_remote = 'yes'", r"\[server\] allow_remote: expected true or false"),
    ("[admission]\npolicy = 'greedy'", r"\[admission\] policy: must be one of memwarden, reserve"),
    ("[admission]\nupstream_url = 'ftp://x'", r"\[admission\] upstream_url: must be an http\(s\) URL"),
    ("[degradation]\nthresholds = [0.8, 0.7, 0.9, 0.95]", r"\[degradation\] thresholds: must be increasing"),
    ("[degradation]\nmax_tokens_factors = [1.0, 0.5]",
     r"\[degradation\] max_tokens_factors; default degradation\.thresholds: .*5 for 4 thresholds"),
    ("[degradation]\nhysteresis = 0.05", r"\[degradation\] hysteresis.*gap below every threshold"),
    ("[monitor]\nwarning = 0.9", r"\[monitor\] warning; default monitor.critical"),
    ("[monitor]\nemergency = 1.5", r"\[monitor\] emergency: must be a fraction in \(0, 1\]"),
    ("[monitor]\nhistory = 0", r"\[monitor\] history: must be >= 1"),
    ("sessions = 5", r"sessions: expected a \[sessions\] table"),
    ("[sessions\n", r"not valid TOML"),
])
def test_file_errors_name_the_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as error:
        MemwardenConfig.load(path, env={})
    assert str(path) in str(error.value)


@pytest.mark.parametrize("variable,text,message", [
    ("MEMWARDEN_SESSIONS_IDLE_TIMEOUT", "abc", "expected a finite number, got 'abc'"),
    ("MEMWARDEN_SESSIONS_IDLE_TIMEOUT", "inf", "expected a finite number"),
    ("MEMWARDEN_SESSIONS_IDLE_TIMOUT", "1", "unknown key 'idle_timout'"),
    ("MEMWARDEN_SESSIONS_PER_SESSION_LIMIT", "512", "give a unit"),
    ("MEMWARDEN_ALLOCATOR_MAX_SPLIT_SIZE", "1.5e9", "give a unit"),  # exponent form too
    ("MEMWARDEN_SESSIONS_PER_SESSION_LIMIT", "30GiB", "exceeds global_limit"),
    ("MEMWARDEN_SERVER_PORT", "http", "expected an integer"),
    ("MEMWARDEN_SERVER_ALLOW_REMOTE", "maybe", "expected one of true/"),
    ("MEMWARDEN_MONITOR_SPIKE_RESERVE", "1", r"must be a fraction in \[0, 1\)"),
    ("MEMWARDEN_DEGRADATION_THRESHOLDS", "0.7,x", "expected comma-separated numbers"),
])
def test_environment_errors_name_the_variable(variable, text, message):
    with pytest.raises(ConfigError, match=message) as error:
        MemwardenConfig.load(env={variable: text})
    assert str(error.value).startswith(variable)


@pytest.mark.parametrize("overrides,message", [
    ({"sessions.idle_timeout": "never"}, r"override sessions\.idle_timeout: expected a finite number"),
    ({"sessions.idle_timeout": math.nan}, r"override sessions\.idle_timeout: expected a finite number"),
    ({"sesions.idle_timeout": 1}, r"override 'sesions\.idle_timeout': unknown section"),
    ({"sessions.idle": 1}, r"override sessions\.idle: unknown key 'idle'"),
    ({"sessions": 1}, r"override sessions: unknown key ''"),
    ({"server.port": True}, r"override server\.port: expected an integer"),
])
def test_override_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        MemwardenConfig.load(env={}, overrides=overrides)


def test_a_toml_integer_size_is_bytes(tmp_path):
    path = write(tmp_path, "[sessions]\nper_session_limit = 512\n")  # typed: no unit needed
    assert MemwardenConfig.load(path, env={}).sessions.per_session_limit == 512


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the configuration file"):
        MemwardenConfig.load(tmp_path / "absent.toml", env={})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ---- remote binding -----------------------------------------------------------------------

@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "example.org"])
def test_remote_host_needs_allow_remote(host):
    refused = r"MEMWARDEN_SERVER_HOST; default server\.allow_remote: .*allow_remote = true"
    with pytest.raises(ConfigError, match=refused):
        MemwardenConfig.load(env={"MEMWARDEN_SERVER_HOST": host})
    config = MemwardenConfig.load(env={"MEMWARDEN_SERVER_HOST": host,
                                       "MEMWARDEN_SERVER_ALLOW_REMOTE": "true"})
    assert config.server.host == host and config.server.allow_remote


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.0.1", "localhost", "::1", "[::1]"])
def test_loopback_hosts_need_nothing(host):
    assert MemwardenConfig.load(env={}, overrides={"server.host": host}).server.host == host
