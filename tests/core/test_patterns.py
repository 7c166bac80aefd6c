# SPDX-License-Identifier: Apache-2.0
"""peftreg.patterns: user- and file-supplied regexes run in bounded time (issue 12, part 4)."""

from __future__ import annotations

import time

import pytest

from peftreg import patterns
from peftreg.errors import ConfigError
from peftreg.patterns import UnsafePatternError, compile_pattern
from peftreg_plugins.lora import LoraConfig

PATH = "model.layers.0.self_attn.q_proj" * 4   # long enough to hang a backtracking engine
HOSTILE = [r"((\w|\.)+)+!", r"(a+)+$", r"(x|x)*y", r"(\w+\.?)*!", r"(a|aa)+b"]
SAFE = {r".*\.q_proj": True, r".*\.(q_proj|v_proj)": True, r"model\.layers\.\d+\.mlp": False,
        r"(?:.*\.)?(?:q_proj)": True, r"q_proj": False}
BOUNDED_SECONDS = 5.0


@pytest.fixture(params=["re2", "fallback"])
def engine(request, monkeypatch):
    if request.param == "re2":
        if not patterns.has_linear_time_engine():
            pytest.skip("google-re2 is not installed on this platform")
    else:
        monkeypatch.setattr(patterns, "_re2", None)
    compile_pattern.cache_clear()
    yield request.param
    compile_pattern.cache_clear()


@pytest.mark.parametrize("pattern", HOSTILE)
def test_hostile_patterns_never_hang(engine, pattern):
    start = time.monotonic()
    try:
        matched = compile_pattern(pattern, "target_modules").fullmatch(PATH)
    except UnsafePatternError as exc:
        assert engine == "fallback", "RE2 runs these in linear time"
        assert "target_modules" in str(exc) and repr(pattern) in str(exc)
        assert "exponential" in str(exc)
    else:
        assert matched is None
    assert time.monotonic() - start < BOUNDED_SECONDS


@pytest.mark.parametrize(("pattern", "expected"), list(SAFE.items()))
def test_ordinary_patterns_match_as_python_does(engine, pattern, expected):
    assert (compile_pattern(pattern).fullmatch("model.layers.0.self_attn.q_proj") is not None
            ) is expected


def test_backreferences_are_refused_without_an_engine_that_can_bound_them(engine):
    with pytest.raises(UnsafePatternError, match="backreference"):
        compile_pattern(r"(q)_\1", "target_modules")


def test_invalid_patterns_name_the_field(engine):
    with pytest.raises(UnsafePatternError, match="exclude_modules: invalid regular expression"):
        compile_pattern(r"(unclosed", "exclude_modules")


def test_configs_refuse_hostile_patterns_by_field(monkeypatch):
    monkeypatch.setattr(patterns, "_re2", None)
    compile_pattern.cache_clear()
    try:
        for field, value in (("target_modules", HOSTILE[0]), ("exclude_modules", HOSTILE[1]),
                             ("layers_pattern", HOSTILE[2]), ("rank_pattern", {HOSTILE[0]: 4}),
                             ("alpha_pattern", {HOSTILE[0]: 4.0})):
            with pytest.raises(ConfigError, match=f"LoraConfig.{field}"):
                LoraConfig(**{field: value})
    finally:
        compile_pattern.cache_clear()
