"""Per-job SSH keys: a host key the guest must present, and the user's login key.

Both are Ed25519, generated in-process (microseconds; no ssh-keygen fork).
The host key is pinned by the client, so a guest (or anything else listening
on the forwarded port) that presents another key is refused.
"""

import dataclasses
import hashlib
import hmac
import os
import stat

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from .errors import SiteError


@dataclasses.dataclass(frozen=True)
class KeyPair:
    private_openssh: str   # "-----BEGIN OPENSSH PRIVATE KEY-----\n..."
    public_line: str       # "ssh-ed25519 AAAA... comment"


def generate(comment):
    return _pair(ed25519.Ed25519PrivateKey.generate(), comment)


def _pair(key, comment):
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption()).decode()
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH).decode()
    return KeyPair(priv, f"{pub} {comment}")


def derive(secret, label, comment):
    """The key pair every node of a job computes alike from the site's ``secret``
    (bytes) and ``label``: the guests of a job on several nodes know each other's
    host keys and share the job's login key without a word between the nodes."""
    seed = hmac.new(secret, b"vmwn key\0" + label.encode(), hashlib.sha256).digest()
    return _pair(ed25519.Ed25519PrivateKey.from_private_bytes(seed), comment)


def read_secret(path):
    """The site's secret for derived keys: a root-owned file that only root reads,
    the same on every node, of at least 32 bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise SiteError(f"cannot read the job secret {path} ({e.strerror}) for a job on "
                        "several nodes", f"create it on one node (head -c 32 /dev/urandom > "
                        f"{path}; chmod 0600 {path}) and copy it to every node") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != 0 or stat.S_IMODE(st.st_mode) & 0o077 or not stat.S_ISREG(st.st_mode):
            raise SiteError(f"the job secret {path} is not a file only root reads",
                            f"chown root:root {path}; chmod 0600 {path}")
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    if len(data) < 32:
        raise SiteError(f"the job secret {path} holds {len(data)} bytes, fewer than 32",
                        f"head -c 32 /dev/urandom > {path} on one node, then copy it to "
                        "every node")
    return data


def write_private(path, pair, uid, gid):
    """Write the user's private key 0600, owned by the job's user, never through a symlink."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise SiteError(f"cannot create key file {path}: {e.strerror}",
                        "check the state directory") from None
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o600)
        os.write(fd, pair.private_openssh.encode())
    finally:
        os.close(fd)
    return path
