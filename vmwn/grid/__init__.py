"""The grid layer: advertise environments to brokers, accept grid requests, check qsub.

Environment ``tiny`` is known to the grid as the run-time environment tag
``VMWN-TINY`` (GLUE 1.3 ``GlueHostApplicationSoftwareRunTimeEnvironment``,
GLUE 2.0 ``GLUE2ApplicationEnvironmentAppName``) and to Torque as
``-l other=vmwn=tiny``.  This package owns both spellings.
"""

TAG_PREFIX = "VMWN-"


def tag(name):
    """The grid tag of environment ``name`` (names are lower case, tags upper case)."""
    return TAG_PREFIX + name.upper()


def env_name(tag_text):
    """The environment name a tag stands for, or None when it is not a vmwn tag.

    GLUE 1.3 compares tags case-insensitively (caseIgnoreIA5Match), so does this.
    """
    if not tag_text.upper().startswith(TAG_PREFIX):
        return None
    return tag_text[len(TAG_PREFIX):].lower() or None


def pbs_request(name):
    """The qsub resource request that selects environment ``name``."""
    return f"other=vmwn={name}"


def advertised(config):
    """Environments that can run on this node (every artefact present), by name."""
    return {n: e for n, e in sorted(config.environments.items()) if not e.missing()}
