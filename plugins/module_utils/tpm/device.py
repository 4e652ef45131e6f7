# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Node-side TPM 2.0 access on tpm2-pytss.

Private to the collection. One ``TPM`` object wraps one ESAPI connection and
offers what the rest of the collection needs: the endorsement key and TPM hash
(spec §1), NV storage and the ``c_index`` owner key of offline mode (§6.4), and
the transient attestation key, credential activation and PCR quotes of the
remote attestation protocol (§2.A), with the templates and persistent handles
go-attestation uses so the two coexist on one TPM.

swtpm and /dev/tpm0 have no resource manager and libtpms holds only three
transient objects, so every object loaded here is flushed before the method
returns, and leftovers of crashed processes are flushed on open.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from dataclasses import dataclass

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.deps import optional_import, require
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError, TPMError, TPMNotFoundError
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.pcrs import is_decimal, pcr_index
from ansible_collections.kairos.kcrypt.plugins.module_utils.common import identity
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.messages import MAX_EK_CHAIN

# ESYS prints expected failures (probing absent NV indices) to stderr; keep it quiet
# unless the caller asked for TSS logging explicitly.
os.environ.setdefault("TSS2_LOG", "all+NONE")

tss = optional_import("tpm2_pytss")
tss_utils = optional_import("tpm2_pytss.utils")
x509 = optional_import("cryptography.x509")
rsa = optional_import("cryptography.hazmat.primitives.asymmetric.rsa")
serialization = optional_import("cryptography.hazmat.primitives.serialization")

ENV_TPM_DEVICE = "KCRYPT_TPM_DEVICE"
DEFAULT_DEVICES = ("/dev/tpmrm0", "/dev/tpm0")
KNOWN_TCTIS = ("device", "swtpm", "mssim", "tabrmd", "libtpms", "cmd")

EK_PERSISTENT_HANDLE = 0x81010001  # where go-attestation persists the RSA EK
# TCG TPM v2.0 Provisioning Guidance 2.2.1.5.2: the CA certificates that issued the EK certificate, one or
# more DER certificates per index (Intel PTT keeps its whole chain in 0x01c00100).
EK_CHAIN_NV_RANGE = (0x01C00100, 0x01C001FF)
SRK_PERSISTENT_HANDLE = 0x81000001  # where go-attestation persists its SRK (AK parent)
DEFAULT_C_INDEX = 0x81000008  # upstream tpm-helpers default for the offline RSA key
DEFAULT_NV_INDEX = 0x01500000  # upstream kcrypt default for the offline blob

# How the offline key at c_index and the NV index are created (spec §6.4, checklist 46). Both read alike;
# they differ only when something is created:
#   go-tpm — tpm-helpers since it moved to go-tpm's tpm2 API (the version kairos-sdk v0.25.2 and
#            kcrypt-discovery-challenger v0.13.4 pin, 9b3e057e2f32; their go.sum holds no tpmk): NV
#            index with nameAlg SHA-256; owner key with ``unique`` = 256 zero bytes.
#   tpmk   — tpm-helpers on folbricht/tpmk (Kairos clients up to v0.11.x): nameAlg SHA-1 (go-tpm's
#            legacy NVDefineSpace), owner key with an empty ``unique``.
# A primary key is derived from the owner seed and the whole template, so the two layouts give two
# different keys at c_index: an existing key is therefore always used as it is, never re-created.
TPM_LAYOUT_GO_TPM = "go-tpm"
TPM_LAYOUT_TPMK = "tpmk"
TPM_LAYOUTS = (TPM_LAYOUT_GO_TPM, TPM_LAYOUT_TPMK)
DEFAULT_TPM_LAYOUT = TPM_LAYOUT_GO_TPM

NV_INDEX_RANGE = (0x01000000, 0x01FFFFFF)
PERSISTENT_RANGE = (0x81000000, 0x81FFFFFF)

# TPM response codes this module reacts to (format-zero/one codes without handle/session bits).
RC_INITIALIZE = 0x100
RC_HANDLE = 0x08B  # "the handle is not correct for the use", e.g. no such NV index or object
RC_NV_DEFINED = 0x14C
RC_NV_UNINITIALIZED = 0x14A
RC_OBJECT_MEMORY = 0x902
RC_SESSION_MEMORY = 0x903

TPM_CC_FLUSH_CONTEXT = 0x00000165
TPM_ST_NO_SESSIONS = 0x8001
TRANSIENT_FIRST = 0x80000000
LOADED_SESSION_FIRST = 0x02000000


