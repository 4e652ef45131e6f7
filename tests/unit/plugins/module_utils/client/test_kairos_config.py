# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Kairos config reading: real files in a temporary tree standing in for /oem, /sysroot/oem, /run/cos/oem."""

from __future__ import annotations

import os
import time

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.client import kairos_config as client_config
from ansible_collections.kairos.kcrypt.plugins.module_utils.client.kairos_config import ConfigError, read_settings
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError


@pytest.fixture
def roots(tmp_path):
    dirs = [tmp_path / "oem", tmp_path / "sysroot-oem", tmp_path / "run-cos-oem"]
    for d in dirs:
        d.mkdir()
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("BOOT_IMAGE=/vmlinuz console=tty1 root=LABEL=COS_ACTIVE rd.neednet=1\n")
    return dirs, cmdline


def write(path, text):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(str(path), "w") as handle:
        handle.write(text)


def settings(roots, cmdline=None):
    dirs, cmdline_file = roots
    if cmdline is not None:
        cmdline_file.write_text(cmdline)
    return read_settings([str(d) for d in dirs], str(cmdline_file))


def test_defaults_without_any_config(roots):
    s = settings(roots)
    assert (s.challenger_server, s.mdns, s.certificate, s.nv_index, s.c_index, s.tpm_device) == (
        "", False, "", 0x1500000, 0x81000008, "",
    )
    assert s.remote is False
    assert s.sources == ("cmdline",)


def test_file_with_header_is_read_and_file_without_is_skipped(roots):
    dirs = roots[0]
    write(dirs[0] / "90_kcrypt.yaml", "#cloud-config\nkcrypt:\n  challenger:\n    challenger_server: http://kms:8082\n")
    write(dirs[0] / "91_noheader.yaml", "kcrypt:\n  challenger:\n    challenger_server: http://ignored\n    mdns: true\n")
    s = settings(roots)
    assert s.challenger_server == "http://kms:8082"
    assert s.mdns is False
    assert s.remote is True
    assert s.sources == (str(dirs[0] / "90_kcrypt.yaml"), "cmdline")


def test_header_rules(roots):
    dirs = roots[0]
    nine_comments = "# comment\n" * 9
    write(dirs[0] / "a.yaml", nine_comments + "#kairos-config  \nkcrypt: {challenger: {certificate: tenth-line}}\n")
    write(dirs[0] / "b.yml", "#node-config\nkcrypt: {tpm_device: /dev/tpm0}\n")
    write(dirs[0] / "c.yaml", nine_comments + "\n#cloud-config\nkcrypt: {nv_index: '0x1500001'}\n")  # 11th line
    write(dirs[0] / "d.txt", "#cloud-config\nkcrypt: {c_index: '0x81000009'}\n")  # extension
    write(dirs[0] / "e.yaml", "#cloud-config\n#" + "x" * (1024 * 1024) + "\nkcrypt: {c_index: '0x8100000a'}\n")  # > 1 MiB
    s = settings(roots)
    assert s.certificate == "tenth-line"
    assert s.tpm_device == "/dev/tpm0"
    assert s.nv_index == 0x1500000
    assert s.c_index == 0x81000008


def test_later_directories_and_files_win_and_maps_merge(roots):
    dirs = roots[0]
    write(dirs[0] / "10.yaml", "#cloud-config\nkcrypt:\n  challenger:\n    challenger_server: http://first\n    certificate: CERT\n")
    write(dirs[0] / "sub" / "20.yaml", "#cloud-config\nkcrypt:\n  challenger:\n    challenger_server: http://second\n")
    write(dirs[2] / "00.yaml", "#cloud-config\nkcrypt:\n  challenger:\n    challenger_server: http://third\n")
    s = settings(roots)
    assert s.challenger_server == "http://third"
    assert s.certificate == "CERT"  # merged, not replaced
    assert [os.path.basename(p) for p in s.sources] == ["10.yaml", "20.yaml", "00.yaml", "cmdline"]


