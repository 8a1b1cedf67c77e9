"""Property-based fuzzing of the per-request switch (``vllm_xargs.nanospec`` -> ``SamplingParams.extra_args``).

Values: anything JSON can carry (null, booleans, integers of any size, floats incl. NaN/inf, unicode strings
incl. the documented switch words with random case and padding, lists, nested objects). Properties, against the
documented contract (``docs/configuration.md``: bool, 0/1, or true/false/on/off/yes/no), not the implementation:

* ``parse_switch`` returns a bool or raises ``ValueError`` naming ``nanospec``, nothing else;
* ``request_enabled`` (the worker's reading) never raises: the switch when valid, else the engine default;
* through vLLM's real ``SamplingParams`` (with the register applied): valid values construct, invalid ones raise
  ``VLLMValidationError`` with ``parameter == "vllm_xargs.nanospec"`` (what the OpenAI server turns into HTTP 400),
  or vLLM's own ``parameter == "extra_args"`` for integers beyond 64 bits (checked first).
"""

from __future__ import annotations

import math
import types
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanospec_vllm.config import parse_switch, request_enabled

WORDS_ON, WORDS_OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")

scalars = (st.none() | st.booleans() | st.integers() | st.integers(-3, 3)
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1.0, -0.0, 0.5, 1.0000001])
           | st.text(max_size=12))
switch_words = st.builds(
    lambda w, case, pad_l, pad_r: pad_l + "".join(c.upper() if f else c for c, f in zip(w, case)) + pad_r,
    st.sampled_from(WORDS_ON + WORDS_OFF + ("ye", "tru", "onn", "2", "-1", "yes!", "n o")),
    st.lists(st.booleans(), min_size=5, max_size=5),
    st.sampled_from(["", " ", "\t", "\n ", "\u00a0"]), st.sampled_from(["", " ", "\r\n"]),
)
json_like = st.recursive(scalars | switch_words,
                         lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids,
                                                                                    max_size=4),
                         max_leaves=8)


def expected(value: Any) -> bool | None:
    """The documented contract, written independently of ``config.py``: the switch's value, or None = invalid."""
    if value is True or value is False:
        return value
    if type(value) in (int, float) and not (isinstance(value, float) and math.isnan(value)):
        if value == 1:
            return True
        if value == 0:
            return False
        return None
    if isinstance(value, str):
        w = value.strip().lower()
        return True if w in WORDS_ON else False if w in WORDS_OFF else None
    return None


@settings(max_examples=3000, deadline=None, derandomize=True, database=None)
@given(json_like)
def test_parse_switch_total(value):
    want = expected(value)
    try:
        got = parse_switch(value)
    except ValueError as e:
        assert want is None, f"{value!r} is valid (-> {want}) but was refused: {e}"
        assert "nanospec" in str(e)
        return
    assert want is not None, f"{value!r} is invalid but parsed as {got!r}"
    assert got is want


@settings(max_examples=2000, deadline=None, derandomize=True, database=None)
@given(st.one_of(st.none(), st.dictionaries(st.text(max_size=8), json_like, max_size=3),
                 st.builds(lambda v, rest: {**rest, "nanospec": v}, json_like,
                           st.dictionaries(st.text(max_size=8), json_like, max_size=2))),
       st.booleans())
def test_request_enabled_never_raises(extra, default):
    got = request_enabled(types.SimpleNamespace(extra_args=extra), default)
    assert isinstance(got, bool)
    if not extra or "nanospec" not in extra:
        assert got is default
    else:
        want = expected(extra["nanospec"])
        assert got is (default if want is None else want)


def _has_int_beyond_64_bits(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not -(2**63) <= value < 2**64
    if isinstance(value, dict):
        return any(_has_int_beyond_64_bits(x) for x in (*value.keys(), *value.values()))
    if isinstance(value, list):
        return any(_has_int_beyond_64_bits(x) for x in value)
    return False


@pytest.fixture(scope="module")
def sampling_params():
    pytest.importorskip("vllm")
    from vllm import SamplingParams

    from nanospec_vllm.vllm.patches import apply_all

    # the switch is checked only in a process where a NanoSpec engine was configured (the config patch sets this)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOSPEC_ENGINE", "1")
        apply_all()
        yield SamplingParams


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(json_like)
def test_vllm_sampling_params_reject_bad_switch_naming_it(sampling_params, value):
    from vllm.exceptions import VLLMValidationError

    want = expected(value)
    try:
        sp = sampling_params(max_tokens=4, extra_args={"nanospec": value})
    except VLLMValidationError as e:
        assert want is None, f"{value!r} is valid but vLLM refused it: {e}"
        if e.parameter == "extra_args":  # vLLM's own check, first: integers its msgpack transport cannot carry
            assert _has_int_beyond_64_bits(value) and "extra_args" in str(e)
        else:
            assert e.parameter == "vllm_xargs.nanospec" and "nanospec" in str(e)
        return
    assert want is not None, f"{value!r} is invalid but SamplingParams accepted it"
    assert request_enabled(sp, not want) is want
