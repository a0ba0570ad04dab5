"""What ``vmwn reap --batch openpbs`` asks on an OpenPBS node (vmwn.commands.operators)."""

import os

from . import mom

PBS_CONF = "/etc/pbs.conf"
DEFAULT_PBS_HOME = "/var/spool/pbs"


def pbs_home_of(conf=None):
    """PBS_HOME as pbs.conf (``PBS_CONF_FILE``, else /etc/pbs.conf) sets it."""
    path = conf or os.environ.get("PBS_CONF_FILE") or PBS_CONF
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep and key.strip() == "PBS_HOME" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return DEFAULT_PBS_HOME


def held(cfg, pbs_home=None):
    """``held`` for vmwn.reap: the mom's job records, read now."""
    return mom.MomJobs(pbs_home or pbs_home_of()).read().present
