# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Build and cache the VM image: Debian's kernel plus an initramfs made of Debian packages.

The initramfs holds busybox (shell, mount, ip, insmod), Debian's Python 3.11,
libtss2, cryptsetup, e2fsprogs and util-linux, the Python wheels the node code
imports (tpm2-pytss, cryptography, PyYAML, websocket-client) and the kernel
modules the tests need (virtio, 9p, ext4, dm-crypt, xts). The project's own code
is NOT in the image: it is shared into the guest over 9p at boot, so code
changes never force a rebuild (see docs/vm.md for the choice and its numbers).

The image lives in ``$KCRYPT_CACHE/vm/<key>/`` (default ``~/.cache/kcrypt``),
where ``key`` hashes every input: the resolved Debian package versions, the
pinned wheels, the kernel module list and this builder's own files. A missing
image is built (about a minute, most of it downloading the kernel); concurrent
builders wait on a lock instead of building twice.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST_DIR = os.path.join(HERE, "guest")
CACHE = os.environ.get("KCRYPT_CACHE") or os.path.expanduser("~/.cache/kcrypt")
VM_CACHE = os.path.join(CACHE, "vm")
DEB_CACHE = os.path.join(VM_CACHE, "debs")
WHEEL_CACHE = os.path.join(CACHE, "wheels")

KERNEL_META = "linux-image-amd64"  # Debian's meta package names the current kernel ABI
GUEST_PYTHON = "3.11"  # Debian 12's python3.11; the wheels must be built for it

# What the node code runs: the interpreter, the TSS libraries tpm2-pytss links against
# (and the device TCTI it loads at run time), cryptsetup, mkfs/e2fsck/resize2fs,
# blkid/findmnt/wipefs/losetup, and partition tools.
GUEST_DEBS = (
    "busybox-static",
    "python3.11-minimal", "libpython3.11-stdlib",
    "libtss2-esys-3.0.2-0", "libtss2-tctildr0", "libtss2-tcti-device0", "libtss2-fapi1", "libtss2-rc0", "libtss2-mu0",
    "cryptsetup-bin", "e2fsprogs", "util-linux", "mount", "fdisk", "gdisk",
)
# Pulled in only for their maintainer scripts (users, udev rules, package management);
# a guest that runs one script as init never needs them.
SKIP_DEBS = frozenset((
    "tar", "dpkg", "debconf", "passwd", "adduser", "udev", "tpm-udev",
    "libpam-modules", "libpam-modules-bin", "libsemanage2", "libsemanage-common", "libsepol2",
))
# Kernel modules, loaded in this order after their modules.dep dependencies.
GUEST_MODULES = (
    "virtio_pci", "virtio_blk", "virtio_net", "9pnet_virtio", "9p",
    "crc32c_generic", "crc32c-intel", "ext4",
    "dm-mod", "dm-crypt", "ecb", "xts", "cryptd", "crypto_simd", "aesni-intel", "sha512_generic",
    "af_alg", "algif_skcipher", "algif_hash", "loop", "overlay",
)
# Python distributions the node code imports, pinned to the versions of the running
# environment so the guest runs what the host tests run.
GUEST_WHEELS = ("tpm2-pytss", "cryptography", "PyYAML", "websocket-client")
# Trimmed from the image: documentation, and Python modules no test reaches.
TRIM = (
    "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
    "usr/share/bug", "usr/share/bash-completion", "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/idlelib", "usr/lib/python3.11/pydoc_data", "usr/lib/python3.11/lib2to3",
    "usr/lib/python3.11/turtledemo", "usr/lib/python3.11/tkinter", "usr/lib/x86_64-linux-gnu/gconv",
)


class ImageError(RuntimeError):
    """The image cannot be built; the message says what is missing."""


@dataclass
class Image:
    directory: str
    kernel: str
    initrd: str
    manifest: dict