def parse_handle(value, option, valid_range=None):
    """Parse a TPM handle given as int or string, like Go's strconv.ParseUint(s, 0, 32).

    Accepts ``0x`` hex, ``0o``/leading-zero octal, ``0b`` binary and decimal, as the
    Kairos config does. Raises KcryptError naming the option on anything else.
    """
    if isinstance(value, bool):
        raise KcryptError("%s must be a number such as 0x1500000, not a boolean" % option)
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip().replace("_", "")
        try:
            if len(text) > 1 and text[0] == "0" and text[1].isdigit():
                number = int(text[1:], 8)
            else:
                number = int(text, 0)
        except ValueError:
            raise KcryptError("%s=%r is not a valid TPM handle: use a number such as 0x1500000" % (option, value)) from None
    if not 0 <= number <= 0xFFFFFFFF:
        raise KcryptError("%s=%r does not fit in 32 bits" % (option, value))
    if valid_range and not valid_range[0] <= number <= valid_range[1]:
        raise KcryptError(
            "%s=0x%x is outside the allowed range 0x%x-0x%x" % (option, number, valid_range[0], valid_range[1])
        )
    return number


def parse_nv_index(value, option="nv_index"):
    """The NV index of offline mode's passphrase blob; None means upstream's default."""
    return parse_handle(DEFAULT_NV_INDEX if value is None else value, option, NV_INDEX_RANGE)


def parse_persistent_handle(value, option="c_index"):
    """The persistent handle of offline mode's RSA key; None means upstream's default."""
    return parse_handle(DEFAULT_C_INDEX if value is None else value, option, PERSISTENT_RANGE)


def parse_tpm_layout(value, option="tpm_layout"):
    """``go-tpm`` (default, newest Kairos) or ``tpmk`` (Kairos clients up to v0.11); empty means the default."""
    layout = (value or DEFAULT_TPM_LAYOUT).strip().lower()
    if layout not in TPM_LAYOUTS:
        raise KcryptError("%s must be one of %s, not %r" % (option, ", ".join(TPM_LAYOUTS), value))
    return layout


def parse_pcr_list(values, option="pcrs"):
    """A sorted, de-duplicated list of PCR indices 0-23 from ints or '0,7,11' strings."""
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    pcrs = set()
    for value in values or []:
        text = value.strip() if isinstance(value, str) else value
        index = pcr_index(text)
        if index is None:
            if isinstance(text, int) or is_decimal(text):
                raise KcryptError("%s: PCR %s is out of range (0-23)" % (option, text))
            raise KcryptError("%s: %r is not a PCR index (0-23)" % (option, value))
        pcrs.add(index)
    return sorted(pcrs)


def resolve_tcti(device=None):
    """The TCTI configuration string for ``device``.

    ``device`` is a device path (``/dev/tpmrm0``), a swtpm UNIX socket path, or a
    TCTI string (``swtpm:host=127.0.0.1,port=2321``). Empty means the
    ``KCRYPT_TPM_DEVICE`` environment variable, then /dev/tpmrm0, then /dev/tpm0.
    """
    spec = (device or os.environ.get(ENV_TPM_DEVICE) or "").strip()
    hint = (
        "set tpm_device (or the %s environment variable) to a TPM device path or a TCTI "
        "string such as swtpm:host=127.0.0.1,port=2321" % ENV_TPM_DEVICE
    )
    if not spec:
        for path in DEFAULT_DEVICES:
            if os.path.exists(path):
                return "device:" + path
        raise TPMNotFoundError("no TPM at %s; %s" % (" or ".join(DEFAULT_DEVICES), hint))
    if spec.startswith("/"):
        try:
            mode = os.stat(spec).st_mode
        except OSError:
            raise TPMNotFoundError("no TPM at %s; %s" % (spec, hint)) from None
        if stat.S_ISCHR(mode):
            return "device:" + spec
        if stat.S_ISSOCK(mode):
            return "swtpm:path=" + spec
        raise TPMNotFoundError("%s is neither a TPM character device nor a swtpm socket; %s" % (spec, hint))
    name = spec.split(":", 1)[0]
    if name not in KNOWN_TCTIS:
        raise TPMError("tpm_device=%r is neither a device path nor a TCTI string (%s); %s" % (spec, ", ".join(KNOWN_TCTIS), hint))
    return spec


