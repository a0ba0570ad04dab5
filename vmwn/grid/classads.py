"""JDL text in, ClassAds out, through HTCondor's ClassAd library (the ``htcondor`` wheel).

gLite JDL is new-style ClassAd syntax with two conveniences the WMS user
interface accepts: the enclosing ``[ ]`` may be left out, and lines whose first
non-blank character is ``#`` are comments.  Everything else is the real
library's business, so a JDL that the library rejects is rejected here too.
"""

import functools
import importlib
import logging

from ..errors import SiteError, UserError

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def module():
    """``classad2`` (htcondor >= 24) or ``classad`` (older wheels), imported on first use."""
    for name in ("classad2", "classad"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        log.debug("ClassAd library: %s", name)
        return mod
    raise SiteError("the ClassAd library is not installed",
                    "pip install htcondor (vmwn[grid]) in vmwn's environment")


def _strip_hash_comments(text):
    """Drop ``#`` comment lines, leaving strings and /* */ comments intact."""
    out, i, n = [], 0, len(text)
    line_start, in_str, in_block = True, False, False
    while i < n:
        c = text[i]
        if in_block:
            if text.startswith("*/", i):
                out.append("*/")
                i += 2
                in_block = False
                continue
        elif in_str:
            if c == "\\" and i + 1 < n:
                out.append(text[i:i + 2])
                i += 2
                continue
            if c == '"':
                in_str = False
        elif c == "#" and line_start:
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif c == '"':
            in_str = True
        elif text.startswith("/*", i):
            out.append("/*")
            i += 2
            in_block = True
            line_start = False
            continue
        elif text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            out.append(text[i:end])
            i = end
            continue
        out.append(c)
        if c == "\n":
            line_start = True
        elif not c.isspace():
            line_start = False
        i += 1
    return "".join(out)


def _first_token_is_bracket(text):
    """True when the first thing after blanks and comments is ``[``."""
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace():
            i += 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        else:
            return text[i] == "["
    return False


def parse_jdl(text, source="JDL"):
    """Parse a gLite JDL into a ClassAd; UserError naming ``source`` when it is not one."""
    cl = module()
    body = _strip_hash_comments(text)
    if not body.strip():
        raise UserError(f"{source} is empty", "write a JDL such as [ Executable = ...; ]")
    if not _first_token_is_bracket(body):
        body = "[\n" + body + "\n]"
    # The library stops at the end of the first ad and ignores what follows; as
    # the value of an attribute, the JDL must be followed by ';' or ']' only,
    # so trailing garbage or a second ad becomes a parse error.
    failures = (SyntaxError, ValueError, RuntimeError) + tuple(
        getattr(cl, n) for n in ("ClassAdException", "ClassAdParseError") if hasattr(cl, n))
    try:
        cl.ClassAd("[ vmwnJdl = " + body + "\n]")
        ad = cl.ClassAd(body)
    except failures as e:
        raise UserError(f"{source} is not a valid ClassAd ({' '.join(str(e).split())})",
                        "check brackets, quotes and ';' separators") from None
    return ad


def machine_ad(attrs):
    """A ClassAd from a dict of plain Python values (lists become ClassAd lists)."""
    return module().ClassAd(dict(attrs))


def _truth(value):
    """True, False or None (ClassAd undefined or error)."""
    if isinstance(value, bool):
        return value
    value_type = getattr(module(), "Value", None)
    if value_type is not None and isinstance(value, value_type):
        return None  # Undefined and Error are an IntEnum: not numbers here
    if isinstance(value, (int, float)):
        return bool(value)
    return None


def evaluate(jdl, attr, target):
    """Evaluate ``jdl[attr]`` with ``other`` (and ``target``) bound to ``target``.

    Three-valued: True, False, or None when the result is undefined or an error,
    which brokers treat as no match.
    """
    expr = jdl.lookup(attr)
    try:
        return _truth(expr.eval(scope=jdl, target=target))
    except TypeError:
        # Older bindings: ExprTree.eval() takes no target.  Nest the machine ad
        # as attribute 'other' of a copy, which resolves other.X the same way.
        probe = module().ClassAd(str(jdl))
        probe["other"] = target
        return _truth(probe.eval(attr))


def lookup_text(ad, attr):
    """The unparsed expression of ``attr``, or None when absent."""
    try:
        return str(ad.lookup(attr))
    except KeyError:
        return None
