# supermachine: `make demo` runs a busybox container in a microVM from a fresh checkout;
# `make test` runs every test. Both install missing Debian packages and build what they need.

SHELL := /bin/sh
ASSETS := build/share/supermachine
# The arm64 guest's assets (issue 26: the builtin VMM's aarch64 path will boot them).
ASSETS_AARCH64 := build/share/supermachine-aarch64
BIN := build/bin
CARGO ?= cargo

.PHONY: all deps test-deps guest guest-aarch64 smoke-aarch64 kernel kernel-variants agent qemu build demo test test-steps unit-test vm-test integration-test test-typical-host lint fuzz fuzz-short bench install clean

# Tests that cannot run on this host append a line here (tests/common/skip.rs,
# integration/lib.bash); `make test` empties it first and prints it last.
SKIP_LOG := $(CURDIR)/target/skipped-tests.log
export SUPERMACHINE_SKIP_LOG := $(SKIP_LOG)

all: build guest

deps:
	scripts/install-deps.sh build

test-deps:
	scripts/install-deps.sh test

kernel: deps
	scripts/build-kernel.sh default $(ASSETS)

agent: deps
	scripts/build-agent.sh $(ASSETS)

# The qemu engine's QEMU: Debian's source, only what a microVM needs, static (fewer pages of
# its own per VM and a faster start than the distribution's build; that one still works).
# Its firmware (the microvm machine's qboot, built by Debian's qemu-system-data) is copied
# beside it and passed to it by the engine: a host without Debian's QEMU runs it too.
qemu: deps
	scripts/build-qemu.sh $(ASSETS)
	install -m 0644 /usr/share/qemu/qboot.rom $(ASSETS)/qboot.rom

# Everything a VM needs besides the runtime.
guest: kernel agent qemu

# The arm64 guest, cross-built here: its kernel (an `Image`, the same config fragments plus
# config/guest-kernel-arm64.config) and its static agent.
guest-aarch64:
	scripts/install-deps.sh aarch64
	scripts/build-kernel.sh arm64 $(ASSETS_AARCH64)
	scripts/build-agent.sh $(ASSETS_AARCH64) aarch64

# Boots that guest under qemu-system-aarch64's TCG (QEMU's virt machine): its kernel runs and
# its agent starts as PID 1; then with the builtin VMM's device tree (vmm::aarch64::fdt) on
# two vCPUs, where the agent answers through its channel. Not in `make test` yet: no VMM
# path boots an aarch64 container.
smoke-aarch64: guest-aarch64
	$(CARGO) run --locked -q -p vmm --example aarch64_dtb -- 2 256 32 "console=ttyAMA0 panic=-1" > target/aarch64-smoke.dtb
	scripts/aarch64-guest-smoke.sh $(ASSETS_AARCH64) target/aarch64-smoke.dtb

# The kernel variant for hosts whose KVM only emulates guest kernel code (PVM), built only
# where the builtin engine's probe finds such a host.
kernel-variants: build
	@if [ "$$($(BIN)/supermachine features | sed -n 's/.*"run.supermachine.builtin.native": "\(.*\)".*/\1/p')" = false ]; then \
	  scripts/build-kernel.sh pvm $(ASSETS); \
	else echo "kernel-variants: none needed on this host"; fi

build:
	$(CARGO) build --locked --release --bin supermachine --bin containerd-shim-supermachine-v2
	mkdir -p $(BIN)
	for b in supermachine containerd-shim-supermachine-v2; do cp target/release/$$b $(BIN)/$$b.tmp && mv $(BIN)/$$b.tmp $(BIN)/$$b; done

demo: deps guest build
	scripts/demo.sh $(BIN)/supermachine

# Everything CI runs, then the list of what was skipped (also when a step failed).
test:
	@mkdir -p target && : > $(SKIP_LOG)
	@$(MAKE) --no-print-directory -f $(firstword $(MAKEFILE_LIST)) test-steps; rc=$$?; \
	  echo "== skipped tests ($(SKIP_LOG))"; \
	  if [ -s $(SKIP_LOG) ]; then cat $(SKIP_LOG); else echo "skipped: none"; fi; \
	  exit $$rc

test-steps: test-deps guest kernel-variants lint unit-test fuzz-short vm-test integration-test test-typical-host

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings
	# The Hypervisor.framework backend type-checks on any host.
	$(CARGO) clippy --locked -p hypervisor --features hvf --all-targets -- -D warnings

unit-test:
	$(CARGO) test --locked --workspace --lib --bins

# What a guest or a corrupt file hands the host, under libFuzzer, each target for a bounded
# time (nightly toolchain; cargo-fuzz is installed from crates.io when missing): the shared
# filesystem's FUSE server (crates/share/fuzz), both ends' agent frame decoders, the
# builtin VMM's snapshot state parser, its virtio-mmio devices driven by a guest, and its
# virtio-fs device with the FUSE server behind it (fuzz/). `make fuzz` runs each for FUZZ_SECONDS
# (default 300); `make test` for 30 s each.
FUZZ_SECONDS ?= 300
FUZZ_RUN = $(CARGO) +nightly fuzz run
FUZZ_ARGS = -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096
fuzz:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install --locked cargo-fuzz
	cd crates/share && $(FUZZ_RUN) request $(FUZZ_ARGS)
	$(FUZZ_RUN) frame $(FUZZ_ARGS)
	$(FUZZ_RUN) snapshot_state $(FUZZ_ARGS)
	$(FUZZ_RUN) virtio_mmio $(FUZZ_ARGS)
	$(FUZZ_RUN) virtio_fs $(FUZZ_ARGS)

