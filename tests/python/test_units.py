import pytest

from memwarden._units import format_bytes, parse_bytes


@pytest.mark.parametrize("text,value", [("16GiB", 16 * 2**30), ("16 GB", 16 * 10**9), ("1.5 MiB", 1572864),
                                        (1024, 1024), (2.0e3, 2000), ("512B", 512), ("2gib", 2 * 2**30)])
def test_parse(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["-1GiB", -5, "12 parsecs", "", "512", True, None, float("nan")])
def test_parse_rejects(bad):
    with pytest.raises(ValueError, match="max_memory"):
        parse_bytes(bad, "max_memory")


def test_string_without_unit_shows_the_expected_form():
    with pytest.raises(ValueError, match=r"cannot parse size '512': give a unit, e\.g\. '48GiB'"):
        parse_bytes("512")


def test_format():
    assert format_bytes(3 * 2**20) == "3.00 MiB"
    assert format_bytes(100) == "100 B"
    assert format_bytes(3 * 2**20, digits=1) == "3.0 MiB"
    assert format_bytes(-2**30, digits=1) == "-1.0 GiB" and format_bytes(2**20, signed=True, digits=1) == "+1.0 MiB"


def test_byte_unit_is_the_unit_format_bytes_picks():
    from memwarden._units import byte_unit

    for n in (0, 1023, 1024, 3 * 2**20, 5 * 2**30, 2**50):
        divisor, name = byte_unit(n)
        assert format_bytes(n).endswith(name) and divisor == {"B": 1, "KiB": 2**10, "MiB": 2**20,
                                                              "GiB": 2**30, "TiB": 2**40}[name]
