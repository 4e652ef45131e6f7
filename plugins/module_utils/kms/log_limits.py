# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Keeping the challenger's log readable under attack: repeated messages are rate-limited and malformed
HTTP is one line, not a traceback.

Private to the collection. Used by kms/server.py (the HTTP error logger) and cli/challenger.py (the filter
on the log handler).

An attacker controls how often the server has something to say: 90,111 identical tracebacks in 10 s at
the file-descriptor limit, 3,024 tracebacks for malformed HTTP that aiohttp had answered with 400
(issue 14.6, 14.5). ``RepeatFilter`` lets ``burst`` records of one kind through per ``window`` seconds and
counts the rest, which the next record of that kind reports. The audit log (one line per attestation) is
never filtered: its volume is bounded by the exchanges themselves.
"""

from __future__ import annotations

import logging
import sys
import time

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.deps import optional_import

http_exceptions = optional_import("aiohttp.http_exceptions")

AUDIT_LOGGER = "kcrypt.audit"


class RepeatFilter(logging.Filter):
    """Rate-limits records by (logger, level, message template): ``burst`` per ``window`` seconds pass."""

    def __init__(self, burst=10, window=10.0, clock=time.monotonic, exempt=(AUDIT_LOGGER,)):
        super().__init__()
        self.burst, self.window, self.clock, self.exempt = burst, float(window), clock, tuple(exempt)
        self._kinds = {}  # key -> [window start, passed in window, suppressed since last passed]

    def filter(self, record):
        if record.name in self.exempt:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        state = self._kinds.get(key)
        if state is None or now - state[0] >= self.window:
            suppressed = state[2] if state is not None else 0
            self._kinds[key] = state = [now, 0, 0]
            if len(self._kinds) > 4096:  # bounded: message templates are few; forget the oldest windows
                self._forget(now)
            if suppressed:
                self._annotate(record, suppressed)
        if state[1] >= self.burst:
            state[2] += 1
            return False
        state[1] += 1
        return True

    def _forget(self, now):
        for key in [k for k, v in self._kinds.items() if now - v[0] >= self.window]:
            del self._kinds[key]

    def _annotate(self, record, suppressed):
        record.msg = "%s (and %d more like it in the previous %gs, not logged)" % (record.getMessage(), suppressed, self.window)
        record.args = None


class HttpErrorLogger(logging.LoggerAdapter):
    """aiohttp's server logger, except that a request aiohttp refused as malformed (it answers 400) is logged
    as one WARNING line naming the peer and the parse error, without a traceback. Anything else (a bug in a
    handler: HTTP 500) keeps its traceback."""

    def __init__(self, logger):
        super().__init__(logger, {})

    def exception(self, msg, *args, exc_info=True, **kwargs):
        error = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if http_exceptions is not None and isinstance(error, http_exceptions.HttpProcessingError):
            peer = args[0] if args else "-"
            self.logger.warning("malformed HTTP request from %s refused (400): %s", peer, _one_line(error))
            return
        self.logger.error(msg, *args, exc_info=exc_info, **kwargs)


def _one_line(error):
    text = str(error).replace("\r", " ").replace("\n", " ")
    return text[:200]