def _has_resource_manager(tcti):
    return tcti.startswith(("device:/dev/tpmrm", "tabrmd"))


def _rc_base(error):
    """The response code without the handle/parameter/session number bits."""
    rc = getattr(error, "rc", 0) & 0xFFF
    if rc & 0x80:  # format-one: error number in bits 0-5 plus the format bit
        return rc & 0xBF
    return rc


@dataclass(frozen=True)
class EndorsementKey:
    public_key: object  # cryptography RSAPublicKey
    certificate: object = None  # cryptography x509.Certificate, when the TPM has one

    @property
    def tpm_hash(self):
        return identity.tpm_hash(self.public_key)

    @property
    def public_pem(self):
        return identity.public_key_pem(self.public_key)

    @property
    def spki_der(self):
        return identity.spki_der(self.public_key)

    @property
    def certificate_pem(self):
        if self.certificate is None:
            return None
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")

    @property
    def certificate_der(self):
        if self.certificate is None:
            return b""
        return self.certificate.public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class AttestationKey:
    """A transient AK as go-attestation's AttestationParameters describe it, plus its private blob.

    ``public``: TPMT_PUBLIC; ``create_data``: TPMS_CREATION_DATA; ``create_attestation``:
    TPMS_ATTEST from CertifyCreation signed by the AK; ``create_signature``: TPMT_SIGNATURE;
    ``private``: TPM2B_PRIVATE to load it again under the SRK. All without size prefixes
    except ``private``.
    """

    public: bytes
    private: bytes
    create_data: bytes
    create_attestation: bytes
    create_signature: bytes


def _rsa_public_key(public_area):
    """cryptography RSA public key from a TPMT_PUBLIC."""
    require("cryptography", "to read TPM public keys")
    exponent = public_area.parameters.rsaDetail.exponent or 65537
    modulus = int.from_bytes(bytes(public_area.unique.rsa), "big")
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


def _rsa_template(attrs, symmetric=None, scheme=None, unique=None, key_bits=2048):
    """TPM2B_PUBLIC of an RSA key with SHA-256 name, exponent 65537 and NULL symmetric/scheme unless given."""
    public = tss.TPMT_PUBLIC(
        type=tss.TPM2_ALG.RSA,
        nameAlg=tss.TPM2_ALG.SHA256,
        objectAttributes=attrs,
        parameters=tss.TPMU_PUBLIC_PARMS(
            rsaDetail=tss.TPMS_RSA_PARMS(
                symmetric=symmetric or tss.TPMT_SYM_DEF_OBJECT(algorithm=tss.TPM2_ALG.NULL),
                scheme=scheme or tss.TPMT_RSA_SCHEME(scheme=tss.TPM2_ALG.NULL),
                keyBits=key_bits,
                exponent=0,
            )
        ),
    )
    if unique is not None:
        public.unique.rsa = unique
    return tss.TPM2B_PUBLIC(publicArea=public)


def _owner_key_template(layout=DEFAULT_TPM_LAYOUT):
    """tpm-helpers' template for the offline key at ``c_index`` (spec §6.4): RSA-2048, SHA-256 name,
    sign|decrypt|userwithauth|sensitivedataorigin, NULL scheme; ``unique`` as ``layout`` says."""
    return _rsa_template(
        tss.TPMA_OBJECT.SIGN_ENCRYPT
        | tss.TPMA_OBJECT.DECRYPT
        | tss.TPMA_OBJECT.USERWITHAUTH
        | tss.TPMA_OBJECT.SENSITIVEDATAORIGIN,
        unique=b"\x00" * 256 if layout == TPM_LAYOUT_GO_TPM else None,
    )


def _srk_template():
    """go-attestation's defaultSRKTemplate: RSA-2048 storage key, AES-128-CFB, noDA."""
    return _rsa_template(
        tss.TPMA_OBJECT.FIXEDTPM
        | tss.TPMA_OBJECT.FIXEDPARENT
        | tss.TPMA_OBJECT.SENSITIVEDATAORIGIN
        | tss.TPMA_OBJECT.USERWITHAUTH
        | tss.TPMA_OBJECT.NODA
        | tss.TPMA_OBJECT.RESTRICTED
        | tss.TPMA_OBJECT.DECRYPT,
        symmetric=tss.TPMT_SYM_DEF_OBJECT(
            algorithm=tss.TPM2_ALG.AES,
            keyBits=tss.TPMU_SYM_KEY_BITS(aes=128),
            mode=tss.TPMU_SYM_MODE(aes=tss.TPM2_ALG.CFB),
        ),
        unique=b"\x00" * 256,
    )