def _run(args, cwd=None):
    env = dict(os.environ, LANG="C", LC_ALL="C")
    try:
        return subprocess.run(args, env=env, cwd=cwd, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as error:
        raise ImageError("%s failed (exit %d): %s" % (" ".join(args[:3]), error.returncode, (error.stderr or "")[-2000:])) from None
    except FileNotFoundError:
        raise ImageError("%s is not installed; run scripts/setup.sh" % args[0]) from None


# -- inputs -------------------------------------------------------------------

def kernel_package():
    """The versioned kernel package (``linux-image-6.1.0-NN-amd64``), or $KCRYPT_VM_KERNEL."""
    if os.environ.get("KCRYPT_VM_KERNEL"):
        return os.environ["KCRYPT_VM_KERNEL"]
    out = _run(["apt-cache", "depends", KERNEL_META]).stdout
    for line in out.splitlines():
        match = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if match:
            return match.group(1)
    raise ImageError("apt knows no %s; run apt-get update" % KERNEL_META)


def resolve_debs(packages):
    """[(name, version, arch)] of ``packages`` and everything they depend on, as apt would install them on an empty system."""
    with tempfile.NamedTemporaryFile() as empty_status:
        out = _run([
            "apt-get", "-s", "-o", "Dir::State::status=%s" % empty_status.name,
            "-o", "APT::Install-Recommends=false", "-o", "Debug::NoLocking=1", "install", *packages,
        ]).stdout
    found = []
    for line in out.splitlines():
        match = re.match(r"Inst (\S+) \((\S+) .*\[(\S+)\]\)", line)
        if match:
            found.append(match.groups())
    if not found:
        raise ImageError("apt resolved no packages for the guest; run apt-get update")
    return found


def wheel_pins():
    """``name==version`` for GUEST_WHEELS, from the Python environment running this code."""
    from importlib import metadata

    if "%d.%d" % sys.version_info[:2] != GUEST_PYTHON:
        raise ImageError(
            "the guest runs Python %s; build the image from a Python %s environment (this is %d.%d)"
            % ((GUEST_PYTHON, GUEST_PYTHON) + tuple(sys.version_info[:2]))
        )
    pins = []
    for name in GUEST_WHEELS:
        try:
            pins.append("%s==%s" % (name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            raise ImageError("%s is not installed here; run scripts/setup.sh" % name) from None
    return sorted(pins)


def _builder_digest():
    digest = hashlib.sha256()
    for path in sorted([os.path.abspath(__file__)] + glob.glob(os.path.join(GUEST_DIR, "*"))):
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()


def _apt_lists_stamp():
    """Changes whenever apt's package lists do (apt-get update), and with what we ask apt for."""
    lists = sorted(glob.glob("/var/lib/apt/lists/*_Packages*"))
    state = [(path, os.stat(path).st_mtime_ns, os.stat(path).st_size) for path in lists]
    state.append((KERNEL_META, os.environ.get("KCRYPT_VM_KERNEL", ""), GUEST_DEBS))
    return hashlib.sha256(repr(state).encode()).hexdigest()[:16]


def _resolve_all():
    """(kernel package, [(name, version, arch)] with the kernel first); apt is asked once per apt-get update."""
    cache = os.path.join(VM_CACHE, "apt-resolved-%s.json" % _apt_lists_stamp())
    if os.path.exists(cache):
        with open(cache) as handle:
            saved = json.load(handle)
        return saved["kernel"], [tuple(deb) for deb in saved["debs"]]
    kernel = kernel_package()
    # Resolved apart from the guest's packages: its own dependencies (initramfs-tools,
    # coreutils ...) only matter for installing it, and the guest gets only vmlinuz and modules.
    kernel_deb = [deb for deb in resolve_debs((kernel,)) if deb[0] == kernel]
    debs = kernel_deb + resolve_debs(GUEST_DEBS)
    os.makedirs(VM_CACHE, exist_ok=True)
    with open(cache + ".tmp", "w") as handle:
        json.dump({"kernel": kernel, "debs": debs}, handle)
    os.rename(cache + ".tmp", cache)
    return kernel, debs


def image_inputs():
    kernel, debs = _resolve_all()
    return {
        "kernel": kernel,
        "kernel_deb": "%s=%s" % debs[0][:2],
        "debs": sorted("%s=%s" % (name, version) for name, version, _arch in debs[1:]),
        "skip_debs": sorted(SKIP_DEBS),
        "modules": list(GUEST_MODULES),
        "wheels": wheel_pins(),
        "builder": _builder_digest(),
    }, debs


def image_key(inputs):
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


# -- build ----------------------------------------------------------------------

def _deb_file(name, version, arch):
    return os.path.join(DEB_CACHE, "%s_%s_%s.deb" % (name, version.replace(":", "%3a"), arch))


def download_debs(debs):
    os.makedirs(DEB_CACHE, exist_ok=True)
    missing = ["%s=%s" % (name, version) for name, version, arch in debs if not os.path.exists(_deb_file(name, version, arch))]
    if missing:
        _run(["apt-get", "download", "-o", "APT::Sandbox::User=root", *missing], cwd=DEB_CACHE)
    return [_deb_file(*deb) for deb in debs]


def _modules_in_order(moddir, wanted):
    """Module files (relative to ``moddir``) for ``wanted`` with their dependencies first, as modules.dep lists them."""
    deps = {}
    by_name = {}
    with open(os.path.join(moddir, "modules.dep")) as handle:
        for line in handle:
            path, _colon, rest = line.partition(":")
            deps[path] = rest.split()
            name = os.path.basename(path).split(".ko")[0].replace("-", "_")
            by_name[name] = path
    builtin = set()
    with open(os.path.join(moddir, "modules.builtin")) as handle:
        for line in handle:
            builtin.add(os.path.basename(line.strip()).split(".ko")[0].replace("-", "_"))
    order = []

    def visit(path):
        if path in order:
            return
        # modules.dep lists the full closure, deepest last; load those first.
        for dep in reversed(deps[path]):
            visit(dep)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key])
        elif key not in builtin:
            raise ImageError("kernel module %s is neither a module nor built in" % name)
    return order


def _install_kernel(kernel_deb, root, workdir):
    tree = os.path.join(workdir, "kernel")
    _run(["dpkg-deb", "-x", kernel_deb, tree])
    version = os.listdir(os.path.join(tree, "lib", "modules"))[0]
    _run(["depmod", "-b", tree, version])
    moddir = os.path.join(tree, "lib", "modules", version)
    order = _modules_in_order(moddir, GUEST_MODULES)
    target = os.path.join(root, "lib", "modules", version)
    for path in order:
        os.makedirs(os.path.dirname(os.path.join(target, path)), exist_ok=True)
        shutil.copy2(os.path.join(moddir, path), os.path.join(target, path))
    os.makedirs(os.path.join(root, "etc", "kcrypt-vm"), exist_ok=True)
    with open(os.path.join(root, "etc", "kcrypt-vm", "modules"), "w") as handle:
        handle.write("".join("/lib/modules/%s/%s\n" % (version, path) for path in order))
    return os.path.join(tree, "boot", "vmlinuz-%s" % version), version


def _install_busybox_applets(root):
    """Link every busybox applet whose path no Debian package provides (sh, ip, insmod, poweroff ...)."""
    out = _run([os.path.join(root, "bin", "busybox"), "--list-full"]).stdout
    for applet in out.split():
        path = os.path.join(root, applet)
        if os.path.lexists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink("/bin/busybox", path)


def _wheels(pins):
    """Make sure WHEEL_CACHE holds a wheel for every pin; fetch or build only what is missing."""
    os.makedirs(WHEEL_CACHE, exist_ok=True)
    tss_pin = [p for p in pins if p.lower().startswith("tpm2-pytss==")]
    if tss_pin and not glob.glob(os.path.join(WHEEL_CACHE, "tpm2_pytss-%s-cp311-*.whl" % tss_pin[0].split("==")[1])):
        # No binary wheel on PyPI: build it against the host's libtss2-dev (same Debian release as the guest).
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", WHEEL_CACHE, tss_pin[0]])
    base = [sys.executable, "-m", "pip", "download", "-q", "-d", WHEEL_CACHE, "--find-links", WHEEL_CACHE, "--only-binary", ":all:"]
    try:
        _run(base + ["--no-index"] + pins)
    except ImageError:
        _run(base + pins)


def _install_wheels(pins, root):
    _wheels(pins)
    target = os.path.join(root, "usr", "lib", "python3", "dist-packages")
    _run([
        sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", WHEEL_CACHE,
        "--only-binary", ":all:", "--target", target, "--no-warn-script-location", *pins,
    ])


def build(inputs, debs, directory, log=print):
    """Build the image described by ``inputs`` into ``directory`` (which must not exist)."""
    started = time.monotonic()
    timings = {}
    workdir = tempfile.mkdtemp(prefix="kcrypt-vm-build-", dir=VM_CACHE)
    try:
        root = os.path.join(workdir, "root")
        os.makedirs(root)
        log("vm image: downloading %d Debian packages" % len(debs))
        files = download_debs(debs)
        timings["download_s"] = round(time.monotonic() - started, 1)
        kernel_deb = None
        for (name, _version, _arch), path in zip(debs, files):
            if name == inputs["kernel"]:
                kernel_deb = path
            elif name not in SKIP_DEBS:
                _run(["dpkg-deb", "-x", path, root])
        vmlinuz, version = _install_kernel(kernel_deb, root, workdir)
        _install_busybox_applets(root)
        os.symlink("python3.11", os.path.join(root, "usr", "bin", "python3"))
        for path in TRIM:
            shutil.rmtree(os.path.join(root, path), ignore_errors=True)
        timings["extract_s"] = round(time.monotonic() - started - timings["download_s"], 1)
        log("vm image: installing wheels %s" % " ".join(inputs["wheels"]))
        _install_wheels(inputs["wheels"], root)
        # Byte-compile the standard library once here instead of at every boot under TCG.
        _run([sys.executable, "-m", "compileall", "-q", "-j0", "-s", root, "-p", "/", os.path.join(root, "usr", "lib", "python3.11")])
        for name in os.listdir(GUEST_DIR):
            shutil.copy2(os.path.join(GUEST_DIR, name), os.path.join(root, name))
        os.chmod(os.path.join(root, "init"), 0o755)
        for path in ("dev", "proc", "sys", "tmp", "run", "kcrypt", "job", "mnt"):
            os.makedirs(os.path.join(root, path), exist_ok=True)
        timings["python_s"] = round(time.monotonic() - started - timings["download_s"] - timings["extract_s"], 1)

        os.makedirs(directory + ".tmp", exist_ok=True)
        initrd = os.path.join(directory + ".tmp", "initrd.img")
        with open(initrd, "wb") as out:
            find = subprocess.Popen(["find", ".", "-mindepth", "1"], cwd=root, stdout=subprocess.PIPE)
            subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=root, stdin=find.stdout, stdout=out, check=True)
            find.wait()
        shutil.copy2(vmlinuz, os.path.join(directory + ".tmp", "vmlinuz"))
        timings["total_s"] = round(time.monotonic() - started, 1)
        manifest = dict(inputs, kernel_version=version, timings=timings,
                        initrd_bytes=os.path.getsize(initrd),
                        kernel_bytes=os.path.getsize(os.path.join(directory + ".tmp", "vmlinuz")),
                        built=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with open(os.path.join(directory + ".tmp", "manifest.json"), "w") as handle:
            json.dump(manifest, handle, indent=1, sort_keys=True)
        os.rename(directory + ".tmp", directory)
        log("vm image: built %s in %.0f s (initrd %.0f MiB)" % (directory, timings["total_s"], manifest["initrd_bytes"] / 2**20))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(directory + ".tmp", ignore_errors=True)


def _prune(keep, debs, days=7):
    """Remove cached images (~120 MiB each) and apt resolutions nobody used for ``days``,
    and downloaded packages the current resolution no longer names (superseded versions)."""
    limit = time.time() - days * 86400
    wanted = {_deb_file(*deb) for deb in debs}
    for path in glob.glob(os.path.join(DEB_CACHE, "*.deb")):
        if path not in wanted:
            os.unlink(path)
    for manifest in glob.glob(os.path.join(VM_CACHE, "*", "manifest.json")):
        directory = os.path.dirname(manifest)
        if directory != keep and os.path.getmtime(manifest) < limit:
            shutil.rmtree(directory, ignore_errors=True)
    for path in glob.glob(os.path.join(VM_CACHE, "apt-resolved-*.json")):
        if os.path.getmtime(path) < limit:
            os.unlink(path)


def ensure_image(log=print):
    """The cached image for the current inputs, built first when missing."""
    inputs, debs = image_inputs()
    directory = os.path.join(VM_CACHE, image_key(inputs))
    os.makedirs(VM_CACHE, exist_ok=True)
    with open(os.path.join(VM_CACHE, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building the same image
        if not os.path.exists(os.path.join(directory, "manifest.json")):
            build(inputs, debs, directory, log=log)
            _prune(keep=directory, debs=debs)
    os.utime(os.path.join(directory, "manifest.json"))  # last use, for _prune
    with open(os.path.join(directory, "manifest.json")) as handle:
        manifest = json.load(handle)
    return Image(directory, os.path.join(directory, "vmlinuz"), os.path.join(directory, "initrd.img"), manifest)
