# vmwn: every target is idempotent on a fresh Debian 12 machine (run as root).
SHELL      := /bin/bash
VENV       ?= $(CURDIR)/.venv
# Debian's interpreter: job users must be able to run it (a pyenv under /root is 0700).
PYTHON     ?= $(firstword $(wildcard /usr/bin/python3) python3)
PY         := $(VENV)/bin/python
VMWN       := $(VENV)/bin/vmwn
CONFIG     ?= $(CURDIR)/etc/vmwn.conf
PBS_HOME   ?= /var/spool/torque
DESTDIR    ?=
SYSCONFDIR ?= /etc
PREFIX     ?= /usr/local
GIPDIR     ?= /var/lib/bdii/gip/provider
# Hooks run as root, so they run a root-owned, non-editable copy of vmwn, never
# the checkout (whoever could write the checkout would otherwise get root).
RUNTIME    ?= $(PREFIX)/lib/vmwn
HOOK_PYTHON ?= $(if $(DESTDIR),$(PYTHON),$(RUNTIME)/bin/python)
PYTEST_ARGS ?=
GUESTS     ?= tiny debian12
# A real Torque for the tests (built from ../shared/vendor, cached by checksum).
TORQUE_PREFIX ?= /opt/vmwn-torque
export TORQUE_PREFIX
QSTAT      ?= $(firstword $(shell command -v qstat 2>/dev/null) $(wildcard $(TORQUE_PREFIX)/bin/qstat))

# Debian packages vmwn, its image builds and its tests use.
APT_PACKAGES := qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev \
	pkg-config gcc libc6-dev python3-dev python3-venv cpio busybox-static openssh-server openssh-client \
	genisoimage e2fsprogs mmdebstrap dpkg-dev slapd ldap-utils glue-schema tini iptables \
	slurmctld slurmd slurm-client munge libslurm-dev slurmdbd mariadb-server-core mariadb-client-core \
	libopenmpi-dev openmpi-bin libssh-dev
# Debian 13's QEMU has no virtiofsd of its own (QEMU 8 dropped the C daemon): the
# Rust one is a package of its own there.
DEBIAN_MAJOR := $(shell cut -d. -f1 /etc/debian_version 2>/dev/null)
APT_PACKAGES += $(if $(filter 13 14 15 16,$(DEBIAN_MAJOR)),virtiofsd)

.PHONY: all deps apt venv daemons guest test test-unit demo bench install uninstall \
	install-gip uninstall-gip check clean wheel torque torque-up torque-down pbs-python \
	test-accounts fresh-ci openpbs openpbs-up openpbs-down rust-virtiofsd debian13-root \
	debian13-smoke

all: deps

deps: apt venv daemons

apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -q && \
		RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

daemons:
	@# Without udev /dev/kvm stays root-only; libvirt then finds its cached QEMU probe
	@# inconsistent and re-probes QEMU on every domain start (~35 s).  Give it Debian's
	@# usual root:kvm 0660; TCG domains (type='qemu') are unaffected.
	@if [ -c /dev/kvm ] && getent group kvm >/dev/null; then chgrp kvm /dev/kvm && chmod 0660 /dev/kvm; fi
	@scripts/start-libvirtd

guest: deps
	@for g in $(GUESTS); do $(VMWN) --config $(CONFIG) image build $$g || exit 1; done

check: deps
	$(VMWN) --config $(CONFIG) check --boot tiny

# Torque 6.1 from source, once per machine (about 5-10 minutes the first time).
torque:
	@scripts/build-torque

# pbs_python's _pbs built against that Torque, for the test venv.
pbs-python: venv torque
	@scripts/build-pbs-python $(VENV)

# OpenPBS from source, once per machine (about 4 minutes), cached by the archive's
# checksum in /opt/vmwn-openpbs; its one-host complex runs in network namespace vmwn-pbs.
openpbs:
	@scripts/build-openpbs

