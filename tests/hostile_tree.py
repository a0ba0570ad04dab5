"""The tree real users make, for the tests and for scripts/debian13-smoke (which
runs it in a Debian 13 root without pytest): standard library only."""

import os
import shlex
import stat

# A tree real users make, written by a job in its guest in its current directory:
# names that are not UTF-8 at several depths, thousands of directories, a deep
# tree, a big sparse file, a symlink, a fifo, a mode the umask must shape.
HOSTILE_TREE = r"""mkdir -p out && cd out || exit 9
n=$(printf 'r\351sultat')
mkdir -p "$n/sub/$n" && printf one > "$n.txt" && printf two > "$n/sub/$n/$n"
i=0
while [ $i -lt 1200 ]; do mkdir "d$i" && printf "$i" > "d$i/f"; i=$((i + 1)); done
p=deep; i=0
while [ $i -lt 300 ]; do p="$p/d"; i=$((i + 1)); done
mkdir -p "$p" && printf bottom > "$p/leaf"
dd if=/dev/zero of=sparse.img bs=1 count=0 seek=268435456 2>/dev/null
printf head | dd of=sparse.img conv=notrunc 2>/dev/null
ln -s "$n.txt" link
mkfifo fifo
mkdir open && chmod 777 open && printf x > open/f
echo done-writing
"""


def tree_bytes(root):
    """{relative path: its first 64 bytes} of the regular files under ``root`` (bytes)."""
    out = {}
    for dirpath, dirs, files in os.walk(os.fsencode(root)):
        for n in files:
            p = os.path.join(dirpath, n)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            with open(p, "rb") as f:
                out[os.path.relpath(p, os.fsencode(root))] = f.read(64)
    return out


def problems(out, uid, gid, copied=False):
    """What is wrong with the tree HOSTILE_TREE wrote at ``out`` (bytes) through a
    mounted directory, as the job of ``uid``:``gid``: [] when every byte, name and
    kind of file is there, owned by the job's ids.  ``copied``: the tree came back
    by the copy mode's harvest, which copies no symlink or fifo and applies the
    job's umask to the guest's chmod 777."""
    n = b"r\xe9sultat"
    files = tree_bytes(out)
    want = {n + b".txt": b"one", b"/".join([n, b"sub", n, n]): b"two",
            b"/".join([b"deep"] + [b"d"] * 300 + [b"leaf"]): b"bottom"}
    found = [f"{k!r} holds {files.get(k)!r}, not {v!r}" for k, v in want.items()
             if files.get(k) != v]
    dirs = sum(1 for k in files if k.startswith(b"d") and k.endswith(b"/f"))
    if dirs != 1200:
        found.append(f"{dirs} of the 1200 directories' files")
    sparse = os.stat(os.path.join(out, b"sparse.img"))
    if sparse.st_size != 256 << 20 or sparse.st_blocks * 512 >= 16 << 20 or \
            files.get(b"sparse.img", b"")[:4] != b"head":
        found.append(f"sparse.img is {sparse.st_size} bytes in {sparse.st_blocks} blocks")
    if copied:
        found += [f"the guest's {k.decode()} came back" for k in (b"link", b"fifo")
                  if os.path.lexists(os.path.join(out, k))]
    else:
        if os.readlink(os.path.join(out, b"link")) != n + b".txt":
            found.append("the symlink points elsewhere")
        if not stat.S_ISFIFO(os.lstat(os.path.join(out, b"fifo")).st_mode):
            found.append("fifo is no fifo")
    found += [f"{k!r} is left" for k in files if k.endswith(b".tmp")]
    for p, mode in ((out, 0o700), (os.path.join(out, n + b".txt"), 0o600),
                    (os.path.join(out, b"open", b"f"), 0o600),
                    (os.path.join(out, b"open"), 0o700 if copied else 0o777)):
        s = os.lstat(p)  # the job's umask 077 made them, the job's chmod 777 "open"
        if (s.st_uid, s.st_gid, stat.S_IMODE(s.st_mode)) != (uid, gid, mode):
            found.append(f"{p!r} is {s.st_uid}:{s.st_gid} {stat.S_IMODE(s.st_mode):04o}, "
                         f"not {uid}:{gid} {mode:04o}")
    return found


def command(workdir):
    """The guest command (bytes) that writes the tree in ``workdir`` under umask 077."""
    return (b"cd " + shlex.quote(workdir).encode("utf-8", "surrogateescape")
            + b" && umask 077 && sh -c " + shlex.quote(HOSTILE_TREE).encode())
