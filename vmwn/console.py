"""A guest's serial console log: vmwn's one-line announcements in it.

A vmwn guest prints ``vmwn-guest: ready`` once sshd serves the job's keys,
``vmwn-guest: error: REASON`` when it cannot prepare the job (``error:
passing: REASON`` for a failure another boot may not meet), and, being
prepared for warm starts, ``vmwn-guest: prepared``.  The prologue's boot
(vmwn.lifecycle) and the warm preparation (vmwn.warm) read them here.
"""

from .errors import SiteError, TransientError

READY_LINE = b"vmwn-guest: ready"
ERROR_LINE = b"vmwn-guest: error:"
PASSING = "error: passing: "  # what a guest says of a failure another boot may not meet


class Console:
    """Follows a guest's serial console log for vmwn's one-line announcements."""

    def __init__(self, path, ready=READY_LINE):
        self.path, self.ready, self.pos, self.tail = path, ready, 0, b""

    def poll(self):
        """'ready' (the guest printed ``ready``, by default READY_LINE), 'error: REASON',
        or None while the guest has said neither."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read(1 << 20)
        except OSError:
            return None
        self.pos += len(data)
        self.tail = (self.tail + data)[-8192:]
        if self.ready in self.tail:
            return "ready"
        i = self.tail.find(ERROR_LINE)
        if i >= 0 and b"\n" in self.tail[i:]:
            line = self.tail[i + len(ERROR_LINE):].split(b"\n", 1)[0]
            return "error: " + line.decode("utf-8", "replace").strip()[:200]
        return None


def guest_failure(said, fix):
    """The error for a guest's ``error: REASON`` line: the site's, or one that may pass
    (``error: passing: REASON``, e.g. no DHCP answer on a starved host), which the
    warden's next boot attempt may not meet."""
    if said.startswith(PASSING):
        return TransientError(f"the guest could not prepare the job ({said[len(PASSING):]})",
                              fix)
    return SiteError(f"the guest could not prepare the job ({said})", fix)


def console_tail(path, limit=160):
    """The last non-empty console line, for error messages."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines()]
    except OSError:
        return "no console output"
    lines = [ln for ln in lines if ln]
    return ("console: " + lines[-1][:limit]) if lines else "no console output"