def test_cmdline_overrides_files_and_converts_booleans(roots):
    dirs = roots[0]
    write(dirs[1] / "kcrypt.yaml", "#cloud-config\nkcrypt:\n  challenger:\n    challenger_server: http://file\n    mdns: false\n")
    s = settings(roots, 'quiet kcrypt.challenger.challenger_server="http://kms.local:8082" kcrypt.challenger.mdns=true\n')
    assert s.challenger_server == "http://kms.local:8082"
    assert s.mdns is True
    assert settings(roots, "kcrypt.challenger.mdns=false").mdns is False
    assert settings(roots, "kcrypt.challenger.mdns").mdns is True  # a bare token means true


def test_mdns_alone_selects_remote_mode(roots):
    s = settings(roots, "kcrypt.challenger.mdns=true")
    assert (s.challenger_server, s.mdns, s.remote) == ("", True, True)


def test_both_key_locations_top_level_wins(roots):
    dirs = roots[0]
    write(dirs[0] / "legacy.yaml", (
        "#cloud-config\nkcrypt:\n  challenger:\n    nv_index: '0x1500001'\n    c_index: '0x81000009'\n"
        "    tpm_device: /dev/tpm0\n"
    ))
    s = settings(roots)
    assert (s.nv_index, s.c_index, s.tpm_device) == (0x1500001, 0x81000009, "/dev/tpm0")

    write(dirs[0] / "newest.yaml", "#cloud-config\nkcrypt:\n  nv_index: 0x1500002\n  c_index: '2164260874'\n  tpm_device: /dev/tpmrm1\n")
    s = settings(roots)
    assert (s.nv_index, s.c_index, s.tpm_device) == (0x1500002, 0x8100000A, "/dev/tpmrm1")

    # The agent injects the legacy location on the cmdline: it still loses to a top-level file value.
    s = settings(roots, "kcrypt.challenger.nv_index=0x1500003 kcrypt.challenger.tpm_device=/dev/tpm9")
    assert (s.nv_index, s.tpm_device) == (0x1500002, "/dev/tpmrm1")
    # ... while a top-level cmdline value overrides the file.
    assert settings(roots, "kcrypt.nv_index=0x1500004").nv_index == 0x1500004


def test_malformed_file_is_a_clear_error_naming_it(roots):
    dirs = roots[0]
    write(dirs[0] / "good.yaml", "#cloud-config\nkcrypt: {challenger: {challenger_server: http://kms}}\n")
    bad = dirs[1] / "broken.yaml"
    write(bad, "#cloud-config\nkcrypt:\n  challenger:\n    challenger_server: [unclosed\n")
    with pytest.raises(ConfigError) as failure:
        settings(roots)
    message = str(failure.value)
    assert message.startswith("Kairos config file %s is not valid YAML at line " % bad)


def test_file_that_is_not_a_mapping_is_an_error(roots):
    dirs = roots[0]
    write(dirs[0] / "list.yaml", "#cloud-config\n- a\n- b\n")
    with pytest.raises(ConfigError, match=r"list.yaml must hold a mapping \(key: value\), not a list"):
        settings(roots)


def test_type_clash_under_kcrypt_is_an_error_elsewhere_the_later_value_wins(roots):
    dirs = roots[0]
    write(dirs[0] / "a.yaml", "#cloud-config\nkcrypt:\n  challenger: {challenger_server: http://kms}\nrd: plain\n")
    s = settings(roots)  # the cmdline's rd.neednet=1 replaces the unrelated scalar "rd"
    assert s.challenger_server == "http://kms"
    write(dirs[0] / "b.yaml", "#cloud-config\nkcrypt:\n  challenger: oops\n")
    with pytest.raises(ConfigError, match=r"b.yaml sets kcrypt.challenger to a str, but an earlier file made it a dict"):
        settings(roots)


