#!/usr/bin/env bash
# Where a port-I/O exit's time goes, for v3 and for QEMU -accel kvm on the same guest.
# Records every CPU with perf while the guest does N exits and prints, per VMM, the samples
# per exit spent in the host kernel's MSR read inside kvm_arch_vcpu_load (done on every
# KVM_RUN), in the VMM's own user-space code, and in all of the VMM process.
# Usage: bench/exit-profile.sh [N]     (needs perf and permission to record system-wide)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/need-qemu.sh
command -v perf >/dev/null || { echo "exit-profile: perf is missing (apt-get install linux-perf)" >&2; exit 2; }
n=${1:-200000}
cargo build --release -q -p v3
bash guests/build.sh bench/out/guests >/dev/null
g=bench/out/guests/mbtest.elf
out=bench/out/exit-profile; mkdir -p "$out"
perf record -q -a -g -F 4000 -o "$out/v3.data" -- target/release/v3 --log-level error run \
    --kernel "$g" --mem 128 --cmdline "test=iobench n=$n" </dev/null >/dev/null 2>&1 || true
perf record -q -a -g -F 4000 -o "$out/qemu.data" -- qemu-system-x86_64 -accel kvm -display none \
    -nodefaults -no-user-config -serial stdio -device isa-debug-exit,iobase=0xf4,iosize=4 \
    -kernel "$g" -append "test=iobench n=$n" -m 128 </dev/null >/dev/null 2>&1 || true
for vmm in v3 qemu; do
    perf script -i "$out/$vmm.data" -F comm,ip,sym 2>/dev/null | awk -v n="$n" -v vmm="$vmm" '
        /^[^ \t]/ { comm = $1; first = 1; total += (comm ~ /^(vcpu|qemu|CPU|v3)/); next }
        first && NF >= 2 { leaf = $2; first = 0; if ($2 == "native_read_msr") want = 1; else want = 0;
                           if ($1 !~ /^ffffffff/ && comm ~ /^(vcpu|qemu|CPU|v3)/) user++; next }
        want && NF >= 2 { if ($2 == "kvm_arch_vcpu_load") msr++; want = 0 }
        END { printf "%-5s samples per 1000 exits: vcpu_load MSR read %.1f, VMM user space %.1f, VMM process %.1f (1 sample = 0.25 ms)\n",
                     vmm, msr * 1000 / n, user * 1000 / n, total * 1000 / n }'
done