openpbs-up: openpbs
	@scripts/openpbs-up

openpbs-down:
	@scripts/openpbs-down

torque-up: torque
	@scripts/torque-up

torque-down:
	@scripts/torque-down

# Each step is timed, and the times are printed at the end (CI's budget is read there).
# pytest runs twice: every test but the exclusive ones in PYTEST_WORKERS parallel
# lanes (one per batch system, one per other module: tests/conftest.py), then the
# exclusive ones (they stop a host daemon or measure CPU time) alone.  PYTEST_ARGS
# go to both; a pass that selects nothing (pytest's exit 5) is no failure.
TEST_STEPS ?= deps guest torque pbs-python openpbs test-accounts rust-virtiofsd debian13-root
PYTEST_WORKERS ?= 3
test:
	@set +e; times=""; t0=$$(date +%s); \
	for step in $(TEST_STEPS); do s=$$(date +%s); \
		$(MAKE) --no-print-directory $$step || exit $$?; \
		times="$$times$$step $$(( $$(date +%s) - s )) s; "; done; \
	export VMWN_TEST_RUN=$$t0.$$$$; s=$$(date +%s); \
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadscope -m "not exclusive" \
		--durations=20 $(PYTEST_ARGS) tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests collected in the parallel pass"; rc=0; fi; \
	p1=$$(( $$(date +%s) - s )); \
	$(VENV)/bin/pytest -m exclusive --durations=10 $(PYTEST_ARGS) tests; rc2=$$?; \
	if [ $$rc2 -eq 5 ]; then echo "no tests collected in the exclusive pass"; rc2=0; fi; \
	if [ $$rc -eq 0 ]; then rc=$$rc2; fi; \
	echo "make test times: $${times}pytest $$(( $$(date +%s) - s )) s ($$p1 s in $(PYTEST_WORKERS) lanes, then $$(( $$(date +%s) - s - p1 )) s exclusive); all $$(( $$(date +%s) - t0 )) s"; \
	exit $$rc

# No root needed for its logic; it never touches the host's firewall, accounts,
# libvirt or batch systems (tests/conftest.py fails a test that does).
test-unit: deps test-accounts
	@set +e; s=$$(date +%s); \
	$(VENV)/bin/pytest -m "not integration and not slapd and not torque and not slow" \
		$(PYTEST_ARGS) tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then rc=0; fi; echo "make test-unit: pytest $$(( $$(date +%s) - s )) s"; \
	exit $$rc

# A Rust virtiofsd for the tests of both virtio-fs daemons (the host's on Debian
# 13; Debian 13's, unpacked beside the host's files, on Debian 12).  Without one
# those tests skip: no failure here.
rust-virtiofsd:
	@scripts/rust-virtiofsd >/dev/null || echo "rust-virtiofsd: none; its tests skip"

# vmwn on Debian 13 (QEMU 10, libvirt 11, the Rust virtiofsd, Python 3.13) on a
# Debian 12 machine: a Debian 13 root, built once (cached by its package list),
# in which tests/test_debian13.py checks a boot in both data modes, this machine's
# Torque and Debian 13's Slurm 24.11 (scripts/debian13-smoke).  On Debian 13 the
# whole suite is that.  Without a root the test skips: no failure here.
debian13-root: deps
	@if [ "$(DEBIAN_MAJOR)" = 12 ]; then scripts/debian13-smoke --build-only || \
		echo "debian13-root: none; tests/test_debian13.py skips"; fi

debian13-smoke: deps
	@$(MAKE) --no-print-directory guest GUESTS=tiny
	@scripts/debian13-smoke

# The accounts tests run jobs as (tests never make accounts themselves).
test-accounts:
	@scripts/test-accounts

# What CI does, on a clone of HEAD with what make test installs removed first
# (scripts/fresh-ci --help): a warm machine hides missing steps.
fresh-ci:
	@scripts/fresh-ci

