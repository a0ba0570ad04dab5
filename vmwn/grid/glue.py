"""GLUE 1.3 and GLUE 2.0 entries that advertise this node's environments.

The entries follow the schemas Debian ships in ``glue-schema``
(/etc/ldap/schema/Glue-CE.schema, GLUE20.schema) so that a site BDII accepts
them with schema checking on.  Only environments whose artefacts exist here are
advertised: a broker that sees ``VMWN-TINY`` sends jobs that must be able to boot.
"""

import datetime
import logging

from ..errors import SiteError
from . import advertised, ldif, pbs_request, tag

log = logging.getLogger(__name__)

GLUE1_BASE = "mds-vo-name=resource,o=grid"
GLUE2_BASE = "GLUE2GroupID=resource,o=glue"


def _require(grid, key, why):
    value = grid.get(key)
    if value is None or str(value) == "":
        raise SiteError(f"[grid] {key} is not set but {why} needs it",
                        f"set {key} in the [grid] section of vmwn.conf")
    return str(value)


def _ia5(key, value):
    """GLUE 1.3 attributes are IA5 strings: refuse what slapd would refuse."""
    if any(ord(c) > 0x7F for c in value):
        raise SiteError(f"[grid] {key} = {value!r} is not ASCII, but GLUE 1.3 identifiers "
                        "are IA5 strings",
                        f"use an ASCII {key} or advertise GLUE 2.0 only (--glue2)")
    return value


def glue1_entries(config):
    """The cluster and subcluster entries (GLUE 1.3), as LDIF records."""
    grid = config.grid
    cluster = _ia5("cluster", _require(grid, "cluster", "GLUE 1.3"))
    sub_key = "subcluster" if grid.get("subcluster") else "cluster"
    subcluster = _ia5(sub_key, str(grid.get("subcluster") or cluster))
    site = _ia5("site_name", _require(grid, "site_name", "GLUE 1.3"))
    ce_id = grid.get("ce_id")
    if ce_id:
        _ia5("ce_id", ce_id)
    envs = advertised(config)
    for name, env in sorted(config.environments.items()):
        if name not in envs:
            log.warning("not advertising environment %s: missing %s", name,
                        ", ".join(env.missing()))

    cluster_rdn = ldif.rdn("GlueClusterUniqueID", cluster)
    attrs = [("objectClass", "GlueClusterTop"), ("objectClass", "GlueCluster"),
             ("objectClass", "GlueKey"), ("objectClass", "GlueSchemaVersion"),
             ("GlueClusterUniqueID", cluster), ("GlueClusterName", cluster)]
    if ce_id:
        attrs += [("GlueClusterService", ce_id), ("GlueForeignKey", f"GlueCEUniqueID={ce_id}")]
    attrs += [("GlueForeignKey", f"GlueSiteUniqueID={site}"),
              ("GlueSchemaVersionMajor", "1"), ("GlueSchemaVersionMinor", "3")]
    records = [ldif.entry(ldif.dn(cluster_rdn, base=GLUE1_BASE), attrs)]

    attrs = [("objectClass", "GlueClusterTop"), ("objectClass", "GlueSubCluster"),
             ("objectClass", "GlueHostApplicationSoftware"), ("objectClass", "GlueKey"),
             ("objectClass", "GlueSchemaVersion"),
             ("GlueSubClusterUniqueID", subcluster), ("GlueSubClusterName", subcluster),
             ("GlueChunkKey", f"GlueClusterUniqueID={cluster}")]
    attrs += [("GlueHostApplicationSoftwareRunTimeEnvironment", tag(n)) for n in envs]
    attrs += [("GlueSchemaVersionMajor", "1"), ("GlueSchemaVersionMinor", "3")]
    sub_dn = ldif.dn(ldif.rdn("GlueSubClusterUniqueID", subcluster), cluster_rdn,
                     base=GLUE1_BASE)
    records.append(ldif.entry(sub_dn, attrs))
    return records


def glue2_entries(config, now=None):
    """One GLUE2ApplicationEnvironment per advertised environment, as LDIF records."""
    manager = _require(config.grid, "computing_manager", "GLUE 2.0")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    records = []
    for name, env in advertised(config).items():
        app = tag(name)
        app_id = f"{manager}_{app}"
        attrs = [("objectClass", "GLUE2Entity"),
                 ("objectClass", "GLUE2ApplicationEnvironment"),
                 ("GLUE2ApplicationEnvironmentID", app_id),
                 ("GLUE2ApplicationEnvironmentAppName", app),
                 ("GLUE2ApplicationEnvironmentComputingManagerForeignKey", manager),
                 ("GLUE2ApplicationEnvironmentState", "installednotverified"),
                 ("GLUE2EntityName", name),
                 ("GLUE2EntityCreationTime", stamp),
                 ("GLUE2EntityOtherInfo", f"PBSRequest=-l {pbs_request(name)}")]
        if env.description:
            attrs.append(("GLUE2ApplicationEnvironmentDescription", env.description))
        records.append(ldif.entry(
            ldif.dn(ldif.rdn("GLUE2ApplicationEnvironmentID", app_id), base=GLUE2_BASE), attrs))
    return records


def advertise(config, glue1=True, glue2=True):
    """The provider's whole output: an LDIF document."""
    records = []
    if glue1:
        records += glue1_entries(config)
    if glue2:
        records += glue2_entries(config)
    return ldif.document(records)
