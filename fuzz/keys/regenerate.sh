#!/usr/bin/env bash
# Recreates the trust_store target's fixture: two CAs (clusters `leaf` and `root`) and the
# three certificates Tether issues (agent of leaf, client alice and proxy proxy-0 of root),
# valid 2026-2036. The private keys are deleted afterwards: the target needs only the public
# halves, and no test key then sits in the repository. Run `python3 fuzz/make_seeds.py` next.
set -euo pipefail
cd "$(dirname "$0")"
rm -f ca-leaf* ca-root* subject* ./*-cert.pub
for ca in leaf root; do
    ssh-keygen -q -t ed25519 -N '' -C "tether-fuzz CA $ca (test key)" -f "ca-$ca"
done
ssh-keygen -q -t ed25519 -N '' -C subject -f subject
issue() { # NAME CA ssh-keygen-options...
    local name=$1 ca=$2
    shift 2
    cp subject.pub "$name.pub"
    ssh-keygen -q -s "ca-$ca" -V 20260101:20360101 "$@" "$name.pub"
    rm "$name.pub"
}
role=extension:tether-role@tether.dev
issue agent leaf -I 'agent leaf' -n leaf -O clear -O "$role=agent"
issue client root -I 'client alice' -n alice -O clear -O "$role=client"
issue host root -h -I 'proxy proxy-0.root' -n proxy-0.root
rm -f ca-leaf ca-root subject subject.pub
