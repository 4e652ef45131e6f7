# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Several challenger processes on one port: ``kcrypt-challenger serve --workers N``.

Private to the collection. One asyncio event loop uses one core; a fleet rebooting at once (after a
power cut) brings hundreds of nodes in the same second, and the rest of the machine's cores would
idle. The supervisor (the process the service manager started):

* checks the port is free (an ordinary bind, so a second server on the same port is an error,
  as without workers) and keeps a bound, never-listening SO_REUSEPORT socket on it, which fixes
  ``:0`` to one port for all workers;
* forks N workers; each listens on the port with SO_REUSEPORT and the kernel spreads new
  connections over them. The workers share the store (SQLite is safe across processes, the
  Kubernetes API anyway) and one block of metrics (server.Metrics);
* runs ``on_ready(port)`` once every worker listens (the mDNS announcement, the log line);
* on SIGTERM/SIGINT stops every worker; when a worker dies on its own it stops the others and
  exits 1, so the service manager (systemd, the role's supervisor, Kubernetes) restarts the set.
  Workers also die with the supervisor (PR_SET_PDEATHSIG), so none is left holding the port.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError

READY_TIMEOUT = 60.0
PR_SET_PDEATHSIG = 1

log = logging.getLogger("kcrypt.challenger")


def reserve_port(host, port):
    """Check HOST:PORT is free and return (a socket holding it for the workers, the port number)."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise KcryptError("cannot listen on %s:%s: %s" % (host, port, error)) from None
    probe = socket.socket(family, kind, proto)
    try:  # without SO_REUSEPORT: fails if anything (another challenger too) already listens there
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        port = probe.getsockname()[1]
    except OSError as error:
        raise KcryptError("cannot listen on %s:%s: %s" % (host, port, error.strerror or error)) from None
    finally:
        probe.close()
    holder = socket.socket(family, kind, proto)
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(address[:1] + (port,) + tuple(address[2:]))  # never listen(): no connection lands here
    except OSError as error:
        holder.close()
        raise KcryptError("cannot listen on %s:%s: %s" % (host, port, error.strerror or error)) from None
    return holder, port


def _die_with_parent():
    """Ask the kernel to SIGTERM this worker when the supervisor dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the supervisor's signal handlers still stop workers
        pass


def _worker(index, serve, port, ready):
    _die_with_parent()
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        raise SystemExit(1)
    try:
        code = serve(index, port, lambda: ready.send(index))
    except KcryptError as error:
        sys.stderr.write("Error: worker %d: %s\n" % (index, error))
        code = 1
    except KeyboardInterrupt:
        code = 130
    ready.close()
    raise SystemExit(code or 0)


def run(workers, host, port, serve, on_ready=None):
    """Serve with ``workers`` processes; returns the exit code.

    ``serve(index, port, ready)`` runs in each forked worker: it listens on ``port`` with
    SO_REUSEPORT, calls ``ready()`` once listening and returns (an exit code) when stopped by SIGTERM.
    Open nothing that must not be shared (a database connection, threads) before calling this.
    """
    holder, port = reserve_port(host, port)
    context = multiprocessing.get_context("fork")  # the workers inherit the parsed settings, TLS context, metrics
    processes, readers = [], {}
    try:
        for index in range(workers):
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(target=_worker, args=(index, serve, port, writer), name="worker-%d" % (index + 1))
            process.start()
            writer.close()
            processes.append(process)
            readers[reader] = index
        return _supervise(processes, readers, port, on_ready)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()
        for reader in readers:
            reader.close()
        holder.close()


def _supervise(processes, readers, port, on_ready):
    stopping = []

    def stop(signum, _frame=None):
        if not stopping:
            stopping.append(signum)
            for process in processes:
                if process.is_alive():
                    process.terminate()

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        failed, waiting_ready, listening = False, dict(readers), 0
        alive = {process.sentinel: process for process in processes}
        while alive:
            timeout = READY_TIMEOUT if waiting_ready and not stopping else None
            ready = multiprocessing.connection.wait(list(alive) + list(waiting_ready), timeout)
            if not ready:
                log.error("only %d of %d workers listened within %gs; stopping", listening, len(processes), READY_TIMEOUT)
                failed = True
                stop(None)
            for item in ready:
                if item in waiting_ready:
                    del waiting_ready[item]
                    try:
                        item.recv()
                        listening += 1
                    except EOFError:  # the worker ended before listening: its sentinel tells the rest
                        continue
                    if listening == len(processes) and not stopping and on_ready is not None:
                        on_ready(port)
                elif item in alive:
                    process = alive.pop(item)
                    process.join()
                    if not stopping:
                        log.error("%s (pid %d) exited with code %s; stopping the other workers",
                                  process.name, process.pid, process.exitcode)
                        failed = True
                        stop(None)
        return 1 if failed else 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
