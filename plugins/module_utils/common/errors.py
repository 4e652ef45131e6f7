# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Exceptions shared by the modules, the server and the CLIs.

Private to the collection: the API may change without notice.
Every message is written for the person running the task and never carries
key material: callers put secrets in ``no_log_values``, never in an exception.
"""

from __future__ import annotations


class KcryptError(Exception):
    """An error whose message is fit to show to the user as is."""


class TPMError(KcryptError):
    """The TPM could not be opened or refused an operation."""


class TPMNotFoundError(TPMError):
    """No TPM device exists at the given or default location."""


class MissingDependencyError(KcryptError):
    """A Python library the operation needs is not installed."""

    def __init__(self, library, reason, traceback_text=None):
        self.library = library
        self.traceback_text = traceback_text
        super().__init__("%s is required %s but could not be imported" % (library, reason))
