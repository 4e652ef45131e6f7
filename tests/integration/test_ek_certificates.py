# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Genuine TPMs only (issue 16 part 1): swtpm "manufacturers" with their own CAs, real EK certificates in NV.

Two manufacturers each certify their TPMs with their own swtpm-localca CA (swtpm_setup
--create-ek-cert --config ...). Both CAs carry swtpm's names (swtpm-localca-rootca,
swtpm-localca), so only signatures tell them apart. The KMS trusts manufacturer A.
Nodes run the collection's client against swtpm; the copied-certificate attack drives the
exchange by hand with a real TPM.
"""

from __future__ import annotations

import datetime
import io
import logging
import os
import shutil
import sqlite3
import time

import pytest
from cryptography import x509

from ansible_collections.kairos.kcrypt.plugins.module_utils.cli import challenger as challenger_cli
from ansible_collections.kairos.kcrypt.plugins.module_utils.client import kms_client as client
from ansible_collections.kairos.kcrypt.plugins.module_utils.common import messages
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import ek_certificate, policy, server, store
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import EK_CHAIN_NV_RANGE, TPM
from support import ek_pki
from support.challenger import ChallengerProcess, ChallengerThread, connect
from support.ports import free_port
from support.swtpm import Manufacturer, write_nv_certificate
from support.stores import make_store_target

PERSISTENT = PartitionRef(label="COS_PERSISTENT", device_name="vda5")
EK_CERTIFICATE_INDEX = 0x01C00002


@pytest.fixture(scope="module")
def vendors(tmp_path_factory):
    base = tmp_path_factory.mktemp("vendors")
    return {"a": Manufacturer(str(base / "a")), "b": Manufacturer(str(base / "b"))}


def _identify(tpm):
    with TPM(tpm.tcti) as handle:
        tpm.identity = handle.endorsement_key()
    return tpm


@pytest.fixture(scope="module")
def tpms(swtpm_factory, vendors):
    """A TPM of manufacturer A, one of manufacturer B, and one without EK certificate."""
    started = {"a": swtpm_factory(manufacturer=vendors["a"]), "b": swtpm_factory(manufacturer=vendors["b"]),
               "plain": swtpm_factory(ek_cert=False, fresh=True)}
    try:
        yield {key: _identify(tpm) for key, tpm in started.items()}
    finally:
        for tpm in started.values():
            tpm.stop()


@pytest.fixture
def new_tpm(swtpm_factory, vendors):
    """Make more TPMs of a manufacturer for one test; stopped after it."""
    started = []

    def make(vendor="a"):
        started.append(_identify(swtpm_factory(manufacturer=vendors[vendor])))
        return started[-1]

    yield make
    for tpm in started:
        tpm.stop()


@pytest.fixture(scope="module")
def trusted_a(vendors, tmp_path_factory):
    """Manufacturer A's CA bundle as an operator keeps it: root and intermediate in one PEM file."""
    path = str(tmp_path_factory.mktemp("ek-ca") / "vendor-a.pem")
    with open(path, "w") as bundle:
        bundle.write(open(vendors["a"].root).read() + open(vendors["a"].intermediate).read())
    return path


def _kms(kms_store, mode, ca_paths, enrollment="tofu"):
    trusted = ek_certificate.EKCertificatePolicy.from_settings(mode, ca_paths)
    store_calls = "inline" if kms_store.url.startswith("sqlite:") else "thread"
    return ChallengerThread(server.Challenger(policy.Policy(kms_store, enrollment=enrollment, ek_certificates=trusted),
                                              store_calls=store_calls))


def _config(kms, tpm, **kwargs):
    kwargs.setdefault("attempts", 1)
    kwargs.setdefault("retry_delay", 0.05)
    return client.ClientConfig(challenger_server=kms.url, tpm_device=tpm.tcti, **kwargs)


def _refused(kms, tpm, reason, **kwargs):
    with pytest.raises(client.AttestationRejected) as info:
        client.get_passphrase(_config(kms, tpm, **kwargs), PERSISTENT)
    text = str(info.value)
    assert text.startswith("attestation failed: Attestation verification failed: TPM %s refused on first contact: "
                           % tpm.identity.tpm_hash), text
    assert reason in text, text
    return text


