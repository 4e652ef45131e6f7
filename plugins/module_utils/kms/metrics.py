# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The challenger's Prometheus metrics: attestations by protocol and outcome, latency, in flight.

Private to the collection. Written without a client library: a flat array of doubles
that worker processes can share (kms/worker_pool.py).
"""

from __future__ import annotations

import multiprocessing

# Protocols and outcomes as they appear in the audit log and the metrics' labels.
PROTOCOL_ATTESTATION = "attestation"
PROTOCOL_LEGACY_GET = "legacy-get"
PROTOCOL_LEGACY_POST = "legacy-post"
PROTOCOL_RECOVERY_ESCROW = "recovery-escrow"  # ours: a node escrows a recovery key (kms/recovery.py)
PROTOCOL_LABELS = (PROTOCOL_ATTESTATION, PROTOCOL_LEGACY_GET, PROTOCOL_LEGACY_POST, PROTOCOL_RECOVERY_ESCROW)

OUTCOME_SUCCESS = "success"
OUTCOME_REJECTED = "rejected"  # credential, quote or policy said no
OUTCOME_BAD_REQUEST = "bad_request"  # malformed message or TPM structure
OUTCOME_TIMEOUT = "timeout"  # the node did not answer in time
OUTCOME_DISCONNECTED = "disconnected"  # the node went away or sent an oversized frame
OUTCOME_ERROR = "error"  # the KMS failed (store unreachable): the node retries
OUTCOMES = (OUTCOME_SUCCESS, OUTCOME_REJECTED, OUTCOME_BAD_REQUEST, OUTCOME_TIMEOUT, OUTCOME_DISCONNECTED, OUTCOME_ERROR)

# Why a connection was turned away before any exchange (kms/listener.py, kms/server.py).
REFUSED_MAX_CONNECTIONS = "max_connections"  # HTTP 503 + Retry-After: the exchange cap is reached
REFUSED_PER_CLIENT = "per_client"  # closed at accept: the address holds its share of connections
REFUSALS = (REFUSED_MAX_CONNECTIONS, REFUSED_PER_CLIENT)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Counters and a latency histogram in the Prometheus text format (no client library needed).

    The values live in one flat array of doubles. With ``--workers`` the worker processes share one
    ``multiprocessing.RawArray`` of ``slots`` × SIZE: each worker writes only its own slot (so no lock is
    needed) and ``/metrics``, on whichever worker answers, renders the sum of all slots.
    """

    _OUTCOMES = len(OUTCOMES)
    _BUCKETS = len(LATENCY_BUCKETS) + 1  # per-bucket counts (not cumulative) and the +Inf bucket
    _ATTESTATIONS = 0
    _HISTOGRAM = _ATTESTATIONS + len(PROTOCOL_LABELS) * _OUTCOMES
    _SUMS = _HISTOGRAM + len(PROTOCOL_LABELS) * _BUCKETS
    _IN_FLIGHT = _SUMS + len(PROTOCOL_LABELS)
    _REFUSED = _IN_FLIGHT + 1
    _OPEN = _REFUSED + len(REFUSALS)
    SIZE = _OPEN + 1

    def __init__(self, shared=None, slot=0):
        if shared is None:
            shared = [0.0] * self.SIZE
        if len(shared) % self.SIZE or not 0 <= slot < len(shared) // self.SIZE:
            raise ValueError("metrics slot %d does not fit a shared array of %d values" % (slot, len(shared)))
        self._values = shared
        self._base = slot * self.SIZE
        self._protocol_index = {p: i for i, p in enumerate(PROTOCOL_LABELS)}
        self._outcome_index = {o: i for i, o in enumerate(OUTCOMES)}
        self._refusal_index = {r: i for i, r in enumerate(REFUSALS)}

    @classmethod
    def shared_array(cls, slots):
        """Zeroed shared memory for ``slots`` worker processes (create it before starting them)."""
        return multiprocessing.RawArray("d", cls.SIZE * slots)

    @property
    def in_flight(self):
        return int(self._values[self._base + self._IN_FLIGHT])

    @in_flight.setter
    def in_flight(self, value):
        self._values[self._base + self._IN_FLIGHT] = value

    def in_flight_total(self):
        """Exchanges in flight in every worker (each writes its own slot: a racy but lock-free sum)."""
        values, size = self._values, self.SIZE
        return int(sum(values[offset] for offset in range(self._IN_FLIGHT, len(values), size)))

    @property
    def open_connections(self):
        return int(self._values[self._base + self._OPEN])

    @open_connections.setter
    def open_connections(self, value):
        self._values[self._base + self._OPEN] = value

    def refused(self, reason):
        self._values[self._base + self._REFUSED + self._refusal_index[reason]] += 1

    def observe(self, protocol_name, outcome, seconds):
        p = self._protocol_index[protocol_name]
        values, base = self._values, self._base
        values[base + self._ATTESTATIONS + p * self._OUTCOMES + self._outcome_index[outcome]] += 1
        values[base + self._SUMS + p] += seconds
        bucket = len(LATENCY_BUCKETS)
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                bucket = i
                break
        values[base + self._HISTOGRAM + p * self._BUCKETS + bucket] += 1

    def totals(self):
        """The values summed over every slot (every worker process)."""
        values, size = self._values, self.SIZE
        slots = len(values) // size
        return [sum(values[s * size + i] for s in range(slots)) for i in range(size)]

    def render(self):
        totals = self.totals()
        lines = [
            "# HELP kcrypt_attestations_total Attestation exchanges by protocol and outcome.",
            "# TYPE kcrypt_attestations_total counter",
        ]
        for p, protocol_name in sorted(enumerate(PROTOCOL_LABELS), key=lambda item: item[1]):
            for o, outcome in sorted(enumerate(OUTCOMES), key=lambda item: item[1]):
                value = totals[self._ATTESTATIONS + p * self._OUTCOMES + o]
                lines.append('kcrypt_attestations_total{protocol="%s",outcome="%s"} %d' % (protocol_name, outcome, value))
        lines += [
            "# HELP kcrypt_attestation_duration_seconds Time from the node's request to the end of the exchange.",
            "# TYPE kcrypt_attestation_duration_seconds histogram",
        ]
        for p, protocol_name in enumerate(PROTOCOL_LABELS):
            counts = totals[self._HISTOGRAM + p * self._BUCKETS:self._HISTOGRAM + (p + 1) * self._BUCKETS]
            cumulative = 0
            for bound, value in zip(LATENCY_BUCKETS, counts):
                cumulative += value
                lines.append('kcrypt_attestation_duration_seconds_bucket{protocol="%s",le="%s"} %d' % (protocol_name, bound, cumulative))
            count = cumulative + counts[-1]  # the last slot holds the observations beyond every bound
            lines.append('kcrypt_attestation_duration_seconds_bucket{protocol="%s",le="+Inf"} %d' % (protocol_name, count))
            lines.append('kcrypt_attestation_duration_seconds_sum{protocol="%s"} %.6f' % (protocol_name, totals[self._SUMS + p]))
            lines.append('kcrypt_attestation_duration_seconds_count{protocol="%s"} %d' % (protocol_name, count))
        lines += [
            "# HELP kcrypt_attestations_in_flight Exchanges in progress.",
            "# TYPE kcrypt_attestations_in_flight gauge",
            "kcrypt_attestations_in_flight %d" % totals[self._IN_FLIGHT],
            "# HELP kcrypt_connections_open TCP connections the challenger holds (every state, every worker).",
            "# TYPE kcrypt_connections_open gauge",
            "kcrypt_connections_open %d" % totals[self._OPEN],
            "# HELP kcrypt_connections_refused_total Connections turned away before an exchange: max_connections "
            "(HTTP 503 with Retry-After), per_client (closed: the address holds its share).",
            "# TYPE kcrypt_connections_refused_total counter",
        ]
        for r, reason in enumerate(REFUSALS):
            lines.append('kcrypt_connections_refused_total{reason="%s"} %d' % (reason, totals[self._REFUSED + r]))
        return "\n".join(lines) + "\n"
