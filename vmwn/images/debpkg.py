"""Debian packages as image ingredients: resolve, fetch once, verify, unpack.

Guest images are assembled only from Debian's archive.  apt knows which
version is current and its SHA256; we keep downloaded .deb files in a cache of
our own (apt's archive cache is reused when it already holds the same file), so
a rebuild needs no network and takes seconds.
"""

import hashlib
import logging
import os
import re
import shutil
import tempfile

from ..errors import SiteError
from ..subp import run

log = logging.getLogger(__name__)

CACHE_DIR = "/var/cache/vmwn/debs"
APT_ARCHIVES = "/var/cache/apt/archives"


def show(package):
    """apt's candidate record of ``package`` as a dict (Version, SHA256, ...)."""
    cp = run(["apt-cache", "show", "--no-all-versions", package], check=False)
    if cp.returncode != 0 or not cp.stdout.strip():
        raise SiteError(f"Debian package {package} is unknown to apt",
                        "run 'apt-get update' (and check /etc/apt/sources.list)")
    rec = {}
    for line in cp.stdout.splitlines():
        if not line.strip():
            break  # first stanza is the candidate
        m = re.match(r"^([A-Za-z0-9-]+):\s*(.*)$", line)
        if m:
            rec[m.group(1)] = m.group(2)
    if "Version" not in rec or "SHA256" not in rec:
        raise SiteError(f"apt has no usable record for {package}", "run 'apt-get update'")
    return rec


def depends(package, pattern):
    """The first dependency of ``package`` matching regex ``pattern``.

    Used to turn a meta package (``linux-image-cloud-amd64``) into the versioned
    package it currently points at.
    """
    cp = run(["apt-cache", "depends", "--important", package],
             fix="run 'apt-get update'")
    for line in cp.stdout.splitlines():
        m = re.match(r"^\s*\|?Depends:\s*(\S+)", line)
        if m and re.fullmatch(pattern, m.group(1)):
            return m.group(1)
    raise SiteError(f"{package} depends on no package matching {pattern}",
                    "run 'apt-get update' and check the Debian archive")


def _deb_name(package, rec):
    # apt names files with the epoch colon escaped: openssh-server_1%3a9.2p1-2_amd64.deb
    return f"{package}_{rec['Version'].replace(':', '%3a')}_{rec['Architecture']}.deb"


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(package, cache_dir=CACHE_DIR):
    """Path of a verified .deb of apt's candidate ``package``, downloading it once."""
    rec = show(package)
    name = _deb_name(package, rec)
    for d in (cache_dir, APT_ARCHIVES):
        path = os.path.join(d, name)
        if os.path.isfile(path):
            if _sha256(path) == rec["SHA256"]:
                log.debug("%s: cached at %s", package, path)
                return path
            log.warning("%s: %s does not match apt's SHA256; ignoring it", package, path)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".download-", dir=cache_dir)
    try:
        run(["apt-get", "download", "-q", f"{package}={rec['Version']}"], cwd=tmp,
            timeout=900, fix="check that apt can reach the Debian archive")
        got = os.path.join(tmp, name)
        if not os.path.isfile(got) or _sha256(got) != rec["SHA256"]:
            raise SiteError(f"downloaded {package} does not match apt's SHA256",
                            "run 'apt-get update' and retry")
        path = os.path.join(cache_dir, name)
        os.replace(got, path)
        log.info("%s: downloaded %s", package, path)
        return path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def extract(deb, dest):
    """Unpack the files of ``deb`` under ``dest`` (no maintainer scripts run)."""
    os.makedirs(dest, exist_ok=True)
    run(["dpkg-deb", "-x", deb, dest], fix=f"{deb} may be damaged: delete it and rebuild")
    return dest
