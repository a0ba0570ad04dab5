"""The LDIF writer: RFC 2849 SAFE-STRING rules, base64, folding; RFC 4514 DN escaping."""

import base64

import pytest

from vmwn.grid import ldif


def read_ldif(text):
    """Minimal RFC 2849 reader for checking the writer: [(dn, [(attr, value)])]."""
    assert text.endswith("\n")
    records = []
    for block in text.split("\n\n"):
        logical = []
        for line in block.split("\n"):
            if not line:
                continue
            if line.startswith(" "):
                logical[-1] += line[1:]
            else:
                logical.append(line)
        pairs = []
        for line in logical:
            attr, _, rest = line.partition(":")
            if rest.startswith(":"):
                value = base64.b64decode(rest[1:].strip(), validate=True).decode("utf-8")
            else:
                assert rest.startswith(" ") or rest == ""
                value = rest[1:]
            pairs.append((attr, value))
        if pairs:
            assert pairs[0][0] == "dn"
            records.append((pairs[0][1], pairs[1:]))
    return records


@pytest.mark.parametrize("value", ["plain", "ce.example.org:8443/cream-pbs-batch", "a b",
                                   "x:y", "x<y", "", "GlueClusterUniqueID=a,b"])
def test_safe_strings_are_written_plainly(value):
    assert ldif.attr_line("a", value) == [f"a: {value}"]


@pytest.mark.parametrize("value", [" leading space", "trailing space ", ":colon first",
                                   "<angle first", "new\nline", "carriage\rreturn",
                                   "nul\0byte", "caf\u00e9", "\u65e5\u672c", "del\x7f"])
def test_unsafe_values_are_base64(value):
    (line,) = ldif.attr_line("a", value)
    assert line.startswith("a:: ")
    assert base64.b64decode(line[4:]).decode("utf-8") == value


def test_long_values_fold_at_76_and_unfold_exactly():
    value = "x" * 300
    lines = ldif.attr_line("GlueHostApplicationSoftwareRunTimeEnvironment", value)
    assert len(lines) > 1
    assert all(len(line) <= ldif.WIDTH for line in lines)
    assert all(line.startswith(" ") for line in lines[1:])
    rec = read_ldif(ldif.entry("o=x", [("GlueHostApplicationSoftwareRunTimeEnvironment",
                                        value)]))
    assert rec == [("o=x", [("GlueHostApplicationSoftwareRunTimeEnvironment", value)])]


def test_long_base64_values_fold_too():
    value = "\u00e9" * 200
    lines = ldif.attr_line("a", value)
    assert all(len(line) <= ldif.WIDTH for line in lines)
    assert read_ldif(ldif.entry("o=x", [("a", value)])) == [("o=x", [("a", value)])]


def test_bad_attribute_names_are_refused():
    for bad in ["", "1abc", "a b", "a:b", "a\nb"]:
        with pytest.raises(ValueError):
            ldif.attr_line(bad, "v")


@pytest.mark.parametrize("value,escaped", [
    ("simple", "simple"),
    ("a,b", "a\\,b"),
    ("a+b", "a\\+b"),
    ("a=b", "a\\=b"),
    ('say "hi"', 'say \\"hi\\"'),
    ("back\\slash", "back\\\\slash"),
    ("<a;b>", "\\<a\\;b\\>"),
    (" lead", "\\ lead"),
    ("trail ", "trail\\ "),
    ("#hash", "\\#hash"),
    ("mid#hash", "mid#hash"),
    ("new\nline", "new\\0Aline"),
    ("nul\0", "nul\\00"),
    ("caf\u00e9", "caf\u00e9"),
])
def test_dn_value_escaping_follows_rfc4514(value, escaped):
    assert ldif.escape_dn_value(value) == escaped


def test_empty_rdn_value_is_refused():
    with pytest.raises(ValueError):
        ldif.rdn("GlueClusterUniqueID", "")


def test_a_hostile_value_cannot_add_records_or_attributes():
    hostile = "x\n\ndn: o=evil\nobjectClass: top\n"
    text = ldif.document([ldif.entry(ldif.dn(ldif.rdn("cn", hostile), base="o=grid"),
                                     [("cn", hostile), ("description", hostile)])])
    records = read_ldif(text)
    assert len(records) == 1
    dn, attrs = records[0]
    assert dn == "cn=x\\0A\\0Adn: o\\=evil\\0AobjectClass: top\\0A,o=grid"
    assert attrs == [("cn", hostile), ("description", hostile)]
    assert "\ndn: o=evil" not in text
