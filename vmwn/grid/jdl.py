"""Which vmwn environment a gLite JDL asks for, and whether this site matches it.

A JDL selects an environment the way brokers understand:
``Member("VMWN-DEBIAN12", other.GlueHostApplicationSoftwareRunTimeEnvironment)``
inside ``Requirements``.  Rather than pattern-matching that call, the
requirement is evaluated by the ClassAd library against machine ads that
advertise one candidate tag at a time, so ``||``, ``&&`` and ``!`` mean what
they mean to a broker.
"""

import dataclasses
import logging
import re

from ..errors import UserError
from . import TAG_PREFIX, advertised, classads, env_name, pbs_request, tag

log = logging.getLogger(__name__)

RTE_ATTR = "GlueHostApplicationSoftwareRunTimeEnvironment"
# String literals in the unparsed requirement that look like vmwn tags.
_TAG_LITERAL = re.compile(r'"(' + re.escape(TAG_PREFIX) + r'[A-Za-z0-9_.-]+)"', re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Request:
    """The environment a JDL selects (``name``), with its grid ``tag``."""
    name: str
    tag: str

    def pbs_args(self):
        return ["-l", pbs_request(self.name)]

    def directives(self):
        return [f"#PBS -l {pbs_request(self.name)}"]


def load(path):
    """Read and parse the JDL file at ``path``."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read JDL {path}: {e.strerror if isinstance(e, OSError) else e}",
                        "give the path of a readable UTF-8 JDL file") from None
    return classads.parse_jdl(text, source=f"JDL {path}")


def _requirements(jdl):
    if classads.lookup_text(jdl, "Requirements") is None:
        raise UserError("the JDL has no Requirements",
                        f'add Requirements = Member("{tag("NAME")}", other.{RTE_ATTR});')
    return classads.lookup_text(jdl, "Requirements")


def candidate_tags(jdl):
    """vmwn tags named in Requirements, upper-cased, in order of first mention."""
    seen = []
    for m in _TAG_LITERAL.finditer(_requirements(jdl)):
        t = m.group(1).upper()
        if t not in seen:
            seen.append(t)
    return seen


def _probe(jdl, tags, extra=None):
    attrs = dict(extra or {})
    attrs[RTE_ATTR] = list(tags)
    return classads.evaluate(jdl, "Requirements", classads.machine_ad(attrs))


def _possible(jdl, tags, extra=None):
    """Tags that could satisfy Requirements alone (result not false), in order.

    Attributes missing from a bare probe are undefined, and undefined is not
    false: ``Member(T, ...) && other.GlueCEStateStatus == "Production"`` keeps T.
    """
    return [t for t in tags if _probe(jdl, [t], extra) is not False]


def _unknown(tags, offered, what):
    names = ", ".join(tag(n) for n in offered) or "none"
    return UserError(f"the JDL requires {' or '.join(tags)}, which this site does not {what}",
                     f"require one of: {names}")


def _conflict(tags):
    return UserError(f"the JDL requires {' and '.join(tags)} at once, but a job runs "
                     "in exactly one environment",
                     "require one VMWN-<NAME> tag (alternatives may be joined with ||)")


def requested(jdl, config):
    """The environment the JDL requires among those this site configures."""
    tags = candidate_tags(jdl)
    if not tags:
        raise UserError("the JDL's Requirements name no vmwn environment",
                        f'add Member("{tag("NAME")}", other.{RTE_ATTR}) to Requirements')
    possible = _possible(jdl, tags)
    if not possible:
        if len(tags) > 1 and _probe(jdl, tags) is not False:
            raise _conflict(tags)
        raise UserError("the JDL's Requirements exclude every vmwn environment they name",
                        f'require one with Member("{tag("NAME")}", other.{RTE_ATTR})')
    offered = [t for t in possible if env_name(t) in config.environments]
    if not offered:
        raise _unknown(possible, sorted(config.environments), "offer")
    if len(offered) > 1:
        log.info("JDL accepts %s; choosing %s", ", ".join(offered), offered[0])
    return Request(name=env_name(offered[0]), tag=offered[0])


def site_ad_attrs(config):
    """The attributes a broker sees for this site, as published by ``vmwn advertise``."""
    grid = config.grid
    attrs = {RTE_ATTR: [tag(n) for n in advertised(config)],
             "GlueCEInfoLRMSType": "torque",
             "GlueHostArchitectureSMPSize": config.max_vcpus_node,
             "GlueHostMainMemoryRAMSize": config.max_memory_node_mib,
             "GlueSchemaVersionMajor": 1, "GlueSchemaVersionMinor": 3}
    for attr, key in (("GlueSiteUniqueID", "site_name"), ("GlueCEUniqueID", "ce_id"),
                      ("GlueClusterUniqueID", "cluster"),
                      ("GlueSubClusterUniqueID", "subcluster")):
        if grid.get(key):
            attrs[attr] = grid[key]
    if grid.get("ce_id"):
        attrs["GlueCEInfoHostName"] = grid["ce_id"].split(":", 1)[0].split("/", 1)[0]
    return attrs


@dataclasses.dataclass(frozen=True)
class Match:
    """Outcome of matching a JDL against this site."""
    matches: bool
    request: Request = None
    reason: str = ""


def match(jdl, config):
    """Evaluate Requirements against this site's advertised ad, as a broker would."""
    attrs = site_ad_attrs(config)
    ad_tags = attrs[RTE_ATTR]
    tags = candidate_tags(jdl)
    result = classads.evaluate(jdl, "Requirements", classads.machine_ad(attrs))
    if result is True:
        if not tags:
            return Match(True, None, "no vmwn environment requested")
        without = {k: v for k, v in attrs.items() if k != RTE_ATTR}
        chosen = _possible(jdl, [t for t in tags if t in ad_tags], without)
        if not chosen and _probe(jdl, [], without) is not True:
            raise _conflict([t for t in tags if t in ad_tags])
        if not chosen:
            return Match(True, None, "no vmwn environment requested")
        return Match(True, Request(name=env_name(chosen[0]), tag=chosen[0]))
    possible = _possible(jdl, tags) if tags else []
    missing = [t for t in possible if t not in ad_tags]
    if possible and not any(t in ad_tags for t in possible):
        configured = [t for t in missing if env_name(t) in config.environments]
        if configured:
            raise _unknown(configured, list(advertised(config)),
                           "advertise (its image is missing on this node)")
        raise _unknown(missing, list(advertised(config)), "advertise")
    if tags and not possible and len(tags) > 1 and _probe(jdl, tags) is not False:
        raise _conflict(tags)
    why = "Requirements are undefined here" if result is None else "Requirements are false here"
    return Match(False, None, why)