def test_bad_values_name_their_key(roots):
    dirs = roots[0]
    write(dirs[0] / "a.yaml", "#cloud-config\nkcrypt:\n  nv_index: banana\n")
    with pytest.raises(KcryptError, match=r"kcrypt.nv_index='banana' is not a valid TPM handle"):
        settings(roots)
    write(dirs[0] / "a.yaml", "#cloud-config\nkcrypt:\n  challenger: {mdns: maybe}\n")
    with pytest.raises(ConfigError, match=r"kcrypt.challenger.mdns must be true or false, not 'maybe'"):
        settings(roots)
    write(dirs[0] / "a.yaml", "#cloud-config\nkcrypt:\n  challenger: {protocol: carrier-pigeon}\n")
    with pytest.raises(ConfigError, match=r"protocol must be one of attestation, legacy"):
        settings(roots)


def test_extensions_mdns_interfaces_and_protocol(roots):
    dirs = roots[0]
    write(dirs[0] / "a.yaml", "#cloud-config\nkcrypt:\n  challenger:\n    mdns_interfaces: [eth0, 10.0.0.5]\n    protocol: Legacy\n")
    s = settings(roots)
    assert (s.mdns_interfaces, s.protocol) == (("eth0", "10.0.0.5"), "legacy")
    os.unlink(str(dirs[0] / "a.yaml"))
    assert settings(roots, "kcrypt.challenger.mdns_interfaces=eth1,eth2").mdns_interfaces == ("eth1", "eth2")


def test_missing_cmdline_is_tolerated(tmp_path):
    s = read_settings([str(tmp_path / "absent")], str(tmp_path / "no-cmdline"))
    assert s.sources == ()


@pytest.mark.parametrize("cmdline, livecd", [
    ("BOOT_IMAGE=/boot/vmlinuz root=live:CDLABEL=KAIROS rd.live.dir=/ rd.live.squashimg=rootfs.squashfs", True),
    ("root=live:LABEL=KAIROS", True),
    ("netboot rd.neednet=1", True),
    ("root=LABEL=COS_ACTIVE cos-img/filename=/cOS/active.img", False),
    ("root=LABEL=COS_SYSTEM recovery-mode", False),
    ("kairos.reset root=live:CDLABEL=KAIROS", False),  # reset is checked first
    ("kairos.ram.oem=64 root=live:CDLABEL=KAIROS", False),  # issue 13: an in-RAM child flag is an installed boot
    ("console=tty1", False),
])
def test_livecd_detection_non_uki(cmdline, livecd, tmp_path):
    assert client_config.is_livecd_boot(cmdline, str(tmp_path)) is livecd


def test_livecd_detection_uki_follows_upstreams_efi_rule(tmp_path):
    """kairos-sdk EfiBootFromInstall: any non-empty LoaderDevicePartUUID file means "booted from a disk"."""
    efivar = tmp_path / client_config.LOADER_DEVICE_PART_UUID
    assert client_config.is_livecd_boot("rd.immucore.uki console=ttyS0", str(tmp_path)) is True  # no variable
    efivar.write_bytes(b"")
    assert client_config.is_livecd_boot("rd.immucore.uki", str(tmp_path)) is True  # empty file
    efivar.write_bytes(b"\x06\x00\x00\x00")  # efivarfs attributes only: non-empty, so upstream says installed
    assert client_config.is_livecd_boot("rd.immucore.uki", str(tmp_path)) is False
    efivar.write_bytes(b"\x06\x00\x00\x00" + "1234-abcd".encode("utf-16-le"))
    assert client_config.is_livecd_boot("rd.immucore.uki", str(tmp_path)) is False  # booted from a disk
    entry = tmp_path / client_config.LOADER_ENTRY_SELECTED
    entry.write_bytes(b"\x06\x00\x00\x00" + "passive.conf\x00".encode("utf-16-le"))
    assert client_config.boot_state("rd.immucore.uki", str(tmp_path)) == client_config.PASSIVE
    entry.write_bytes(b"\x06\x00\x00\x00" + "statereset.conf".encode("utf-16-le"))
    assert client_config.boot_state("rd.immucore.uki", str(tmp_path)) == client_config.AUTORESET
    assert client_config.boot_state("rd.immucore.uki kairos.ram", str(tmp_path / "none")) == client_config.ACTIVE


