import pytest

from adapterkit import InvalidName, parse_ref, validate_name


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "a\\b", "x" * 300, "..", ".hidden", "a..b",
                                 "-x", "with space", "a@b@c"])
def test_bad_names_are_refused(bad):
    with pytest.raises(InvalidName):
        parse_ref(bad)


@pytest.mark.parametrize("good", ["triage", "Triage_2", "law.v1", "a-b", "x" * 100])
def test_good_names(good):
    assert validate_name(good) == good


def test_refs():
    assert parse_ref("triage").version is None
    assert parse_ref("triage@3").version == 3
    assert str(parse_ref("triage@3")) == "triage@3"
    for bad in ("triage@", "triage@0", "triage@x", "triage@-1"):
        with pytest.raises(InvalidName):
            parse_ref(bad)


@pytest.mark.parametrize("bad", ["x@²", "x@١", "x@１", "x@+1", "x@1 ", "x@1\n", "x@00",
                                 "x@1000000001", "x@99999999999999999999999", "x@" + "9" * 5000])
def test_versions_are_ascii_digits_up_to_a_billion(bad):
    with pytest.raises(InvalidName, match="invalid version"):
        parse_ref(bad)


def test_largest_version_and_leading_zeros():
    assert parse_ref("x@1000000000").version == 10**9
    assert parse_ref("x@007").version == 7
