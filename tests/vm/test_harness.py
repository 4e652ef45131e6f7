# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The VM itself: a real kernel with dm-crypt, the vTPM seen by the project's code, restricted networking."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from support.swtpm import SwTPM

FAST_PBKDF = "--pbkdf pbkdf2 --pbkdf-force-iterations 1000"


def test_tpm_hash_in_guest_matches_host(vm_node, repo_root, subprocess_env):
    node = vm_node()
    boot = node.boot('result tpm_hash "$(kcrypt-discovery-challenger --tpm-device /dev/tpmrm0)"\n')
    assert boot.ok, boot.output
    guest_hash = boot.results["tpm_hash"]

    with SwTPM(node.tpm_state) as tpm:  # the same TPM state, now served to the host over TCP
        host = subprocess.run(
            [sys.executable, os.path.join(repo_root, "bin", "kcrypt-discovery-challenger"), "--tpm-device", tpm.tcti],
            capture_output=True, text=True, env=subprocess_env, check=True,
        )
    assert len(guest_hash) == 64 and int(guest_hash, 16) >= 0
    assert guest_hash == host.stdout


def test_dm_crypt_mapping_in_guest(vm_node, persistent_disk):
    node = vm_node(disks=[persistent_disk])
    boot = node.boot("""set -e
part=$(blkid -c /dev/null -t LABEL=COS_PERSISTENT -o device)
result partition "$part"
printf 'vm-test-passphrase' | cryptsetup luksFormat --batch-mode --type luks2 %(pbkdf)s --key-file - "$part"
printf 'vm-test-passphrase' | cryptsetup open --key-file - "$part" test_crypt
result cipher "$(cryptsetup status test_crypt | sed -n 's/^ *cipher: *//p')"
result target "$(dmsetup table test_crypt | cut -d' ' -f3)"
mkfs.ext4 -q -L inner /dev/mapper/test_crypt
mount /dev/mapper/test_crypt /mnt
echo "written inside dm-crypt" > /mnt/file
umount /mnt
cryptsetup close test_crypt
printf 'vm-test-passphrase' | cryptsetup open --key-file - "$part" test_crypt
mount -o ro /dev/mapper/test_crypt /mnt
result content "$(cat /mnt/file)"
result outer_type "$(blkid -c /dev/null -p -s TYPE -o value "$part")"
umount /mnt
cryptsetup close test_crypt
""" % {"pbkdf": FAST_PBKDF})
    assert boot.ok, boot.output
    assert boot.results["partition"] == "/dev/vda1"
    assert boot.results["cipher"] == "aes-xts-plain64"
    assert boot.results["target"] == "crypt"
    assert boot.results["content"] == "written inside dm-crypt"
    assert boot.results["outer_type"] == "crypto_LUKS"
    # and the host sees a LUKS2 header on the partition, not the ext4 it started with
    with open(persistent_disk, "rb") as disk:
        disk.seek(2048 * 512)
        assert disk.read(6) == b"LUKS\xba\xbe"


def test_pcr_extend_in_guest_is_visible_on_next_read(vm_node):
    node = vm_node()
    script = """
import hashlib
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM
with TPM("/dev/tpmrm0") as tpm:
    before = tpm.pcr_read([16])[16]
    tpm.pcr_extend(16, b"kcrypt-vm-test")
with TPM("/dev/tpmrm0") as tpm:
    after = tpm.pcr_read([16])[16]
print("KCRYPT-VM-RESULT before", before.hex())
print("KCRYPT-VM-RESULT after", after.hex())
print("KCRYPT-VM-RESULT expected", hashlib.sha256(before + hashlib.sha256(b"kcrypt-vm-test").digest()).hexdigest())
"""
    boot = node.boot("cd /kcrypt/bin && python3 -c 'import _checkout; _checkout.setup(); exec(open(\"/job/pcr.py\").read())'\n",
                     files={"pcr.py": script})
    assert boot.ok, boot.output
    assert boot.results["before"] == "00" * 32  # PCR 16 starts at zero after TPM2_Startup(CLEAR)
    # PCR_new = SHA-256(PCR_old || SHA-256(data)): TPM.pcr_extend extends with the data's digest
    assert boot.results["after"] == boot.results["expected"]


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from port %d" % self.server.server_address[1]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_guest_reaches_only_forwarded_host_ports(vm_node):
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Hello) for _server in range(2)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    forwarded, other = (s.server_address[1] for s in servers)
    try:
        node = vm_node(forwards=[forwarded])
        boot = node.boot("""
python3 - <<'PY'
import urllib.request
for name, port in (("first", %(forwarded)d), ("second", %(forwarded)d), ("other", %(other)d)):
    try:
        body = urllib.request.urlopen("http://10.0.2.2:%%d/" %% port, timeout=5).read().decode()
    except Exception as error:
        body = "unreachable: %%s" %% error
    print("KCRYPT-VM-RESULT", name, body)
PY
""" % {"forwarded": forwarded, "other": other})
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert boot.ok, boot.output
    assert boot.results["first"] == "hello from port %d" % forwarded
    assert boot.results["second"] == "hello from port %d" % forwarded  # one connection per request, not one per boot
    assert boot.results["other"].startswith("unreachable")