demo: deps
	@$(MAKE) --no-print-directory guest GUESTS=tiny
	@$(MAKE) --no-print-directory install
	$(PY) examples/demo.py --pbs-home $(PBS_HOME) --config $(DESTDIR)$(SYSCONFDIR)/vmwn/vmwn.conf

bench: deps torque openpbs
	@$(MAKE) --no-print-directory guest GUESTS="tiny debian12"
	$(PY) bench/vmwn_bench.py --config $(CONFIG)
	$(PY) bench/torque_bench.py
	$(PY) bench/openpbs_bench.py
	$(PY) bench/slurm_bench.py
	$(PY) bench/mpi_bench.py

# A node is installed from the wheel, exactly as a site installs one without a
# source tree: pip install dist/vmwn-*.whl into the runtime, then its vmwn-install.
wheel: venv
	@rm -rf dist build && $(VENV)/bin/pip wheel -q --disable-pip-version-check --no-deps \
		--no-build-isolation -w dist . && ls dist/vmwn-*.whl

install: deps
	@if [ -z '$(DESTDIR)' ]; then \
		$(MAKE) --no-print-directory wheel && \
		{ [ -x $(RUNTIME)/bin/python ] || $(PYTHON) -m venv $(RUNTIME); } && \
		$(RUNTIME)/bin/pip install -q --disable-pip-version-check dist/vmwn-*.whl && \
		$(RUNTIME)/bin/pip install -q --disable-pip-version-check --force-reinstall \
			--no-deps dist/vmwn-*.whl || exit 1; \
		if [ -e $(TORQUE_PREFIX)/include/pbs_ifl.h ]; then \
			scripts/build-pbs-python $(RUNTIME) || exit 1; fi; \
		install -d -m 0755 $(PREFIX)/bin; \
		for c in vmwn vmwn-submit-filter vmwn-openpbs-install vmwn-slurm-install; do ln -sfn $(RUNTIME)/bin/$$c $(PREFIX)/bin/$$c; done; \
		cd / && $(RUNTIME)/bin/vmwn-install install --pbs-home $(PBS_HOME) \
			--sysconfdir $(SYSCONFDIR) --prefix $(PREFIX) --qstat '$(QSTAT)'; \
	else \
		$(PY) -m vmwn.torque.install install --pbs-home $(PBS_HOME) --destdir '$(DESTDIR)' \
			--sysconfdir $(SYSCONFDIR) --prefix $(PREFIX) --python $(HOOK_PYTHON) \
			--sample-config $(CURDIR)/etc/vmwn.conf --qstat '$(QSTAT)'; \
	fi

uninstall:
	$(PY) -m vmwn.torque.install uninstall --pbs-home $(PBS_HOME) --destdir '$(DESTDIR)' \
		--sysconfdir $(SYSCONFDIR) --prefix $(PREFIX)
	rm -rf $(if $(DESTDIR),,$(RUNTIME))
	@for c in vmwn vmwn-submit-filter vmwn-openpbs-install vmwn-slurm-install; do \
		[ "$$(readlink $(DESTDIR)$(PREFIX)/bin/$$c)" = '$(RUNTIME)/bin/'$$c ] \
			&& rm -f $(DESTDIR)$(PREFIX)/bin/$$c; done; true

# The BDII provider (GIP convention), pointed at this installation's vmwn command.
install-gip: deps
	install -d -m 0755 $(DESTDIR)$(GIPDIR)
	sed -e 's|$${VMWN_BIN:-vmwn}|$${VMWN_BIN:-$(VENV)/bin/vmwn}|' gip/vmwn-provider \
		> $(DESTDIR)$(GIPDIR)/vmwn-provider
	chmod 0755 $(DESTDIR)$(GIPDIR)/vmwn-provider

uninstall-gip:
	rm -f $(DESTDIR)$(GIPDIR)/vmwn-provider

clean:
	rm -rf build dist *.egg-info .pytest_cache
