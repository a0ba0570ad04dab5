"""Per-job SSH keys: a host key the guest must present, and the user's login key.

Both are Ed25519, generated in-process (microseconds; no ssh-keygen fork).
The host key is pinned by the client, so a guest (or anything else listening
on the forwarded port) that presents another key is refused.
"""

import dataclasses
import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from .errors import SiteError


@dataclasses.dataclass(frozen=True)
class KeyPair:
    private_openssh: str   # "-----BEGIN OPENSSH PRIVATE KEY-----\n..."
    public_line: str       # "ssh-ed25519 AAAA... comment"


def generate(comment):
    key = ed25519.Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption()).decode()
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH).decode()
    return KeyPair(priv, f"{pub} {comment}")


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
