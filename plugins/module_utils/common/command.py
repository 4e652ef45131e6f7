# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Running external programs (cryptsetup, blkid, e2fsprogs) the safe way.

Private to the collection: the API may change without notice.
Every command runs with ``LANG=C`` (output is parsed), with stdin always fed and
closed (cryptsetup otherwise waits on it), and secrets only on stdin or on an
inherited pipe (``secret_pipe``), never in argv.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError

# Administrative tools live in sbin, which a non-login PATH (Ansible, cron) may lack.
EXTRA_PATH = ("/usr/local/sbin", "/usr/sbin", "/sbin")
C_LOCALE = {"LANG": "C", "LC_ALL": "C", "LC_MESSAGES": "C"}


class CommandError(KcryptError):
    """A command failed. ``stderr`` is the tool's own text: never contains what we sent on stdin."""

    def __init__(self, message, argv=None, returncode=None, stderr=""):
        super().__init__(message)
        self.argv = argv or []
        self.returncode = returncode
        self.stderr = stderr


def find_program(name, purpose):
    """Absolute path of ``name`` from PATH plus the sbin directories, or a KcryptError saying what is missing."""
    search = os.pathsep.join([os.environ.get("PATH", "")] + list(EXTRA_PATH))
    path = shutil.which(name, path=search)
    if path is None:
        raise KcryptError("%s is not installed; it is needed %s" % (name, purpose))
    return path


def _tail(text, lines=6):
    """The last few lines of a tool's stderr: enough to explain, short enough for a message."""
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return "; ".join(kept[-lines:])


def run(argv, what, stdin=b"", ok_codes=(0,), pass_fds=(), timeout=None):
    """Run ``argv`` (argv[0] a program name) and return the CompletedProcess (bytes stdout/stderr).

    ``what`` describes the operation for error messages ("formatting /dev/vda5").
    ``stdin`` is written and closed (secrets go here). Exit codes outside ``ok_codes``
    raise CommandError with the tool's stderr, which never echoes stdin.
    """
    program = find_program(argv[0], "for %s" % what)
    env = dict(os.environ)
    env.update(C_LOCALE)
    try:
        # A private (0700) working directory, removed afterwards: `cryptsetup reencrypt --encrypt` writes a
        # temporary LUKS header, key slots included, into its working directory.
        with tempfile.TemporaryDirectory(prefix="kcrypt-") as workdir:
            result = subprocess.run(
                [program] + list(argv[1:]),
                input=stdin,
                capture_output=True,
                env=env,
                cwd=workdir,
                pass_fds=pass_fds,
                timeout=timeout,
                check=False,
            )
    except subprocess.TimeoutExpired:
        raise CommandError("%s: %s did not finish within %s s" % (what, argv[0], timeout), argv) from None
    except OSError as error:
        raise CommandError("%s: cannot run %s: %s" % (what, argv[0], error.strerror), argv) from None
    if result.returncode not in ok_codes:
        stderr = result.stderr.decode("utf-8", "replace")
        detail = _tail(stderr) or _tail(result.stdout.decode("utf-8", "replace")) or "no error message"
        raise CommandError(
            "%s failed: %s exited with %d: %s" % (what, argv[0], result.returncode, detail),
            argv,
            result.returncode,
            stderr,
        )
    return result


def output(argv, what, **kwargs):
    """stdout of ``run`` as text."""
    return run(argv, what, **kwargs).stdout.decode("utf-8", "replace")


def key_values(text, separator="="):
    """``key<separator>value`` lines of a tool's output as a dict (blkid -o export, dumpe2fs -h); other lines are skipped."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition(separator)
        if sep:
            values[key.strip()] = value.strip()
    return values


@contextlib.contextmanager
def secret_pipe(data):
    """A readable pipe holding ``data``, as (path, fd) for a child process: ``/dev/fd/N`` plus pass_fds.

    For commands that take a second secret as a file argument (cryptsetup luksAddKey's
    new key) while stdin carries the first. Nothing touches the disk. The data must fit
    in the pipe buffer (64 KiB), which every passphrase does.
    """
    if len(data) > 65536:
        raise KcryptError("a secret longer than 64 KiB cannot be passed on a pipe")
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, data)
        os.close(write_fd)
        write_fd = None
        yield "/dev/fd/%d" % read_fd, read_fd
    finally:
        if write_fd is not None:
            os.close(write_fd)
        os.close(read_fd)