def ak_attributes():
    """go-attestation's AK attributes: FlagSignerDefault | FlagNoDA."""
    return (
        tss.TPMA_OBJECT.FIXEDTPM
        | tss.TPMA_OBJECT.FIXEDPARENT
        | tss.TPMA_OBJECT.SENSITIVEDATAORIGIN
        | tss.TPMA_OBJECT.USERWITHAUTH
        | tss.TPMA_OBJECT.NODA
        | tss.TPMA_OBJECT.RESTRICTED
        | tss.TPMA_OBJECT.SIGN_ENCRYPT
    )


def ak_template(attrs=None, key_bits=2048, unique=None):
    """go-attestation's akTemplateRSA: restricted RSASSA-SHA256 signing key, 2048 bits.

    ``attrs``/``key_bits``/``unique`` let the software TPM of the tests build AKs that break one rule at a time.
    """
    return _rsa_template(
        ak_attributes() if attrs is None else attrs,
        scheme=tss.TPMT_RSA_SCHEME(
            scheme=tss.TPM2_ALG.RSASSA,
            details=tss.TPMU_ASYM_SCHEME(rsassa=tss.TPMS_SCHEME_HASH(hashAlg=tss.TPM2_ALG.SHA256)),
        ),
        unique=unique,
        key_bits=key_bits,
    )


def pcr_selection(pcrs, bank="sha256"):
    """TPML_PCR_SELECTION for ``pcrs`` in one bank."""
    return tss.TPML_PCR_SELECTION.parse("%s:%s" % (bank, ",".join(str(p) for p in pcrs)))


def read_tpm_hash(device=None):
    """The TPM hash the KMS knows a node by (spec §1.1), read from the TPM at ``device``."""
    with TPM(device) as tpm:
        return tpm.endorsement_key().tpm_hash


