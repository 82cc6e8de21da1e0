"""bench/static_speed.py's command-line parsing and paired ratios (the timing itself lives in bench/)."""

from __future__ import annotations

import pytest

from bench.static_speed import paired_ratio, parse_variant


def test_parse_variant_reads_python_literals():
    assert parse_variant("plain=onednn=False") == ("plain", {"onednn": False})
    assert parse_variant("se=float_unit_maps=True,fuse_add=True") == ("se", {"float_unit_maps": True,
                                                                             "fuse_add": True})


@pytest.mark.parametrize("text, message", [
    ("plain", "NAME=OPTION=VALUE"),
    ("plain=onednn", "is not OPTION=VALUE"),
    ("plain=onednn=Flase", "is not a Python literal"),
    ("plain=1x=True", "is not OPTION=VALUE"),
])
def test_parse_variant_rejects_malformed_text(text, message):
    with pytest.raises(ValueError, match=message):
        parse_variant(text)


def test_paired_ratio_pairs_samples_in_groups():
    slow = [2.0, 2.0, 4.0, 4.0, 6.0, 6.0]
    fast = [1.0, 1.0, 1.0, 1.0, 2.0, 2.0]
    med, q1, q3 = paired_ratio(slow, fast, group=2)
    assert med == pytest.approx(3.0) and q1 <= med <= q3
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])
