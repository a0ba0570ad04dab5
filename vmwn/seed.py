"""The cloud-init NoCloud seed: per-job credentials on a small ISO labelled ``cidata``.

Any cloud image with cloud-init reads it, and the bundled ``tiny`` guest's init
honours the subset vmwn renders.  Rendering goes through Jinja2 with the ``yq``
filter, so user-controlled strings reach YAML only as quoted scalars.
"""

import os
import re
import tempfile

from . import subp
from .errors import SiteError


def context(*, job_id, instance_id, hostname, user, uid, gid, group, shell, workdir,
            hostkey, userkey, mounts=(), home=None, groups=(), jobnet=None):
    """The variables the seed templates use (documented in docs/admin-guide.md).

    ``mounts`` is a list of (virtio-fs tag, path) the guest mounts, in order;
    ``home`` the user's home in the guest (default :func:`guest_home`; with
    the home mounted it is the host's path); ``groups`` the user's other groups
    as (name, gid), so the guest opens what the user's groups open on the host.
    ``jobnet``: for a job that spans nodes, the guest's address on the job's
    network (CIDR), that card's MTU and every guest's (address, host name, host
    public key); the guest also gets ``userkey``'s private half, to log in to the
    others as the job's user.
    """
    return dict(job_id=job_id, instance_id=instance_id, hostname=hostname, user=user, uid=uid,
                gid=gid, group=group, shell=shell, workdir=workdir, home=home or guest_home(user),
                control_dir=control_dir(user, bool(mounts)),
                mounts=[{"tag": t, "path": p} for t, p in mounts],
                groups=[{"name": n, "gid": g} for n, g in groups],
                authorized_key=userkey.public_line,
                host_key_private=hostkey.private_openssh.rstrip("\n"),
                host_key_public=hostkey.public_line, hosts_line=HOSTS_LINE, key_line=KEY_LINE,
                jobnet=None if not jobnet else dict(
                    address=jobnet["address"], mtu=str(int(jobnet["mtu"])),
                    owner=f"{int(uid)}:{int(gid)}", key=userkey.private_openssh,
                    hosts=[{"address": a, "name": n, "key": " ".join(k.split()[:2])}
                           for a, n, k in jobnet["hosts"]]))


# The shell lines a seed gives the guest of a job on several nodes (the tiny guest
# accepts these lines only).  For each of the job's guests, with its address, name
# and host key: its line in /etc/hosts and in the known hosts.  Then the job's
# login key, with the user's name and uid:gid, where the guest's ssh looks for it
# (root writes it before the user exists in the guest, as cloud-init's bootcmd does).
HOSTS_LINE = ('printf "%s %s\\n" "$1" "$2" >> /etc/hosts && '
              'printf "%s,%s %s\\n" "$2" "$1" "$3" >> /etc/ssh/ssh_known_hosts')
KEY_DIR = "/etc/ssh/vmwn-keys"
KEY_LINE = (f'mkdir -p -m 0755 {KEY_DIR} && (umask 077 && printf "%s" "$3" > {KEY_DIR}/"$1") '
            f'&& chown "$2" {KEY_DIR}/"$1"')


# The guest's control directory is guestfiles' (the seed only makes it).
from .guestfiles import control_dir, guest_home  # noqa: E402,F401


# Supplementary groups a guest gets: names it can hold, ids clear of the guests'
# own system groups (below 1000), at most NGROUPS_GUEST of them.
GROUP_NAME_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
NGROUPS_GUEST = 64


def supplementary_groups(user, gid):
    """The user's groups but the primary one, as (name, gid), that a guest can take."""
    import grp
    out = []
    try:
        gids = os.getgrouplist(user, gid)
    except (KeyError, OSError):
        return out
    for g in gids:
        if g == gid or g < 1000:
            continue
        try:
            name = grp.getgrgid(g).gr_name
        except KeyError:
            continue
        if GROUP_NAME_RE.match(name):
            out.append((name, g))
    return out[:NGROUPS_GUEST]


def render(tmpl, ctx):
    """Render user-data and meta-data; returns (user_data, meta_data) text."""
    from .templating import render_template
    return (render_template(tmpl, "user-data.j2", ctx),
            render_template(tmpl, "meta-data.j2", ctx))


def build_iso(path, user_data, meta_data, timeout=60):
    """Write the seed ISO atomically at ``path`` (genisoimage, Rock Ridge + Joliet)."""
    d = os.path.dirname(path)
    with tempfile.TemporaryDirectory(dir=d, prefix=".seed-") as tmp:
        for name, text in (("user-data", user_data), ("meta-data", meta_data)):
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        out = os.path.join(tmp, "seed.iso")
        subp.run(["genisoimage", "-quiet", "-output", out, "-volid", "cidata", "-joliet",
                  "-rock", os.path.join(tmp, "user-data"), os.path.join(tmp, "meta-data")],
                 timeout=timeout, fix="install genisoimage ('make deps')")
        os.chmod(out, 0o600)  # holds the guest's private host key; libvirt lends it to QEMU
        try:
            os.rename(out, path)
        except OSError as e:
            raise SiteError(f"cannot write seed {path}: {e.strerror}",
                            "check the state directory") from None
    return path
