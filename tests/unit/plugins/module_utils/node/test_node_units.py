# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Unit tests of the node side's pure parts: UUIDs, LUKS options, recovery keys, selectors, CLI parsing."""

from __future__ import annotations

import os
import re

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.client import kms_client
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.node import encryption, key_source, luks, recovery
from ansible_collections.kairos.kcrypt.plugins.module_utils.node.blockdev import BlockDevice
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.command import CommandError, run, secret_pipe
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.cli.kcrypt import build_parser


def test_uuid_for_label_matches_upstream_vectors():
    # checklist 44, and the blkid output quoted in kairos#2580
    assert luks.uuid_for_label("COS_PERSISTENT") == "85c39d0f-4867-5227-8334-f5eec606d9eb"
    assert luks.uuid_for_label("COS_OEM") == "8bfa06f9-ca4f-56dc-90c9-49cf20f4f45e"


def test_luks_options_arguments():
    options = luks.LuksOptions(cipher="aes-xts-plain64", key_size=512, hash="sha512", sector_size=4096,
                               pbkdf="argon2id", iter_time_ms=250, memory_kib=65536, parallel=2)
    assert options.validate().format_args() == [
        "--type", "luks2", "--cipher", "aes-xts-plain64", "--key-size", "512", "--hash", "sha512",
        "--sector-size", "4096", "--pbkdf", "argon2id", "--iter-time", "250", "--pbkdf-memory", "65536",
        "--pbkdf-parallel", "2",
    ]
    assert luks.LuksOptions().format_args() == ["--type", "luks2"]


@pytest.mark.parametrize("options, message", [
    (luks.LuksOptions(type="luks1"), "only LUKS2"),
    (luks.LuksOptions(iter_time_ms=5, iterations=1000), "not both"),
    (luks.LuksOptions(pbkdf="pbkdf2", memory_kib=1024), "argon2"),
    (luks.LuksOptions(pbkdf="scrypt"), "must be one of"),
    (luks.LuksOptions(key_size=0), "positive"),
])
def test_luks_options_rejects_bad_combinations(options, message):
    with pytest.raises(KcryptError, match=message):
        options.validate()


def test_generated_keys_get_upstream_iter_time_unless_set():
    tpm = key_source.TpmKeySource("swtpm:host=127.0.0.1,port=1")
    given = key_source.PassphraseKeySource("correct horse battery staple")
    assert encryption.effective_options(luks.LuksOptions(), tpm).iter_time_ms == 5
    assert encryption.effective_options(luks.LuksOptions(), given).iter_time_ms is None
    chosen = luks.LuksOptions(pbkdf="pbkdf2", iterations=1000)
    assert encryption.effective_options(chosen, tpm) == chosen


def test_recovery_key_shape_and_uniqueness():
    keys = set(recovery.generate_recovery_key() for count in range(20))
    assert len(keys) == 20
    for key in keys:
        assert re.fullmatch(rb"([cbdefghijklnrtuv]{8}-){7}[cbdefghijklnrtuv]{8}", key)


def test_selector_validation():
    with pytest.raises(KcryptError, match="not both"):
        encryption.Selector(device="/dev/vdb1", uuid="x").validate()
    with pytest.raises(KcryptError, match="needs a label"):
        encryption.Selector().validate()
    assert encryption.Selector(device="/dev/vdb1", label="DATA").validate().describe() == "device=/dev/vdb1, label=DATA"


def test_kairos_label_falls_back_to_gpt_name():
    assert BlockDevice("/dev/vda5", "vda5", 1, label="", partlabel="persistent").kairos_label == "COS_PERSISTENT"
    assert BlockDevice("/dev/vda2", "vda2", 1, label="unknown", partlabel="oem").kairos_label == "COS_OEM"
    assert BlockDevice("/dev/vda3", "vda3", 1, label="DATA", partlabel="persistent").kairos_label == "DATA"
    assert BlockDevice("/dev/vda4", "vda4", 1, partlabel="other").kairos_label == ""