# -- issue 13: every configuration source, and a broken one at boot ------------------------


def test_kms_set_through_kairos_config_stanza_selects_remote_mode(roots):
    """kairos.config= sets the KMS (values are strings there, so mdns: "true" counts as true)."""
    s = settings(roots, "root=LABEL=COS_ACTIVE kairos.config=kcrypt.challenger.challenger_server=http://kms:8082 "
                        "kairos.config=kcrypt.challenger.mdns=true")
    assert (s.challenger_server, s.mdns, s.remote) == ("http://kms:8082", True, True)
    # the stanza wins over a generic token for the same key, as upstream merges it on top
    s = settings(roots, "kairos.config=kcrypt.challenger.challenger_server=http://stanza "
                        "kcrypt.challenger.challenger_server=http://generic")
    assert s.challenger_server == "http://stanza"
    assert settings(roots, "cos.setup=kcrypt.challenger.challenger_server=http://legacy").challenger_server == "http://legacy"


def test_config_url_from_a_file_and_the_cmdline_with_upstreams_precedence(roots, tmp_path):
    from support.http_files import FileServer

    dirs = roots[0]
    served = tmp_path / "served"
    served.mkdir()
    with FileServer(served) as server:
        (served / "kms.yaml").write_text("#cloud-config\nkcrypt:\n  challenger:\n    challenger_server: http://remote-kms\n    mdns: false\n")
        (served / "boot.yaml").write_text("#cloud-config\nkcrypt:\n  nv_index: '0x1500009'\n")
        write(dirs[0] / "10.yaml", "#cloud-config\nconfig_url: %s\nkcrypt:\n  challenger:\n    challenger_server: http://local\n    mdns: true\n"
              % server.url("kms.yaml"))
        write(dirs[0] / "20.yaml", "#cloud-config\nkcrypt:\n  challenger:\n    certificate: PEM\n")
        s = settings(roots)
        # the remote config overrides the file that names it; later files then win over both
        assert (s.challenger_server, s.mdns, s.certificate) == ("http://remote-kms", False, "PEM")
        assert s.sources == (str(dirs[0] / "10.yaml"), server.url("kms.yaml"), str(dirs[0] / "20.yaml"), "cmdline")
        s = settings(roots, "kairos.config_url=%s kcrypt.challenger.challenger_server=http://cmdline" % server.url("boot.yaml"))
        assert (s.challenger_server, s.nv_index) == ("http://cmdline", 0x1500009)


def test_unreachable_config_url_is_an_error_and_skipped_at_boot(roots, tmp_path):
    from support.ports import free_port

    dirs = roots[0]
    url = "http://127.0.0.1:%d/kms.yaml" % free_port()  # nothing listens there
    write(dirs[0] / "10.yaml", "#cloud-config\nconfig_url: %s\nkcrypt:\n  challenger:\n    challenger_server: http://local\n" % url)
    with pytest.raises(ConfigError, match=r"config_url %s cannot be fetched after 3 attempt\(s\).*refused" % url):
        read_settings([str(d) for d in dirs], str(roots[1]), retry_delay=0)
    warnings = []
    s = read_settings([str(d) for d in dirs], str(roots[1]), at_boot=True, warn=warnings.append, retry_delay=0)
    assert s.challenger_server == "http://local"  # the file itself still counts
    assert len(warnings) == 1 and warnings[0].startswith("config_url %s cannot be fetched" % url)
    assert warnings[0].endswith("skipped (the node boots on the rest of its config, as Kairos does)")


def test_config_url_fetch_is_bounded_by_its_timeout(roots):
    from support.http_files import SilentServer

    with SilentServer() as silent:
        write(roots[0][0] / "10.yaml", "#cloud-config\nconfig_url: %s\n" % silent.url())
        started = time.monotonic()
        with pytest.raises(ConfigError, match="cannot be fetched after 3 attempt.*timeout 0.3s each.*timed out"):
            read_settings([str(d) for d in roots[0]], "", fetch_timeout=0.3, retry_delay=0)
        assert time.monotonic() - started < 10  # 3 x 0.3 s plus scheduling; upstream would wait forever
        # one budget for the whole read
        started = time.monotonic()
        with pytest.raises(ConfigError, match="time for fetching config_urls ran out"):
            read_settings([str(d) for d in roots[0]], "", fetch_timeout=5, fetch_budget=0.5, retry_delay=0)
        assert time.monotonic() - started < 10


