# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""How a node names the partition it wants a passphrase for (spec §2.A handshake, §3.2).

Private to the collection. Shared by the client (which sends it as the ``label``,
``name`` and ``uuid`` headers), the server and the policy (which match it against
``spec.partitions``).
"""

from __future__ import annotations

from dataclasses import dataclass


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
        return cls(
            label=headers.get("label", "") or "",
            device_name=headers.get("name", "") or "",
            uuid=headers.get("uuid", "") or "",
        )

    def matches(self, spec_partition):
        """Upstream's rule: any non-empty request field equal to its spec field; empty never matches."""
        return (
            (self.device_name != "" and self.device_name == spec_partition.get("deviceName", ""))
            or (self.uuid != "" and self.uuid == spec_partition.get("uuid", ""))
            or (self.label != "" and self.label == spec_partition.get("label", ""))
        )

    def is_empty(self):
        return not (self.label or self.device_name or self.uuid)

    def describe(self):
        """For logs and messages: the non-empty identifiers."""
        parts = ["%s=%s" % (k, v) for k, v in (("label", self.label), ("name", self.device_name), ("uuid", self.uuid)) if v]
        return ", ".join(parts) or "(no identifier)"