def test_key_source_build_validates():
    with pytest.raises(KcryptError, match="non-empty passphrase"):
        key_source.build({"key_source": "passphrase", "passphrase": ""})
    with pytest.raises(KcryptError, match="only used with key_source=passphrase"):
        key_source.build({"key_source": "tpm", "passphrase": "x"})
    with pytest.raises(KcryptError, match="nv_index"):
        key_source.build({"key_source": "tpm", "nv_index": "0x81000000"})
    source = key_source.build({"key_source": "passphrase", "passphrase": "s3cret-value"})
    assert source.existing_key(None) == b"s3cret-value"
    assert b"s3cret-value" in source.secrets
    assert "s3cret" not in source.describe()


def test_auto_key_source_follows_the_kairos_config(tmp_path):
    oem = tmp_path / "oem"
    oem.mkdir()
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("BOOT_IMAGE=/vmlinuz console=ttyS0\n")
    (oem / "90_kcrypt.yaml").write_text("#cloud-config\nkcrypt:\n  nv_index: '0x1500002'\n  c_index: '0x8100000a'\n")
    offline = key_source.build({"key_source": "auto"}, config_dirs=[str(oem)], cmdline_path=str(cmdline))
    assert isinstance(offline, key_source.TpmKeySource)
    assert (offline.nv_index, offline.c_index) == (0x1500002, 0x8100000A)
    explicit = key_source.build({"key_source": "auto", "nv_index": "0x1500003"}, config_dirs=[str(oem)], cmdline_path=str(cmdline))
    assert explicit.nv_index == 0x1500003  # an explicit option wins over the config

    cmdline.write_text("quiet kcrypt.challenger.challenger_server=http://10.0.2.2:8082 kcrypt.challenger.protocol=legacy\n")
    online = key_source.build({"key_source": "auto", "kms_attempts": 3}, config_dirs=[str(oem)], cmdline_path=str(cmdline))
    assert isinstance(online, key_source.KmsKeySource)
    assert (online.config.challenger_server, online.config.protocol, online.config.attempts) == ("http://10.0.2.2:8082", "legacy", 3)
    assert online.config.c_index == 0x8100000A


def test_unlock_all_skips_a_broken_config_file_with_a_warning_and_unlock_refuses(tmp_path, monkeypatch):
    """Issue 13 item 2: `kcrypt unlock-all --key-source auto` runs at boot, where upstream warns about a
    malformed #cloud-config file and carries on; `kcrypt unlock` (interactive) names the file and stops."""
    import io

    from ansible_collections.kairos.kcrypt.plugins.module_utils.cli import kcrypt as kcrypt_cli
    from ansible_collections.kairos.kcrypt.plugins.module_utils.node import unlock

    oem = tmp_path / "oem"
    oem.mkdir()
    (oem / "10_kms.yaml").write_text("#cloud-config\nkcrypt:\n  challenger:\n    challenger_server: http://10.0.2.2:8082\n")
    (oem / "50_broken.yaml").write_text("#cloud-config\nstages: {boot: [unclosed\n")
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("root=LABEL=COS_ACTIVE\n")
    sources = []
    monkeypatch.setattr(unlock, "plan_open", lambda targets: [])  # no disks to open: only the key source matters
    monkeypatch.setattr(unlock, "verify_keys", lambda plans, source: sources.append(source))
    common = ["--key-source", "auto", "--config-dir", str(oem), "--cmdline", str(cmdline), "--check"]
    out, err = io.StringIO(), io.StringIO()
    assert kcrypt_cli.main(["unlock-all"] + common, out=out, err=err, stdin=io.BytesIO()) == 0, err.getvalue()
    assert err.getvalue().startswith("kcrypt: warning: Kairos config: Kairos config file %s is not valid YAML at line"
                                     % (oem / "50_broken.yaml"))
    assert isinstance(sources[0], key_source.KmsKeySource)  # the good file still chose the KMS
    assert sources[0].config.challenger_server == "http://10.0.2.2:8082"
    out, err = io.StringIO(), io.StringIO()
    assert kcrypt_cli.main(["unlock", "--label", "COS_PERSISTENT"] + common, out=out, err=err, stdin=io.BytesIO()) == 1
    assert err.getvalue().startswith("Error: Kairos config file %s is not valid YAML" % (oem / "50_broken.yaml"))


