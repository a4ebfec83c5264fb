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
