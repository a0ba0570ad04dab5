"""The dispatchers installed as pbs_mom's prologue, epilogue and their .parallel forms.

pbs_mom runs exactly one script per hook; sites and vmwn both need steps there.
The dispatcher is a few lines of POSIX sh (it starts in about a millisecond)
that runs the steps of ``prologue.d/`` or ``epilogue.d/`` in name order with its
own argv and environment.  Only regular files that are executable by their
owner, owned by root and neither group- nor other-writable run, the same rule
pbs_mom applies to the hook itself; an executable step that breaks it counts as
a failed step.  Prologue steps stop at the first failure (its exit code is the
dispatcher's); epilogue steps all run and the first failure's code is returned.
"""

import shlex

MARKER = "# vmwn step dispatcher"

# hook name -> (steps directory beside it, policy)
HOOKS = {
    "prologue": ("prologue.d", "first"),
    "prologue.parallel": ("prologue.d", "first"),
    "epilogue": ("epilogue.d", "all"),
    "epilogue.parallel": ("epilogue.d", "all"),
}

_TEMPLATE = """#!/bin/sh
{marker} for pbs_mom's {hook}; installed by vmwn, do not edit.
# Runs the steps in {steps} in name order with this script's argv and
# environment; VMWN_HOOK tells a step which hook pbs_mom ran.  Policy: {policy}.
steps={steps_q}
VMWN_HOOK={hook_q}
export VMWN_HOOK
policy={policy}
status=0

# True (0) unless $1 is owned by root, owner-readable and -executable and
# neither group- nor other-writable.
unsafe() {{
	[ -n "$(find "$1" -maxdepth 0 -user 0 -perm -0500 ! -perm /0022 2>/dev/null)" ] && return 1
	return 0
}}

[ -d "$steps" ] || exit 0
if [ -h "$steps" ] || unsafe "$steps"; then
	echo "vmwn: $steps must be a root-owned directory that only root can write; no step ran" >&2
	exit 2
fi
for step in "$steps"/*; do
	case ${{step##*/}} in
	*~|*.dpkg-*|*.rpmnew|*.rpmsave|*.rpmorig|*.disabled) continue ;;
	esac
	[ -f "$step" ] && [ ! -h "$step" ] && [ -x "$step" ] || continue
	if unsafe "$step"; then
		echo "vmwn: step $step refused: it must be owned by root, owner-executable and not group- or other-writable" >&2
		rc=2
	else
		"$step" "$@"
		rc=$?
	fi
	if [ "$rc" -ne 0 ]; then
		[ "$policy" = first ] && exit "$rc"
		[ "$status" -eq 0 ] && status=$rc
	fi
done
exit "$status"
"""


def render(hook, steps_dir):
    """The dispatcher script for ``hook`` running the steps in ``steps_dir``."""
    _, policy = HOOKS[hook]
    policy_name = "first" if policy == "first" else "all"
    return _TEMPLATE.format(marker=MARKER, hook=hook, hook_q=shlex.quote(hook),
                            steps=steps_dir, steps_q=shlex.quote(steps_dir),
                            policy=policy_name)


def is_dispatcher(path):
    """True when ``path`` is a dispatcher vmwn installed (so uninstall may remove it)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(512)
    except OSError:
        return False
    return MARKER in head
