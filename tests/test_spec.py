"""The SPEC parser: property tests (hypothesis) against an independent formatter and predicate."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.errors import WorkbenchError
from workbench.probes.interventions import format_spec, parse_spec, parse_values

pairs = st.lists(st.tuples(st.integers(0, 200), st.integers(-1, 300)), max_size=12)


def _dedup(xs):
    out = []
    for x in xs:
        if x not in out:
            out.append(x)
    return out


@given(pairs)
def test_roundtrip(xs):
    text = ",".join(f"L{a}:E{b}" for a, b in xs)  # written by hand, not by format_spec
    assert parse_spec(text) == _dedup(xs)
    assert format_spec(parse_spec(text)) == ",".join(f"L{a}:E{b}" for a, b in _dedup(xs))
    assert parse_spec(xs) == _dedup(xs)


@given(pairs.filter(bool), st.sampled_from(["", " ", "  ", "\t"]), st.booleans())
def test_whitespace_and_case_do_not_matter(xs, ws, lower):
    text = f"{ws},{ws}".join(f"{ws}L{a}{ws}:{ws}E{b}{ws}" for a, b in xs)
    if lower:
        text = text.lower()
    assert parse_spec(text) == _dedup(xs)


@given(st.text(max_size=30))
def test_garbage_is_a_workbench_error_or_a_valid_list(text):
    try:
        out = parse_spec(text)
    except WorkbenchError as e:
        assert "\n" not in str(e)
        return
    assert all(isinstance(a, int) and isinstance(b, int) and a >= 0 and b >= -1 for a, b in out)
    # if it parsed, it is a comma list of L<int>:E<int> items
    assert not text.strip() or all(item.strip() for item in text.split(","))


@pytest.mark.parametrize("bad", ["L3", "E4", "L3:E", "L-1:E2", "L3:E-2", "L3:E1,,L4:E2", "3:4", "L3:E1;L4:E2",
                                 "L3.0:E1", "layer3:E1", ","])
def test_malformed_examples(bad):
    with pytest.raises(WorkbenchError, match="malformed"):
        parse_spec(bad)


def test_values_in_plain_spec_are_refused():
    with pytest.raises(WorkbenchError, match="takes no values"):
        parse_spec("L1:E2=0.5", what="--ban")


@given(st.dictionaries(st.tuples(st.integers(0, 60), st.integers(-1, 60)),
                       st.floats(-100, 100, allow_nan=False), max_size=8),
       st.floats(-5, 5, allow_nan=False))
def test_values_roundtrip(d, default):
    text = ",".join(f"L{a}:E{b}={v!r}" for (a, b), v in d.items())
    assert parse_values(text, default=default) == d
    assert parse_values({f"L{a}:E{b}": v for (a, b), v in d.items()}) == d
    assert parse_values(d) == d
    plain = ",".join(f"L{a}:E{b}" for a, b in d)
    assert parse_values(plain, default=default) == {k: default for k in d}


def test_values_errors():
    with pytest.raises(WorkbenchError, match="is not a number"):
        parse_values("L1:E2=x")
    with pytest.raises(WorkbenchError, match="must be finite"):
        parse_values({"L1:E2": float("inf")})
    with pytest.raises(WorkbenchError, match="needs a value per expert"):
        parse_values("L1:E2", default=None, what="--scale")
    assert parse_values("L1:E2=1,L1:E2=3") == {(1, 2): 3.0}  # the last value wins


@settings(max_examples=60, deadline=None)
@given(layer=st.integers(0, 6), expert=st.integers(-1, 10))
def test_validation_against_the_model(tiny_model, layer, expert):
    mm = tiny_model("deepseek_v2")  # 4 layers, layer 0 dense, 8 experts, one shared expert
    valid = 1 <= layer <= 3 and -1 <= expert <= 7
    if valid:
        assert parse_spec(f"L{layer}:E{expert}", mm) == [(layer, expert)]
    else:
        with pytest.raises(WorkbenchError) as ei:
            parse_spec(f"L{layer}:E{expert}", mm, what="--ban")
        msg = str(ei.value)
        if layer > 3:
            assert "does not exist" in msg
        elif layer == 0:
            assert "dense layer" in msg
        else:
            assert "out of range" in msg


# The CLI checks SPEC syntax before torch loads (workbench.options.expert_spec); it must accept exactly
# what the interventions parser accepts, so an early refusal never blocks a good SPEC (and vice versa).
_spec_text = st.one_of(
    st.text(alphabet="LlEe:,=-0123456789. \t", max_size=24),
    st.lists(st.tuples(st.integers(0, 99), st.integers(-2, 99), st.sampled_from(["", "=0.5", "=-1", "=x", "=nan", "="])),
             min_size=1, max_size=4).map(lambda xs: ",".join(f"L{a}:E{b}{v}" for a, b, v in xs)))


def _cli_accepts(text, valued):
    import argparse

    from workbench.options import expert_spec

    try:
        expert_spec(valued)(text)
        return True
    except argparse.ArgumentTypeError as e:
        assert "\n" not in str(e)
        return False


@settings(max_examples=300)
@given(_spec_text)
def test_cli_syntax_check_agrees_with_the_parser(text):
    try:
        parse_spec(text, what="--ban")
        plain = bool(text.strip())  # the CLI refuses an empty SPEC outright
    except WorkbenchError:
        plain = False
    assert _cli_accepts(text, valued=False) == plain, text
    try:
        parse_values(text, what="--boost")
        valued = bool(text.strip())
    except WorkbenchError:
        valued = False
    assert _cli_accepts(text, valued=True) == valued, text