def test_kms_key_source_reads_the_certificate_file(tmp_path):
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    path = tmp_path / "ca.pem"
    path.write_text(pem)
    source = key_source.build({"key_source": "kms", "challenger_server": "https://kms:8082", "certificate": str(path)})
    assert kms_client.certificate_pem(source.config.certificate) == pem
    # A missing file is named before the TPM is opened (it does not exist here) or the KMS dialled.
    missing = key_source.build({"key_source": "kms", "challenger_server": "https://kms:8082",
                                "certificate": str(tmp_path / "no.pem"), "tpm_device": "/nonexistent/tpm"})
    with pytest.raises(KcryptError, match="certificate .*cannot read %s" % (tmp_path / "no.pem")):
        kms_client.get_passphrase(missing.config, PartitionRef(label="COS_PERSISTENT"))
    with pytest.raises(KcryptError, match="needs challenger_server"):
        key_source.build({"key_source": "kms"})


def test_run_feeds_stdin_and_reports_stderr_not_input():
    assert run(["cat"], "echoing", stdin=b"abc").stdout == b"abc"
    with pytest.raises(CommandError) as caught:
        run(["sh", "-c", "cat >/dev/null; echo broken >&2; exit 3"], "a failing step", stdin=b"TOPSECRET")
    assert "a failing step failed: sh exited with 3: broken" in str(caught.value)
    assert "TOPSECRET" not in str(caught.value)
    with pytest.raises(KcryptError, match="not installed"):
        run(["no-such-program-kcrypt"], "testing")


def test_secret_pipe_passes_data_without_files():
    with secret_pipe(b"second secret") as (path, fd):
        assert run(["cat", path], "reading a pipe", pass_fds=(fd,)).stdout == b"second secret"


def test_cli_partition_spec_and_required_mode():
    parser = build_parser()
    args = parser.parse_args(["encrypt", "--mode", "in_place", "--partition", "device=/dev/vdb1,label=DATA", "--label", "COS_OEM"])
    assert args.partition == [{"device": "/dev/vdb1", "label": "DATA"}]
    assert args.label == ["COS_OEM"]
    with pytest.raises(SystemExit):
        parser.parse_args(["encrypt", "--label", "X"])  # --mode is required: no implicit destructive default
    with pytest.raises(SystemExit):
        parser.parse_args(["encrypt", "--mode", "format", "--partition", "size=3"])


class _Recorder:
    """Stands in for command.run at the cryptsetup/mkfs boundary: records (argv, stdin), succeeds."""

    def __init__(self, fail=()):
        self.calls = []
        self.fail = list(fail)

    def __call__(self, argv, what, stdin=b"", ok_codes=(0,), pass_fds=(), timeout=None):
        self.calls.append((list(argv), stdin))
        if self.fail:
            raise self.fail.pop(0)
        import subprocess

        return subprocess.CompletedProcess(argv, 0, b"", b"")