class TPM:
    """One connection to a TPM. Use as a context manager.

    Every TPMError message names the TPM and the operation and never includes
    secret data.
    """

    def __init__(self, device=None):
        require("tpm2_pytss", "to talk to the TPM")
        self.tcti = resolve_tcti(device)
        self._tcti_ctx = None
        self.esys = None

    # -- connection -------------------------------------------------------

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()

    def open(self):
        try:
            self._tcti_ctx = tss.TCTILdr.parse(self.tcti)
            self.esys = tss.ESAPI(self._tcti_ctx)
        except tss.TSS2_Exception as error:
            self.close()
            raise TPMError("cannot open the TPM at %s: %s" % (self.tcti, error)) from None
        try:
            self._startup_if_needed()
            if not _has_resource_manager(self.tcti):
                self._flush_leftovers()
        except tss.TSS2_Exception as error:
            self.close()
            raise TPMError("the TPM at %s does not answer: %s" % (self.tcti, error)) from None
        return self

    def close(self):
        if self.esys is not None:
            self.esys.close()
            self.esys = None
        if self._tcti_ctx is not None:
            try:
                self._tcti_ctx.finalize()
            except Exception:  # finalize twice, or never initialised: nothing to release
                pass
            self._tcti_ctx = None

    def _startup_if_needed(self):
        try:
            self.esys.get_capability(tss.TPM2_CAP.TPM_PROPERTIES, tss.TPM2_PT.FIXED, 1)
        except tss.TSS2_Exception as error:
            if _rc_base(error) != RC_INITIALIZE:
                raise
            self.esys.startup(tss.TPM2_SU.CLEAR)

    def _handles(self, first):
        handles = []
        more = True
        while more:
            more, data = self.esys.get_capability(tss.TPM2_CAP.HANDLES, first + len(handles), 64)
            found = list(data.data.handles)
            if not found:
                break
            handles.extend(int(h) for h in found)
        return [h for h in handles if (h >> 24) == (first >> 24)]

    def _flush_leftovers(self):
        """Flush transient objects and sessions a crashed process left on a TPM without a resource manager."""
        for first in (TRANSIENT_FIRST, LOADED_SESSION_FIRST):
            for handle in self._handles(first):
                # TPM2_FlushContext sent raw: ESYS has no metadata for handles it did not create.
                self._tcti_ctx.transmit(struct.pack(">HII I", TPM_ST_NO_SESSIONS, 14, TPM_CC_FLUSH_CONTEXT, handle))
                self._tcti_ctx.receive()

    def _flush(self, handle):
        if handle is not None:
            try:
                self.esys.flush_context(handle)
            except tss.TSS2_Exception:
                pass

    def _fail(self, what, error):
        return TPMError("%s failed on the TPM at %s: %s" % (what, self.tcti, error))

    def _persistent(self, handle):
        """ESYS_TR of the persistent object at ``handle``, or None when there is none."""
        if handle not in self._handles(PERSISTENT_RANGE[0]):
            return None
        return self.esys.tr_from_tpmpublic(handle)

    # -- identity ---------------------------------------------------------

    def endorsement_key(self):
        """The RSA EK exactly as go-attestation's EKs()[0] (spec §1.1)."""
        try:
            cert_der, template = tss_utils.create_ek_template("EK-RSA2048", tss_utils.NVReadEK(self.esys))
        except tss.TSS2_Exception as error:
            raise self._fail("reading the EK certificate", error) from None
        certificate = self._parse_ek_certificate(cert_der)
        if certificate is not None:
            return EndorsementKey(certificate.public_key(), certificate)
        public = self._create_primary_public(tss.ESYS_TR.ENDORSEMENT, template, "creating the EK")
        return EndorsementKey(_rsa_public_key(public))

    @staticmethod
    def _parse_ek_certificate(cert_der):
        """The certificate, or None when absent, unparsable or not RSA: then the EK comes from the template."""
        if not cert_der:
            return None
        require("cryptography", "to read the EK certificate")
        try:
            certificate = x509.load_der_x509_certificate(identity.certificate_der(cert_der))
            if not isinstance(certificate.public_key(), rsa.RSAPublicKey):
                return None
        except ValueError:
            return None
        return certificate

    def ek_certificate_chain(self):
        """The CA certificates a vendor stored in NV to complete the EK certificate's chain, in NV order.

        Best effort: an index this process may not read is skipped (the KMS then needs the vendor's
        intermediate CAs in its own bundle). At most MAX_EK_CHAIN certificates, what the KMS accepts.
        """
        certificates = []
        for index in self._handles(EK_CHAIN_NV_RANGE[0]):
            if index > EK_CHAIN_NV_RANGE[1]:
                break
            try:
                certificates.extend(identity.split_certificates(self.nv_read(index) or b""))
            except TPMError:
                continue
        return tuple(certificates[:MAX_EK_CHAIN])

    def _create_primary_public(self, hierarchy, template, what):
        handle = None
        try:
            handle, public = self.esys.create_primary(None, template, hierarchy)[:2]
            return public.publicArea
        except tss.TSS2_Exception as error:
            raise self._fail(what, error) from None
        finally:
            self._flush(handle)

    def _endorsement_key_handle(self):
        """A loaded EK for ActivateCredential: the persistent one when it matches, else a transient one.

        Returns (handle, transient). Unlike go-attestation this never persists the EK:
        creating it transiently costs time but leaves the TPM as it was.
        """
        template = tss_utils.create_ek_template("EK-RSA2048", tss_utils.NVReadEK(self.esys))[1]
        persistent = self._persistent(EK_PERSISTENT_HANDLE)
        if persistent is not None:
            public = self.esys.read_public(persistent)[0]
            expected = bytes(template.publicArea.authPolicy)
            if bytes(public.publicArea.authPolicy) == expected and public.publicArea.type == tss.TPM2_ALG.RSA:
                return persistent, False
        handle = self.esys.create_primary(None, template, tss.ESYS_TR.ENDORSEMENT)[0]
        return handle, True

    # -- PCRs -------------------------------------------------------------

    def pcr_read(self, pcrs, bank="sha256"):
        """{index: digest bytes} for ``pcrs`` in ``bank``; PCRs the bank does not hold are left out."""
        values = {}
        pending = list(pcrs)
        try:
            while pending:
                selection_out, digests = self.esys.pcr_read(pcr_selection(pending, bank))[1:]
                returned = []
                for sel in selection_out.pcrSelections[: selection_out.count]:
                    bitmap = bytes(sel.pcrSelect)[: sel.sizeofSelect]
                    returned.extend(i for i in range(len(bitmap) * 8) if bitmap[i // 8] & (1 << (i % 8)))
                if not returned:
                    break
                for index, digest in zip(sorted(returned), digests.digests[: digests.count]):
                    values[index] = bytes(digest)
                pending = [p for p in pending if p not in values]
        except tss.TSS2_Exception as error:
            raise self._fail("reading PCRs", error) from None
        return values

    def pcr_extend(self, index, data, bank="sha256"):
        """Extend PCR ``index`` with the digest of ``data`` (tests and the VM use it to change boot state)."""
        digest = hashlib.new(bank, data).digest()
        values = tss.TPML_DIGEST_VALUES(
            digests=[tss.TPMT_HA(hashAlg=tss.TPM2_ALG.parse(bank), digest=tss.TPMU_HA(**{bank: digest}))]
        )
        try:
            self.esys.pcr_extend(tss.ESYS_TR.parse("PCR%d" % index), values)
        except tss.TSS2_Exception as error:
            raise self._fail("extending PCR%d" % index, error) from None

    # -- NV storage (offline mode) ---------------------------------------

    def _nv_object(self, index):
        """The ESYS object of NV ``index`` (close it with tr_close), or None if the index is not defined."""
        try:
            return self.esys.tr_from_tpmpublic(index)
        except tss.TSS2_Exception as error:
            if _rc_base(error) == RC_HANDLE:
                return None
            raise self._fail("looking up NV index 0x%x" % index, error) from None

    def nv_read(self, index):
        """The whole content of NV ``index`` with owner authorisation, or None if it is not defined."""
        nv = self._nv_object(index)
        if nv is None:
            return None
        try:
            public = self.esys.nv_read_public(nv)[0]
            size = public.nvPublic.dataSize
            chunk = self._nv_buffer_max()
            data = b""
            while len(data) < size:
                n = min(chunk, size - len(data))
                data += bytes(self.esys.nv_read(nv, n, len(data), auth_handle=tss.ESYS_TR.OWNER))
            return data
        except tss.TSS2_Exception as error:
            if _rc_base(error) == RC_NV_UNINITIALIZED:
                return None
            raise self._fail("reading NV index 0x%x" % index, error) from None
        finally:
            self.esys.tr_close(nv)

    def nv_exists(self, index):
        return index in self._handles(0x01000000)

    def nv_write(self, index, data, layout=DEFAULT_TPM_LAYOUT):
        """Define NV ``index`` with upstream's attributes and size = len(data), then write ``data``.

        Attributes ownerwrite|ownerread|authread|ppread, empty auth (spec §6.4), and the name
        algorithm of ``layout``: SHA-256 (go-tpm tpm-helpers' StoreBlob) or SHA-1 (go-tpm's legacy
        NVDefineSpace behind tpmk.NVWrite), so ``tpm2_nvreadpublic`` shows an index we wrote exactly
        as one that Kairos version wrote. Reading does not care. Fails if the index already
        exists: callers decide whether to replace it.
        """
        attrs = (
            tss.TPMA_NV.OWNERWRITE | tss.TPMA_NV.OWNERREAD | tss.TPMA_NV.AUTHREAD | tss.TPMA_NV.PPREAD
        )
        name_alg = tss.TPM2_ALG.SHA256 if parse_tpm_layout(layout) == TPM_LAYOUT_GO_TPM else tss.TPM2_ALG.SHA1
        public = tss.TPM2B_NV_PUBLIC(
            nvPublic=tss.TPMS_NV_PUBLIC(
                nvIndex=index, nameAlg=name_alg, attributes=attrs, dataSize=len(data)
            )
        )
        nv = None
        try:
            nv = self.esys.nv_define_space(None, public, tss.ESYS_TR.OWNER)
            chunk = self._nv_buffer_max()
            for offset in range(0, len(data), chunk):
                self.esys.nv_write(nv, data[offset : offset + chunk], offset, auth_handle=tss.ESYS_TR.OWNER)
        except tss.TSS2_Exception as error:
            if _rc_base(error) == RC_NV_DEFINED:
                raise TPMError("NV index 0x%x is already defined on the TPM at %s" % (index, self.tcti)) from None
            raise self._fail("writing NV index 0x%x" % index, error) from None
        finally:
            if nv is not None:
                self.esys.tr_close(nv)

    def nv_rewrite(self, index, data):
        """Replace the content of the defined NV ``index`` in place, in one TPM2_NV_Write.

        One command is atomic on a TPM: the index holds either the old or the new data, never
        neither (re-keying relies on it). Refuses when the size differs or does not fit in one
        write, rather than undefining the index and leaving a window without it.
        """
        nv = self._nv_object(index)
        if nv is None:
            raise TPMError("NV index 0x%x is not defined on the TPM at %s: there is nothing to replace" % (index, self.tcti))
        try:
            size = self.esys.nv_read_public(nv)[0].nvPublic.dataSize
            if size != len(data) or len(data) > self._nv_buffer_max():
                raise TPMError(
                    "NV index 0x%x holds %d bytes; cannot replace them with %d bytes in one atomic write"
                    % (index, size, len(data))
                )
            self.esys.nv_write(nv, data, 0, auth_handle=tss.ESYS_TR.OWNER)
        except tss.TSS2_Exception as error:
            raise self._fail("rewriting NV index 0x%x" % index, error) from None
        finally:
            self.esys.tr_close(nv)

    def nv_undefine(self, index):
        """Remove NV ``index``; returns False when it was not defined."""
        nv = self._nv_object(index)
        if nv is None:
            return False
        try:
            self.esys.nv_undefine_space(nv, tss.ESYS_TR.OWNER)
        except tss.TSS2_Exception as error:
            raise self._fail("removing NV index 0x%x" % index, error) from None
        return True

    def _nv_buffer_max(self):
        data = self.esys.get_capability(tss.TPM2_CAP.TPM_PROPERTIES, tss.TPM2_PT_NV.BUFFER_MAX, 1)[1]
        for prop in data.data.tpmProperties:
            if prop.property == tss.TPM2_PT_NV.BUFFER_MAX:
                return prop.value
        return 512

    # -- the offline key at c_index ---------------------------------------

    def owner_key_public(self, handle, create=True, layout=DEFAULT_TPM_LAYOUT):
        """Public key of the RSA key persisted at ``handle``; creates and persists it if absent, with
        the template of ``layout``. An existing key is used whatever template made it.

        Returns (public_key, created). With ``create=False`` an absent key gives (None, False).
        """
        layout = parse_tpm_layout(layout)
        try:
            persistent = self._persistent(handle)
            if persistent is not None:
                public = self.esys.read_public(persistent)[0]
                area = public.publicArea
                if area.type != tss.TPM2_ALG.RSA or not area.objectAttributes & tss.TPMA_OBJECT.DECRYPT:
                    raise TPMError("the object at 0x%x on the TPM at %s is not an RSA decryption key" % (handle, self.tcti))
                return _rsa_public_key(area), False
            if not create:
                return None, False
            transient = None
            try:
                transient, public = self.esys.create_primary(None, _owner_key_template(layout), tss.ESYS_TR.OWNER)[:2]
                self.esys.evict_control(tss.ESYS_TR.OWNER, transient, handle)
            finally:
                self._flush(transient)
            return _rsa_public_key(public.publicArea), True
        except tss.TSS2_Exception as error:
            raise self._fail("preparing the RSA key at 0x%x" % handle, error) from None

    def rsa_decrypt(self, handle, ciphertext):
        """RSA-OAEP-SHA256 (empty label) decryption with the persistent key at ``handle``.

        When no key is persisted there (evicted by hand, or a TPM cleared of its persistent
        objects but not of its owner seed), the key of each layout is re-derived transiently
        from the owner seed and tried: both Kairos layouts stay readable, and the TPM is left
        as it was.
        """
        persistent = self._persistent(handle)
        if persistent is not None:
            try:
                return self._oaep_decrypt(persistent, ciphertext)
            except tss.TSS2_Exception as error:
                raise self._fail("decrypting with the key at 0x%x" % handle, error) from None
        for layout in TPM_LAYOUTS:
            transient = None
            try:
                transient = self.esys.create_primary(None, _owner_key_template(layout), tss.ESYS_TR.OWNER)[0]
                return self._oaep_decrypt(transient, ciphertext)
            except tss.TSS2_Exception:
                continue  # not this layout's key (or not creatable): try the next
            finally:
                self._flush(transient)
        raise TPMError("no RSA key at 0x%x on the TPM at %s (c_index), and neither Kairos layout (%s) re-derives "
                       "one that decrypts the blob" % (handle, self.tcti, ", ".join(TPM_LAYOUTS)))

    def _oaep_decrypt(self, key, ciphertext):
        scheme = tss.TPMT_RSA_DECRYPT(
            scheme=tss.TPM2_ALG.OAEP,
            details=tss.TPMU_ASYM_SCHEME(oaep=tss.TPMS_SCHEME_HASH(hashAlg=tss.TPM2_ALG.SHA256)),
        )
        return bytes(self.esys.rsa_decrypt(key, tss.TPM2B_PUBLIC_KEY_RSA(ciphertext), scheme, tss.TPM2B_DATA()))

    # -- attestation key, credential activation, quotes -------------------

    def _srk_handle(self):
        """The SRK to hold the AK: go-attestation's persistent one, created and persisted if absent."""
        persistent = self._persistent(SRK_PERSISTENT_HANDLE)
        if persistent is not None:
            return persistent
        transient = self.esys.create_primary(None, _srk_template(), tss.ESYS_TR.OWNER)[0]
        try:
            return self.esys.evict_control(tss.ESYS_TR.OWNER, transient, SRK_PERSISTENT_HANDLE)
        finally:
            self._flush(transient)

    def create_ak(self):
        """A new transient AK with its creation certification, as go-attestation's NewAK does."""
        ak = None
        try:
            srk = self._srk_handle()
            private, public, creation_data, creation_hash, ticket = self.esys.create(srk, None, ak_template())
            ak = self.esys.load(srk, private, public)
            scheme = tss.TPMT_SIG_SCHEME(
                scheme=tss.TPM2_ALG.RSASSA,
                details=tss.TPMU_SIG_SCHEME(rsassa=tss.TPMS_SCHEME_HASH(hashAlg=tss.TPM2_ALG.SHA256)),
            )
            attest, signature = self.esys.certify_creation(ak, ak, tss.TPM2B_DATA(), creation_hash, scheme, ticket)
            return AttestationKey(
                public=public.publicArea.marshal(),
                private=private.marshal(),
                create_data=creation_data.creationData.marshal(),
                create_attestation=bytes(attest),
                create_signature=signature.marshal(),
            )
        except tss.TSS2_Exception as error:
            raise self._fail("creating the attestation key", error) from None
        finally:
            self._flush(ak)

    def _load_ak(self, ak):
        srk = self._srk_handle()
        private = tss.TPM2B_PRIVATE.unmarshal(ak.private)[0]
        public = tss.TPMT_PUBLIC.unmarshal(ak.public)[0]
        return self.esys.load(srk, private, tss.TPM2B_PUBLIC(publicArea=public))

    def activate_credential(self, ak, credential, secret):
        """TPM2_ActivateCredential under the EK's PolicySecret(endorsement) policy.

        ``credential`` and ``secret`` are the TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET
        including their size prefixes, as the server sends them. Returns the 32-byte secret.
        """
        ak_handle = ek_handle = session = None
        ek_transient = False
        try:
            ak_handle = self._load_ak(ak)
            ek_handle, ek_transient = self._endorsement_key_handle()
            session = self.esys.start_auth_session(
                tss.ESYS_TR.NONE,
                tss.ESYS_TR.NONE,
                tss.TPM2_SE.POLICY,
                tss.TPMT_SYM_DEF(algorithm=tss.TPM2_ALG.NULL),
                tss.TPM2_ALG.SHA256,
            )
            self.esys.policy_secret(tss.ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
            id_object = tss.TPM2B_ID_OBJECT.unmarshal(credential)[0]
            encrypted_secret = tss.TPM2B_ENCRYPTED_SECRET.unmarshal(secret)[0]
            result = self.esys.activate_credential(
                ak_handle, ek_handle, id_object, encrypted_secret, session1=tss.ESYS_TR.PASSWORD, session2=session
            )
            return bytes(result)
        except tss.TSS2_Exception as error:
            raise self._fail("activating the credential", error) from None
        finally:
            self._flush(session)
            self._flush(ak_handle)
            if ek_transient:
                self._flush(ek_handle)

    def quote(self, ak, pcrs, qualifying_data=b"", bank="sha256"):
        """TPM2_Quote of ``pcrs`` signed by ``ak``. Returns (TPMS_ATTEST bytes, TPMT_SIGNATURE bytes)."""
        ak_handle = None
        try:
            ak_handle = self._load_ak(ak)
            attest, signature = self.esys.quote(ak_handle, pcr_selection(pcrs, bank), tss.TPM2B_DATA(qualifying_data))
            return bytes(attest), signature.marshal()
        except tss.TSS2_Exception as error:
            raise self._fail("quoting PCRs", error) from None
        finally:
            self._flush(ak_handle)