def test_config_url_that_cannot_be_used(roots, tmp_path):
    from support.http_files import FileServer

    dirs = roots[0]

    def read(url):
        write(dirs[0] / "10.yaml", "#cloud-config\nconfig_url: '%s'\n" % url)
        return read_settings([str(d) for d in dirs], "", retry_delay=0)

    with pytest.raises(ConfigError, match=r"is a template \(\{\{ \}\}\)"):
        read("http://boot/{{ .Values.product.uuid }}.yaml")
    with pytest.raises(ConfigError, match="only http:// and https:// URLs are supported"):
        read("/oem/extra.yaml")
    served = tmp_path / "served"
    served.mkdir()
    with FileServer(served) as server:
        (served / "loop.yaml").write_text("#cloud-config\nconfig_url: %s\n" % server.url("loop.yaml"))
        with pytest.raises(ConfigError, match="comes back to itself"):
            read(server.url("loop.yaml"))
        (served / "big.yaml").write_text("#cloud-config\n" + "a: b\n" * 300000)
        with pytest.raises(ConfigError, match="holds more than 1 MiB"):
            read(server.url("big.yaml"))
        (served / "broken.yaml").write_text("#cloud-config\nkcrypt: [unclosed\n")
        with pytest.raises(ConfigError, match=r"config_url http://127.0.0.1:\d+/broken.yaml is not valid YAML at line"):
            read(server.url("broken.yaml"))
        with pytest.raises(ConfigError, match="unexpected status 404"):
            read(server.url("missing.yaml"))


def test_malformed_file_at_boot_is_reported_and_skipped(roots):
    """Issue 13 item 2: at boot a broken unrelated file must not block unlock (upstream warns and carries on)."""
    dirs = roots[0]
    write(dirs[0] / "10_kms.yaml", "#cloud-config\nkcrypt: {challenger: {challenger_server: http://kms}}\n")
    bad = dirs[1] / "50_broken.yaml"
    write(bad, "#cloud-config\nstages:\n  boot: [unclosed\n")
    write(dirs[1] / "60_list.yaml", "#cloud-config\n- a\n")
    write(dirs[2] / "70_clash.yaml", "#cloud-config\nkcrypt:\n  challenger: oops\n")
    warnings = []
    s = read_settings([str(d) for d in dirs], str(roots[1]), at_boot=True, warn=warnings.append)
    assert s.challenger_server == "http://kms"
    assert len(warnings) == 3
    assert warnings[0].startswith("Kairos config file %s is not valid YAML at line 4, column 1: expected" % bad)
    assert "60_list.yaml must hold a mapping" in warnings[1]
    assert "70_clash.yaml sets kcrypt.challenger to a str" in warnings[2]
    assert s.sources == (str(dirs[0] / "10_kms.yaml"), "cmdline")
    with pytest.raises(ConfigError, match="50_broken.yaml is not valid YAML"):
        read_settings([str(d) for d in dirs], str(roots[1]))  # modules and the interactive CLI: an error


def test_cmdline_tokenizer_is_google_shlex():
    split = client_config.split_cmdline
    assert split('a="b c" d\\ e f') == ["a=b c", "d e", "f"]
    assert split("a='x\"y' b") == ['a=x"y', "b"]
    assert split('a b="unclosed c') == ["a"]  # Go's Split stops at the error, keeping earlier tokens
    assert split("a #comment b\nc") == ["a", "c"]  # a token starting with # comments out the line
    assert split("a#b") == ["a#b"]
    assert split('"x\\qy"') == ["xqy"]  # inside double quotes an escape keeps the next character