def _wait_for_audit(caplog, *parts, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not any(r.name == "kcrypt.audit" and all(p in r.getMessage() for p in parts) for r in caplog.records):
        assert time.monotonic() < deadline, "no audit line with %s" % (parts,)
        time.sleep(0.05)


def _registration(name, tpm_hash):
    return store.new_volume(name, tpm_hash, partitions=[{"label": "COS_PERSISTENT"}])


@pytest.fixture
def sqlite_store(request, tmp_path):
    opened = make_store_target("sqlite", request, tmp_path).open()
    yield opened
    opened.close()


def test_require_enrols_the_trusted_manufacturers_tpms_only(store, tpms, trusted_a, caplog):
    """Manufacturer A's TPM enrols; B's (same CA names, other keys) and a TPM without certificate are refused on
    first contact, with the reason in the node's error, the log and the audit, and nothing is written; an
    administrator's registration of B's TPM is served."""
    caplog.set_level(logging.INFO, logger="kcrypt")
    hashes = {key: tpm.identity.tpm_hash for key, tpm in tpms.items()}
    with _kms(store, "require", [trusted_a]) as kms:
        first = client.get_passphrase(_config(kms, tpms["a"]), PERSISTENT)
        assert store.find_volume(hashes["a"]) is not None
        # the enrolment's log line says why it was admitted: the bundle's intermediate is trusted like its root
        assert "EK certificate trusted (TPM manufacturer id:00001014, model swtpm, version id:20191023, issued under " \
               "CN=swtpm-localca)" in caplog.text

        refused_b = _refused(kms, tpms["b"], "EK certificate not trusted: the trusted CA CN=swtpm-localca has the "
                                             "issuer's name but did not sign the EK certificate")
        assert refused_b.endswith("(TPM manufacturer id:00001014, model swtpm, version id:20191023)")
        _refused(kms, tpms["plain"], "no EK certificate: this KMS enrols only TPMs whose EK certificate chains")
        for key in ("b", "plain"):
            assert store.volumes_for(hashes[key]) == []
            assert store.get_secret("tofu-%s-cos-persistent" % hashes[key][:8]) is None
        # the server writes the audit line after it closed the connection: wait for it
        _wait_for_audit(caplog, "outcome=rejected tpm_hash=%s" % hashes["b"], "did not sign")
        _wait_for_audit(caplog, "outcome=rejected tpm_hash=%s" % hashes["plain"], "no EK certificate")
        assert any(r.name == "kcrypt.policy" and r.levelno == logging.WARNING and hashes["b"] in r.getMessage()
                   for r in caplog.records)

        # TPMs that have a SealedVolume are served by it: an administrator registered B's TPM.
        store.create_volume(_registration("vendor-b-node", hashes["b"]))
        assert client.get_passphrase(_config(kms, tpms["b"]), PERSISTENT)
        assert client.get_passphrase(_config(kms, tpms["a"]), PERSISTENT) == first


def test_verify_if_present_checks_only_certificates_that_come(sqlite_store, tpms, trusted_a):
    with _kms(sqlite_store, "verify-if-present", [trusted_a]) as kms:
        assert client.get_passphrase(_config(kms, tpms["plain"]), PERSISTENT)
        assert client.get_passphrase(_config(kms, tpms["a"]), PERSISTENT)
        _refused(kms, tpms["b"], "did not sign the EK certificate")
    assert sorted(v["spec"]["TPMHash"] for v in sqlite_store.list_volumes()) == sorted(
        [tpms["plain"].identity.tpm_hash, tpms["a"].identity.tpm_hash])


def test_intermediates_from_the_tpms_nv(sqlite_store, tpms, vendors, new_tpm, tmp_path):
    """The KMS trusts only A's root; a TPM that keeps A's intermediate in NV 0x01c00100 enrols, one without it does not."""
    root_only = str(tmp_path / "root.pem")
    shutil.copy(vendors["a"].root, root_only)
    chained = new_tpm("a")
    intermediate = ek_pki.der(x509.load_pem_x509_certificate(open(vendors["a"].intermediate, "rb").read()))
    write_nv_certificate(chained.tcti, EK_CHAIN_NV_RANGE[0], intermediate)
    with TPM(chained.tcti) as handle:
        assert handle.ek_certificate_chain() == (intermediate,)  # what the node sends
    with _kms(sqlite_store, "require", [root_only]) as kms:
        _refused(kms, tpms["a"], "it was issued by CN=swtpm-localca, which is not a trusted EK CA (--ek-ca)")
        assert client.get_passphrase(_config(kms, chained), PERSISTENT)
    assert [v["spec"]["TPMHash"] for v in sqlite_store.list_volumes()] == [chained.identity.tpm_hash]


def test_expired_certificate_and_a_certificate_for_another_key_in_nv(sqlite_store, tpms, vendors, new_tpm, trusted_a):
    """A vendor certificate that expired is refused; a TPM whose NV holds another TPM's certificate cannot even
    answer the challenge (the KMS challenges the certificate's key), in either protocol."""
    signer = x509.load_pem_x509_certificate(open(vendors["a"].intermediate, "rb").read())
    signer_key = ek_pki.load_swtpm_localca_key(vendors["a"].signing_key)
    expired_tpm = new_tpm("a")
    expired = ek_pki.ek_certificate(expired_tpm.identity.public_key, signer, signer_key,
                                    not_before=ek_pki.now() - 400 * datetime.timedelta(days=1),
                                    not_after=ek_pki.now() - datetime.timedelta(days=1))
    write_nv_certificate(expired_tpm.tcti, EK_CERTIFICATE_INDEX, ek_pki.der(expired))
    copier = new_tpm("a")
    write_nv_certificate(copier.tcti, EK_CERTIFICATE_INDEX, tpms["a"].identity.certificate_der)
    with _kms(sqlite_store, "require", [trusted_a]) as kms:
        _refused(kms, _identify(expired_tpm), "EK certificate not trusted: it expired on ")
        for protocol in ("attestation", "legacy"):
            with pytest.raises(KcryptError) as info:
                client.get_passphrase(_config(kms, copier, protocol=protocol), PERSISTENT)
            assert "activating the credential failed on the TPM" in str(info.value)  # the challenge is for A's EK
    assert sqlite_store.list_volumes() == []


def test_a_copied_certificate_with_the_nodes_own_ek_is_refused(sqlite_store, tpms, trusted_a):
    """An attacker sends a genuine TPM's (public) EK certificate with the EK of a software TPM it controls."""
    with _kms(sqlite_store, "require", [trusted_a]) as kms:
        with TPM(tpms["plain"].tcti) as tpm:
            ek = tpm.endorsement_key()
            ak = tpm.create_ak()
            init = messages.init_message(ek.spki_der, messages.AttestationParameters.from_attestation_key(ak),
                                         ek_certificate=tpms["a"].identity.certificate_der)
            ws = connect(kms.ws_url)
            try:
                ws.send(messages.write_json(init))
                challenge = messages.parse_challenge(messages.load_json_object(ws.recv(), "challenge"))
                secret = tpm.activate_credential(ak, challenge.credential, challenge.secret)
                quote, signature = tpm.quote(ak, messages.QUOTE_PCRS, qualifying_data=secret)
                pcr_quote = messages.PCRQuote(messages.QUOTE_VERSION, quote, signature, tpm.pcr_read(messages.QUOTE_PCRS))
                ws.send(messages.write_json(messages.proof_message(secret, pcr_quote)))
                response = messages.load_json_object(ws.recv(), "response")
            finally:
                ws.close()
    assert "passphrase" not in response
    assert ("EK certificate not trusted: it certifies another key (TPM hash %s) than the EK this TPM proved (TPM hash %s)"
            % (tpms["a"].identity.tpm_hash, ek.tpm_hash)) in response["error"]
    assert sqlite_store.list_volumes() == []


def test_the_legacy_protocol_enrols_nobody_and_serves_registrations(sqlite_store, tpms, trusted_a):
    """The legacy protocol never enrols on first contact (upstream), so it cannot be used to get around the
    check; registered TPMs are served over it whatever their certificate."""
    sqlite_store.create_secret(store.new_secret("vendor-b-static", {"passphrase": b"registered-by-an-admin"}))
    sqlite_store.create_volume(store.new_volume("vendor-b-node", tpms["b"].identity.tpm_hash, partitions=[
        {"label": "COS_PERSISTENT", "secret": {"name": "vendor-b-static", "path": "passphrase"}}]))
    with _kms(sqlite_store, "require", [trusted_a]) as kms:
        for tpm in (tpms["a"], tpms["plain"]):
            with pytest.raises(KcryptError, match="no volume found with data from request and hash: %s" % tpm.identity.tpm_hash):
                client.get_passphrase(_config(kms, tpm, protocol="legacy"), PERSISTENT)
        assert client.get_passphrase(_config(kms, tpms["b"], protocol="legacy"), PERSISTENT) == b"registered-by-an-admin"
        assert client.get_passphrase(_config(kms, tpms["b"]), PERSISTENT) == b"registered-by-an-admin"
    assert [v["metadata"]["name"] for v in sqlite_store.list_volumes()] == ["vendor-b-node"]


def _recovery_secrets(sqlite_store):
    with sqlite3.connect(sqlite_store.path) as db:
        return sorted(row[0] for row in db.execute("SELECT name FROM recovery_secrets"))


def test_recovery_escrow_takes_the_same_admission(sqlite_store, tpms, trusted_a):
    """/recovery-escrow needs a SealedVolume, which under ``require`` only a TPM with an accepted EK certificate gets
    by itself: B's TPM and one without certificate can neither enrol nor escrow, and nothing is written; A's TPM
    escrows once enrolled, and B's once an administrator registered it (as /tpm-attestation then serves it)."""
    key = b"recovery-key-" * 4
    with _kms(sqlite_store, "require", [trusted_a]) as kms:
        for vendor in ("b", "plain"):
            with pytest.raises(client.AttestationRejected) as info:
                client.escrow_recovery_key(_config(kms, tpms[vendor]), PERSISTENT, key)
            assert "TPM %s is not registered" % tpms[vendor].identity.tpm_hash in str(info.value)
            _refused(kms, tpms[vendor], "EK certificate")  # and /tpm-attestation does not enrol it either
            with pytest.raises(client.AttestationRejected, match="is not registered"):
                client.escrow_recovery_key(_config(kms, tpms[vendor]), PERSISTENT, key)
        assert sqlite_store.list_volumes() == [] and _recovery_secrets(sqlite_store) == []

        client.get_passphrase(_config(kms, tpms["a"]), PERSISTENT)
        assert client.escrow_recovery_key(_config(kms, tpms["a"]), PERSISTENT, key)
        sqlite_store.create_volume(_registration("vendor-b-node", tpms["b"].identity.tpm_hash))
        assert client.escrow_recovery_key(_config(kms, tpms["b"]), PERSISTENT, key)
    assert _recovery_secrets(sqlite_store) == sorted(["tofu-%s-cos-persistent-recovery" % tpms["a"].identity.tpm_hash[:8],
                                                      "vendor-b-node-cos-persistent-recovery"])


def test_the_server_command(tmp_path, tpms, vendors):
    """kcrypt-challenger serve --ek-certificate require --ek-ca DIR; a mode without CAs, or a wrong path, stops the start."""
    ca_dir = tmp_path / "ek-ca"
    ca_dir.mkdir()
    shutil.copy(vendors["a"].root, str(ca_dir / "vendor-a-root.pem"))
    shutil.copy(vendors["a"].intermediate, str(ca_dir / "vendor-a-intermediate.crt"))
    db = tmp_path / "kms.db"
    for args, error in ((["--ek-certificate", "require"], "--ek-certificate require needs the CA certificates"),
                        (["--ek-certificate", "require", "--ek-ca", str(tmp_path / "nope")], "no such file or directory")):
        stderr = io.StringIO()
        assert challenger_cli.main(["serve", "--store", "sqlite://%s" % db, "--listen", "127.0.0.1:0"] + args, stderr=stderr) == 1
        assert error in stderr.getvalue()
        assert not os.path.exists(str(db))  # stopped before opening the store
    port = free_port()
    args = ["serve", "--listen", "127.0.0.1:%d" % port, "--store", "sqlite://%s" % db,
            "--ek-certificate", "require", "--ek-ca", str(ca_dir)]
    log_path = str(tmp_path / "kms.log")
    with ChallengerProcess(args, port, log_path=log_path) as kms:
        assert client.get_passphrase(_config(kms, tpms["a"]), PERSISTENT)
        _refused(kms, tpms["plain"], "no EK certificate")
    log = open(log_path).read()
    assert "ek certificate require with 2 trusted CA(s)" in log
    assert "refused on first contact" in log