fuzz-short:
	@$(MAKE) --no-print-directory -f $(firstword $(MAKEFILE_LIST)) fuzz FUZZ_SECONDS=30

# Rust tests that boot real VMs (tests/ of the workspace root).
vm-test: guest build
	SUPERMACHINE_ASSETS_DIR=$(CURDIR)/$(ASSETS) $(CARGO) test --locked --test '*' -- --test-threads=2
	# The suites in tests/builtin-suites.txt again on the builtin engine, here where this
	# host's KVM runs guest kernel code natively; where it emulates it (PVM: minutes per
	# suite) they run on the typical host's nested KVM instead (test-typical-host). The
	# runtime-spec and limits suites test the guest's side alone (the same agent and kernel on
	# both engines): they run once, on the default engine. Without a writable /dev/kvm they
	# are recorded as skipped; in CI a /dev/kvm that exists but cannot be used fails.
	if [ -w /dev/kvm ] && [ "$$($(BIN)/supermachine features | sed -n 's/.*"run.supermachine.builtin.native": "\(.*\)".*/\1/p')" = true ]; then \
	  grep -v '^\s*\(#\|$$\)' tests/builtin-suites.txt | while read -r suite args; do \
	    SUPERMACHINE_ENGINE=builtin SUPERMACHINE_ASSETS_DIR=$(CURDIR)/$(ASSETS) $(CARGO) test --locked --test $$suite -- --test-threads=2 $$args </dev/null || exit 1; done; \
	elif [ -w /dev/kvm ]; then echo "vm-test: this host's KVM emulates guest kernel code: the builtin engine's suites (tests/builtin-suites.txt) run in make test-typical-host"; \
	elif [ -e /dev/kvm ] && [ "$$CI" = true ]; then echo "vm-test: /dev/kvm exists but is not writable"; exit 1; \
	else mkdir -p target; echo "SKIPPED vm-test: the builtin engine's suites (tests/builtin-suites.txt): no writable /dev/kvm" | tee -a $(SKIP_LOG); fi
	# Tiny hand-assembled guests on the hypervisor layer (need /dev/kvm).
	SUPERMACHINE_ASSETS_DIR=$(CURDIR)/$(ASSETS) $(CARGO) test --locked -p hypervisor --test '*'

integration-test: guest build
	@for t in integration/*.sh; do [ -e "$$t" ] || continue; echo "== $$t"; SUPERMACHINE_ASSETS_DIR=$(CURDIR)/$(ASSETS) "$$t" $(CURDIR)/$(BIN)/supermachine || exit 1; done

# The host most users have (Debian 12: systemd, cgroup v2 only, docker's systemd cgroup
# driver, KVM) booted as a VM under QEMU's TCG, the project installed in it: docker,
# containerd's native shim and `supermachine check` there, with KVM (the builtin engine)
# and with KVM hidden (QEMU/TCG, no QEMU package). Its image is cached by its recipe.
test-typical-host: test-deps guest build
	scripts/typical-host.sh $(CURDIR)/$(BIN) $(CURDIR)/$(ASSETS)

bench: deps guest kernel-variants build
	scripts/bench.py $(CURDIR)/$(BIN)/supermachine
	# The builtin engine's cold boots take minutes where KVM emulates guest kernel code: one.
	scripts/bench.py $(CURDIR)/$(BIN)/supermachine --engine builtin --cold-runs 1
	scripts/bench-builtin.py $(CURDIR)/$(ASSETS)
	scripts/install-deps.sh test
	scripts/bench-docker.sh $(CURDIR)/$(BIN)/supermachine
	scripts/bench-network.sh $(CURDIR)/$(BIN)/supermachine
	# Shared filesystems: runc's bind mount, each engine's share, and QEMU's virtio-fs
	# (virtiofsd) and 9p for reference. BENCH_FS_ARGS="--mib 16 --files 500 --tree 2000" is quick.
	scripts/bench-fs.py $(CURDIR)/$(BIN)/supermachine $(BENCH_FS_ARGS)
	# The container's root filesystem: image reads, writes and the guest memory they cost, against
	# runc and the runtime before its writes reached the host (that revision is built once into
	# ~/.cache/supermachine). BENCH_ROOTFS_ARGS="--tree 2000 --mib 16 --write-mib 32" is quick.
	scripts/bench-rootfs.py $(CURDIR)/$(BIN)/supermachine $(BENCH_ROOTFS_ARGS)
	# Density: N idle containers, each allocating and freeing 200 MiB, with and without free
	# page reporting, against runc. BENCH_DENSITY_ARGS="--containers 2 --mib 64" is quick.
	scripts/bench-density.py $(CURDIR)/$(BIN)/supermachine $(BENCH_DENSITY_ARGS)

install: build guest
	install -D -m 0755 $(BIN)/supermachine /usr/local/bin/supermachine
	install -D -m 0755 $(BIN)/containerd-shim-supermachine-v2 /usr/local/bin/containerd-shim-supermachine-v2
	install -D -m 0644 $(ASSETS)/vmlinux /usr/local/share/supermachine/vmlinux
	install -D -m 0644 $(ASSETS)/release /usr/local/share/supermachine/release
	install -D -m 0755 $(ASSETS)/supermachine-agent /usr/local/share/supermachine/supermachine-agent
	install -D -m 0755 $(ASSETS)/qemu-system-x86_64 /usr/local/share/supermachine/qemu-system-x86_64
	install -D -m 0644 $(ASSETS)/qboot.rom /usr/local/share/supermachine/qboot.rom

clean:
	rm -rf build
	$(CARGO) clean