def test_format_runs_upstreams_command_sequence(monkeypatch):
    """Checklist 43, argument by argument (the VM suite runs the same sequence on a real kernel)."""
    from ansible_collections.kairos.kcrypt.plugins.module_utils.node import blockdev, filesystem

    recorder = _Recorder()
    monkeypatch.setattr(luks, "run", recorder)
    monkeypatch.setattr(filesystem, "run", recorder)
    monkeypatch.setattr(blockdev, "wait_for", lambda path: None)
    device = BlockDevice(path="/dev/vda5", name="vda5", size=1 << 30)
    item = encryption.PartitionPlan(encryption.Selector(label="COS_PERSISTENT"), device, "COS_PERSISTENT", "format",
                                    luks_uuid=luks.uuid_for_label("COS_PERSISTENT"))
    options = encryption.effective_options(luks.LuksOptions(), key_source.TpmKeySource("swtpm:host=127.0.0.1,port=1"))
    key = b"0123456789abcdefghijklmnopqrstuv"
    encryption._format(item, key, options)
    assert recorder.calls == [
        (["cryptsetup", "luksFormat", "-q", "--type", "luks2", "--iter-time", "5", "--key-file", "-",
          "--uuid", "85c39d0f-4867-5227-8334-f5eec606d9eb", "--label", "COS_PERSISTENT", "/dev/vda5"], key),
        (["cryptsetup", "open", "--type", "luks", "--key-file", "-", "/dev/vda5", "vda5"], key),
        (["mkfs.ext4", "-q", "-F", "-L", "COS_PERSISTENT", "/dev/mapper/vda5"], b""),
        (["cryptsetup", "refresh", "--persistent", "--allow-discards", "--key-file", "-", "vda5"], key),
        (["cryptsetup", "close", "vda5"], b""),
    ]
    assert all(key not in b" ".join(arg.encode() for arg in argv) for argv, stdin in recorder.calls)


class _Source:
    def __init__(self, key=b"k"):
        self.key = key

    def existing_key(self, device, label):
        return self.key

    def describe(self):
        return "test key"


def test_unlock_retries_with_linearly_growing_pauses(monkeypatch):
    """Checklist 45: up to 10 attempts, sleeping attempt x 1 s, mapping named after the kernel name."""
    from ansible_collections.kairos.kcrypt.plugins.module_utils.node import unlock

    device = BlockDevice(path="/dev/vda5", name="vda5", size=1 << 30, fstype="crypto_LUKS", label="COS_PERSISTENT")
    sleeps = []
    failures = [CommandError("opening /dev/vda5", ["cryptsetup"], 5, "device busy")] * 3
    recorder = _Recorder(fail=failures)
    monkeypatch.setattr(luks, "run", recorder)
    plans = [unlock.UnlockPlan(device, "COS_PERSISTENT", device.name, "open")]
    results = unlock.apply_open(plans, _Source(), sleep=sleeps.append)
    assert sleeps == [1.0, 2.0, 3.0] and results[0]["mapper"] == "/dev/mapper/vda5" and results[0]["changed"]
    assert [argv[-2:] for argv, stdin in recorder.calls] == [["/dev/vda5", "vda5"]] * 4

    sleeps[:] = []
    monkeypatch.setattr(luks, "run", _Recorder(fail=[CommandError("opening /dev/vda5", ["cryptsetup"], 5, "busy")] * 10))
    with pytest.raises(KcryptError, match="could not open /dev/vda5 after 10 attempts"):
        unlock.apply_open([unlock.UnlockPlan(device, "COS_PERSISTENT", "vda5", "open")], _Source(), sleep=sleeps.append)
    assert sleeps == [float(n) for n in range(1, 10)]

    sleeps[:] = []  # a wrong key is final (our deviation: upstream retries it too)
    monkeypatch.setattr(luks, "run", _Recorder(fail=[CommandError("opening /dev/vda5", ["cryptsetup"], luks.EXIT_WRONG_KEY, "No key available")]))
    with pytest.raises(luks.WrongKey):
        unlock.apply_open([unlock.UnlockPlan(device, "COS_PERSISTENT", "vda5", "open")], _Source(), sleep=sleeps.append)
    assert sleeps == []


def test_commands_run_in_a_private_working_directory_that_is_removed(tmp_path, monkeypatch):
    """cryptsetup reencrypt writes a temporary LUKS header into its working directory: never the caller's."""
    monkeypatch.chdir(tmp_path)
    script = 'stat -c %a .; pwd; echo header > LUKS2-temp-test.new'
    out = run(["sh", "-c", script], "writing a temporary file").stdout.decode().split()
    mode, workdir = out[0], out[1]
    assert mode == "700"
    assert workdir != str(tmp_path) and not os.path.exists(workdir)
    assert list(tmp_path.iterdir()) == []
