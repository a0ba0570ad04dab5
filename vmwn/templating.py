"""Jinja2 rendering with XML autoescaping, strict undefined variables and a YAML quoter.

Templates are site-editable; a template that fails to render is the site's
problem and is reported as a one-line SiteError naming the file and the line.
"""

import os

from .errors import SiteError


_YQ_SHORT = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def yq(value):
    """Quote any value as a YAML double-quoted scalar that JSON readers accept too.

    Printable ASCII passes; other BMP characters become ``\\uXXXX`` (an escape
    both YAML and JSON define, so cloud-init and the tiny guest's parser agree);
    characters beyond the BMP pass as UTF-8, because YAML readers do not pair
    JSON-style surrogate escapes.  Lone surrogates (undecodable bytes) become U+FFFD.
    """
    if value is None:
        raise ValueError("None cannot be quoted")
    out = ['"']
    for ch in str(value):
        o = ord(ch)
        if ch in _YQ_SHORT:
            out.append(_YQ_SHORT[ch])
        elif 0x20 <= o < 0x7F:
            out.append(ch)
        elif 0xD800 <= o <= 0xDFFF:
            out.append("\\ufffd")
        elif o > 0xFFFF:
            out.append(ch)  # printable to YAML; JSON-style surrogate escapes would not pair
        else:
            out.append("\\u%04x" % o)
    out.append('"')
    return "".join(out)


def environment(template_dir, xml):
    """XML templates autoescape every value; YAML templates must quote with ``yq``."""
    import jinja2
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_dir),
        autoescape=xml,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["yq"] = yq
    return env


def render_template(template_dir, name, ctx, xml=False):
    import jinja2
    env = environment(template_dir, xml)
    try:
        return env.get_template(name).render(**ctx)
    except jinja2.TemplateNotFound:
        raise SiteError(f"template {name} not found in {template_dir}",
                        "install it or fix [site] template_dir / the environment's template"
                        ) from None
    except jinja2.TemplateSyntaxError as e:
        raise SiteError(f"template {os.path.join(template_dir, name)} line {e.lineno}: {e.message}",
                        "fix the template") from None
    except jinja2.UndefinedError as e:
        raise SiteError(f"template {os.path.join(template_dir, name)}: {e.message}",
                        "use only the variables listed in docs/admin-guide.md") from None
    except (ValueError, TypeError) as e:
        raise SiteError(f"template {os.path.join(template_dir, name)}: {e}",
                        "fix the template") from None
