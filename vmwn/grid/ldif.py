"""A small LDIF writer (RFC 2849) with DN escaping (RFC 4514).

Site identifiers come from the configuration and may hold any character; an
information provider that glued them into text would let one comma or newline
corrupt or forge entries in the site BDII.  Every value therefore passes through
:func:`attr_line` (SAFE-STRING or base64) and every RDN through :func:`rdn`.
"""

import base64
import re

_ATTR_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")
# RFC 2849 SAFE-INIT-CHAR / SAFE-CHAR, as code points (ASCII only).
_UNSAFE_INIT = frozenset("\0\n\r :<")
_UNSAFE = frozenset("\0\n\r")
WIDTH = 76
# RFC 4514 section 2.4: characters escaped anywhere in a value.  '=' is escaped
# too, which the RFC allows and RFC 2253 parsers still in use expect.
_DN_SPECIAL = frozenset('"+,;<>\\=')


def is_safe_string(value):
    """True when ``value`` may be written as ``attr: value`` (RFC 2849 SAFE-STRING)."""
    if value == "":
        return True
    if any(ord(c) > 0x7E for c in value):  # non-ASCII (and DEL, for readability)
        return False
    if value[0] in _UNSAFE_INIT or value[-1] == " ":  # trailing space SHOULD be base64
        return False
    return not any(c in _UNSAFE for c in value)


def escape_dn_value(value):
    """Escape one attribute value for use in a DN (RFC 4514 section 2.4)."""
    if value == "":
        raise ValueError("an RDN value cannot be empty")
    out = []
    last = len(value) - 1
    for i, c in enumerate(value):
        if c in _DN_SPECIAL:
            out.append("\\" + c)
        elif c == "\0" or ord(c) < 0x20 or ord(c) == 0x7F:
            out.append("".join(f"\\{b:02X}" for b in c.encode("utf-8")))
        elif (i == 0 and c in " #") or (i == last and c == " "):
            out.append("\\" + c)
        else:
            out.append(c)
    return "".join(out)


def rdn(attr, value):
    """``attr=escaped value``."""
    _check_attr(attr)
    return f"{attr}={escape_dn_value(value)}"


def dn(*rdns, base):
    """Join already-built RDNs (most specific first) onto an already-valid ``base``."""
    return ",".join([*rdns, base])


def _check_attr(attr):
    if not _ATTR_RE.match(attr):
        raise ValueError(f"{attr!r} is not an LDAP attribute name")


def _fold(line):
    """Fold a logical line at WIDTH characters; continuation lines start with a space."""
    if len(line) <= WIDTH:
        return [line]
    out = [line[:WIDTH]]
    rest = line[WIDTH:]
    while rest:
        out.append(" " + rest[:WIDTH - 1])
        rest = rest[WIDTH - 1:]
    return out


def attr_line(attr, value):
    """The (folded) lines for one attribute value."""
    _check_attr(attr)
    if isinstance(value, bytes):
        text = None
        raw = value
    else:
        text = str(value)
        raw = text.encode("utf-8")
    if text is not None and is_safe_string(text):
        return _fold(f"{attr}: {text}")
    return _fold(f"{attr}:: {base64.b64encode(raw).decode('ascii')}")


def entry(dn_text, attrs):
    """One LDIF record: ``dn`` then ``attrs``, a list of (name, value) pairs."""
    lines = attr_line("dn", dn_text)
    for name, value in attrs:
        lines += attr_line(name, value)
    return "\n".join(lines) + "\n"


def document(entries):
    """A complete LDIF file: records separated by one empty line."""
    return "\n".join(entries)
