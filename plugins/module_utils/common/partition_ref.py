# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""How a node names the partition it wants a passphrase for (spec §2.A handshake, §3.2).

Private to the collection. Shared by the client (which sends it as the ``label``,
``name`` and ``uuid`` headers), the server and the policy (which match it against
``spec.partitions``).

What a node may declare is bounded (:meth:`PartitionRef.problem`; the KMS's policy refuses
the request otherwise), from what real partitions can carry:

* ``label`` — a filesystem or LUKS label: at most 255 bytes of UTF-8 (the longest label Linux
  filesystems know, btrfs's; LUKS2 allows 47, ext4 16, XFS 12, FAT 11; a GPT partition name is
  36 UTF-16 code units, at most 108 bytes), printable characters only (spaces and non-ASCII letters
  are fine, control characters and undecodable bytes are not);
* ``name`` — a kernel block device name (at most 31 characters, ``DISK_NAME_LEN``), possibly as a
  ``/dev/...`` path: at most 64 bytes of ``A-Z a-z 0-9 . _ - : / ! +`` (sysfs writes ``!`` for ``/``);
* ``uuid`` — a partition or filesystem UUID (GPT: 36 characters, MBR: ``xxxxxxxx-NN``, FAT:
  ``XXXX-XXXX``) or upstream's literal ``unknown``: at most 64 bytes of ``A-Z a-z 0-9 . _ - :``;
* at least one of them must name the partition (``unknown`` does not).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_LABEL_BYTES = 255
MAX_NAME_BYTES = 64
MAX_UUID_BYTES = 64
UNKNOWN_UUID = "unknown"  # what upstream clients send for a partition without a PARTUUID
_NAME_CHARS = re.compile(r"[A-Za-z0-9._:/!+-]*\Z")
_UUID_CHARS = re.compile(r"[A-Za-z0-9._:-]*\Z")
_SHOWN = 64  # characters of an identifier that a log line or message shows


@dataclass(frozen=True)
class PartitionRef:
    label: str = ""  # filesystem/LUKS label, e.g. COS_PERSISTENT
    device_name: str = ""  # kernel name, e.g. vda5 (header "name", spec "deviceName")
    uuid: str = ""  # partition UUID (GPT PARTUUID), may be the literal "unknown"

    def headers(self):
        """The handshake headers upstream clients always send (possibly empty)."""
        return {"label": self.label, "name": self.device_name, "uuid": self.uuid}

    @classmethod
    def from_headers(cls, headers):
        """Whatever the node sent, unchecked: the policy asks :meth:`problem` before using it."""
        return cls(
            label=headers.get("label", "") or "",
            device_name=headers.get("name", "") or "",
            uuid=headers.get("uuid", "") or "",
        )

    @property
    def known_uuid(self):
        """The uuid if it identifies something: "" for an empty one and for upstream's ``unknown``."""
        return "" if self.uuid == UNKNOWN_UUID else self.uuid

    def matches(self, spec_partition):
        """Upstream's rule: any non-empty request field equal to its spec field; empty never matches.

        Deviation: ``uuid: unknown`` identifies nothing either (upstream would match every
        partition registered with ``unknown`` and hand out its passphrase).
        """
        return (
            (self.device_name != "" and self.device_name == spec_partition.get("deviceName", ""))
            or (self.known_uuid != "" and self.known_uuid == spec_partition.get("uuid", ""))
            or (self.label != "" and self.label == spec_partition.get("label", ""))
        )

    def is_empty(self):
        return not (self.label or self.device_name or self.known_uuid)

    def problem(self):
        """Why a KMS must not act on this reference (sizes, characters, nothing named), or None."""
        for field, value, limit in (("label", self.label, MAX_LABEL_BYTES), ("name", self.device_name, MAX_NAME_BYTES),
                                    ("uuid", self.uuid, MAX_UUID_BYTES)):
            size = len(value.encode("utf-8", "surrogateescape"))
            if size > limit:
                return "%s is longer than %d bytes (%d bytes)" % (field, limit, size)
        if not self.label.isprintable():  # also catches undecodable bytes (surrogate escapes)
            return "label holds control characters or bytes that are not UTF-8"
        if not _NAME_CHARS.match(self.device_name):
            return "name holds characters other than A-Z a-z 0-9 . _ - : / ! +"
        if not _UUID_CHARS.match(self.uuid):
            return "uuid holds characters other than A-Z a-z 0-9 . _ - :"
        if self.is_empty():
            return "the request names no partition (label, name and uuid are empty or %r)" % UNKNOWN_UUID
        return None

    def describe(self):
        """For logs and messages: the non-empty identifiers, each cut to 64 characters and escaped."""
        parts = ["%s=%s" % (k, _shown(v)) for k, v in (("label", self.label), ("name", self.device_name), ("uuid", self.uuid)) if v]
        return ", ".join(parts) or "(no identifier)"


def _shown(value):
    text = value if len(value) <= _SHOWN else "%s…(%d characters)" % (value[:_SHOWN], len(value))
    return text if text.isprintable() else ascii(text)[1:-1]
