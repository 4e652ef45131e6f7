# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Helper of the kairos.kcrypt ``lab`` role: the steps that need more than one command.

Run by the role with ``ansible.builtin.script`` on the lab host (always as root). Every
subcommand prints one JSON object (``changed`` plus facts) and exits 0, or prints
``{"failed": true, "msg": ...}`` and exits 1.

The lab directory is the lab's only memory:

    <lab_dir>/lab.json              the wanted lab (written by the role from its variables)
    <lab_dir>/nodes/<name>/node.json  what was created for a node, written *before* creating it,
                                    so teardown finds everything even after a failed run
    <lab_dir>/nodes/<name>/tpm/     swtpm state; swtpm.pid, swtpm.log, swtpm.port next to it
    <lab_dir>/nodes/<name>/disk.img the node's disk; attached loop devices are found with losetup -j
    <lab_dir>/nodes/<name>/python   interpreter wrapper running Python inside the node's netns

    <lab_dir>/kms/                  a KMS deployed for the lab (playbooks/provision.yml puts the
                                    challenger's code, settings, store, log and PID files there)

Processes are ours when their command line names our state directory (swtpm) or when they
run a program from inside the lab directory (the lab KMS's supervisor, server and workers);
loop devices when their backing file is our image; namespaces, veths and the bridge when a
node record names them. Nothing else is ever touched.

Subcommands: plan (check the wanted lab, write lab.json and the node records, report),
status (report the recorded nodes, read-only); provision, disk, bridge, netns, swtpm,
attach (each makes one part of the given nodes exist, idempotent); stop, detach,
remove-netns (teardown of the given nodes' parts); stop-programs (stop what runs from the
lab directory). Steps take the nodes as repeated ``--node`` options, so one task handles
the whole lab.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

SWTPM_NETNS_PORT = 2321  # inside a node's own namespace any port is free; use the customary one
FIRST_NODE_HOST = 10  # node addresses start at <network>.10; .1 is the host side of the bridge
PARTITION_LABELS = {"oem": "COS_OEM", "persistent": "COS_PERSISTENT"}
REQUIRED_TOOLS = ("swtpm", "swtpm_setup", "sfdisk", "mkfs.ext4", "losetup", "partx", "ip")


class LabError(Exception):
    pass


# ---------------------------------------------------------------- small utilities

def run(args, check=True, stdin=None):
    """Run a command with a C locale; return stdout. stdin is always closed or fed."""
    env = dict(os.environ, LANG="C", LC_ALL="C")
    result = subprocess.run(
        args, input=stdin if stdin is not None else "", capture_output=True, text=True, env=env, check=False
    )
    if check and result.returncode != 0:
        raise LabError("%s failed (rc=%d): %s" % (" ".join(args), result.returncode, result.stderr.strip()))
    return result


def read_json(path, default=None):
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        return default


def write_file(path, text, mode=0o644):
    """Write atomically; return True when the content changed."""
    try:
        with open(path) as handle:
            if handle.read() == text:
                return False
    except FileNotFoundError:
        pass
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


def short_hash(*parts):
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()[:10]


def free_port_pair(preferred=None):
    """A port P with P+1 also free on 127.0.0.1 (swtpm: P commands, P+1 control)."""
    candidates = ([preferred] if preferred else []) + [0] * 200
    for candidate in candidates:
        with socket.socket() as first:
            try:
                first.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise LabError("no free port pair on 127.0.0.1")


# ---------------------------------------------------------------- the lab and its nodes

class Lab:
    def __init__(self, lab_dir, definition=None):
        if not os.path.isabs(lab_dir):
            raise LabError("lab_dir must be an absolute path, got %r" % lab_dir)
        self.dir = os.path.normpath(lab_dir)
        self.nodes_dir = os.path.join(self.dir, "nodes")
        self.definition_file = os.path.join(self.dir, "lab.json")
        if definition is None:
            definition = read_json(self.definition_file)
        self.definition = normalize(definition) if definition else None

    def require_definition(self):
        if self.definition is None:
            raise LabError("%s is missing: run the lab role (lab_state=present) first" % self.definition_file)
        return self.definition

    @property
    def bridge(self):
        return "klb" + short_hash(self.dir)

    def recorded_nodes(self):
        """Node records found on disk, by name."""
        records = {}
        if os.path.isdir(self.nodes_dir):
            for name in sorted(os.listdir(self.nodes_dir)):
                node_dir = os.path.join(self.nodes_dir, name)
                record = read_json(os.path.join(node_dir, "node.json"))
                if record:
                    # everything of a node lives in its directory; a record saying otherwise was not ours
                    if record.get("dir") != node_dir or not record.get("state_dir", "").startswith(node_dir + "/"):
                        raise LabError("node record %s/node.json does not belong to this lab" % node_dir)
                    records[name] = record
        return records

    def wanted_record(self, node, address):
        """The record a node of the definition should have (names of everything made for it)."""
        definition = self.require_definition()
        node_dir = os.path.join(self.nodes_dir, node["name"])
        record = {
            "name": node["name"],
            "dir": node_dir,
            "state_dir": os.path.join(node_dir, "tpm"),
            "image": os.path.join(node_dir, "disk.img"),
            "disk_size_mb": int(node["disk_size_mb"]),
            "oem": bool(node["oem"]),
            "oem_size_mb": int(node["oem_size_mb"]),
            "python": definition["python"],
            "netns": "",
            "veth": "",
            "bridge": "",
            "address": "",
            "prefixlen": 0,
            "host_address": "",
        }
        if node["netns"]:
            network = ipaddress.ip_network(definition["network"])
            record.update(
                netns="%s-%s" % (definition["name"], node["name"]),
                veth="klv" + short_hash(self.dir, node["name"]),
                bridge=self.bridge,
                address=address,
                prefixlen=network.prefixlen,
                host_address=str(network.network_address + 1),
            )
        return record


def normalize(definition):
    """The role's variables as the helper uses them: every node a complete dict.

    ``nodes`` lists explicit nodes (a name, or a dict with a name and overrides);
    when it is empty, ``node_count`` nodes named ``<node_name_prefix><n>`` are made.
    """
    defaults = definition["defaults"]
    given = definition.get("nodes") or [
        "%s%d" % (definition["node_name_prefix"], number) for number in range(1, int(definition["node_count"]) + 1)
    ]
    nodes = []
    for entry in given:
        node = dict(defaults)
        # unset options (None, as argument validation may leave them) keep the lab-wide default
        node.update({"name": entry} if isinstance(entry, str) else {k: v for k, v in entry.items() if v is not None})
        if not node.get("name") or "/" in node["name"] or node["name"].startswith("."):
            raise LabError("invalid lab node name %r" % node.get("name"))
        nodes.append(node)
    result = dict(definition)
    result["nodes"] = nodes
    return result


# what may differ between a record and the definition without rebuilding the node
MUTABLE_FIELDS = ("python",)


def node_status(record):
    """Facts about one recorded node, read-only."""
    status = dict(record)
    status["provisioned"] = os.path.exists(os.path.join(record["state_dir"], "tpm2-00.permall"))
    pids = swtpm_pids(record)
    status["swtpm_pids"] = pids
    port = swtpm_port_of(pids[0]) if pids else None
    status["swtpm_port"] = port
    status["tcti"] = swtpm_tcti(port) if port else ""
    status["image_exists"] = os.path.exists(record["image"])
    status["loop_devices"] = loop_devices_of(record["image"]) if status["image_exists"] else []
    status["partitions"] = {}
    status["partition_nodes_missing"] = False
    if status["loop_devices"]:
        loop = status["loop_devices"][0]
        for number, name in image_partitions(record["image"]):
            device = "%sp%d" % (loop, number)
            if os.path.exists(device):
                status["partitions"][PARTITION_LABELS.get(name, name)] = device
            else:
                status["partition_nodes_missing"] = True
    status["netns_exists"] = bool(record["netns"]) and record["netns"] in netns_names()
    status["netns_ready"] = status["netns_exists"] and netns_ready(record)
    status["veth_exists"] = bool(record["veth"]) and link_exists(record["veth"])
    status["interpreter"] = os.path.join(record["dir"], "python") if record["netns"] else record["python"]
    return status


def swtpm_tcti(port):
    """The TCTI string of a swtpm on 127.0.0.1 (inside the node's namespace when it has one)."""
    return "swtpm:host=127.0.0.1,port=%d" % port


def swtpm_pids(record):
    """PIDs of live swtpm processes serving this node's state directory (PID file first)."""
    marker = "dir=%s" % record["state_dir"]
    found = []
    pidfile = os.path.join(record["dir"], "swtpm.pid")
    candidates = []
    try:
        with open(pidfile) as handle:
            candidates.append(int(handle.read().strip() or 0))
    except (FileNotFoundError, ValueError):
        pass
    # a process whose PID file was lost is still ours if it serves our state directory
    candidates += [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    for pid in candidates:
        if pid <= 0 or pid in found:
            continue
        argv = cmdline(pid)
        if argv and os.path.basename(argv[0]) == "swtpm" and marker in argv:
            found.append(pid)
    return found


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []


def swtpm_port_of(pid):
    argv = cmdline(pid)
    for index, arg in enumerate(argv[:-1]):
        if arg == "--server":
            for option in argv[index + 1].split(","):
                if option.startswith("port="):
                    return int(option[5:])
    return None


def loop_devices_of(image):
    out = run(["losetup", "--noheadings", "--output", "NAME", "--associated", image]).stdout
    return sorted(line.strip() for line in out.splitlines() if line.strip())


def image_partitions(image):
    """(number, GPT name) of the partitions in a disk image."""
    table = json.loads(run(["sfdisk", "--json", image]).stdout)["partitiontable"]
    result = []
    for partition in table.get("partitions", []):
        number = int(partition["node"][len(image):].lstrip("p"))
        result.append((number, partition.get("name", "")))
    return result


def netns_names():
    out = run(["ip", "-json", "netns", "list"]).stdout.strip()
    return [entry["name"] for entry in json.loads(out)] if out else []


def link_exists(name, netns=None):
    args = ["ip"] + (["-n", netns] if netns else []) + ["link", "show", "dev", name]
    return run(args, check=False).returncode == 0


def netns_ready(record):
    """eth0 up with the node address and lo up inside the namespace; the host end on the bridge."""
    out = run(["ip", "-n", record["netns"], "-json", "addr", "show"], check=False).stdout.strip()
    links = {link["ifname"]: link for link in json.loads(out or "[]")}
    eth0, lo = links.get("eth0"), links.get("lo")
    if not eth0 or not lo or "UP" not in eth0["flags"] or "UP" not in lo["flags"]:
        return False
    if record["address"] not in [info.get("local") for info in eth0.get("addr_info", [])]:
        return False
    host = json.loads(run(["ip", "-json", "link", "show", "dev", record["veth"]], check=False).stdout or "[]")
    return bool(host) and host[0].get("master") == record["bridge"] and "UP" in host[0]["flags"]


def bridge_status(lab):
    definition = lab.definition or {}
    exists = link_exists(lab.bridge)
    host_address = ""
    if definition.get("network"):
        host_address = str(ipaddress.ip_network(definition["network"]).network_address + 1)
    return {"name": lab.bridge, "exists": exists, "host_address": host_address}


def missing_tools():
    return [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]


# ---------------------------------------------------------------- subcommands

def cmd_plan(lab, args):
    """Check the definition against the host and the records; write the records of wanted nodes."""
    definition = lab.require_definition()
    absent = missing_tools()
    if absent:
        raise LabError("missing commands on the lab host: %s (Debian: swtpm swtpm-tools fdisk e2fsprogs "
                       "util-linux iproute2)" % ", ".join(absent))
    network = ipaddress.ip_network(definition["network"])
    records = lab.recorded_nodes()
    wanted_names = [node["name"] for node in definition["nodes"]]
    if len(set(wanted_names)) != len(wanted_names):
        raise LabError("node names must be unique: %s" % ", ".join(wanted_names))
    uses_netns = any(node["netns"] for node in definition["nodes"])
    if uses_netns:
        check_network_is_ours(lab, network, records)

    if not args.check:
        os.makedirs(lab.nodes_dir, mode=0o700, exist_ok=True)
    used = {record["address"] for record in records.values() if record.get("address")}
    hosts = (str(address) for address in network.hosts() if int(address) - int(network.network_address) >= FIRST_NODE_HOST)
    changed = False
    for node in definition["nodes"]:
        old = records.get(node["name"])
        address = old["address"] if old and old.get("address") else ""
        if node["netns"] and not address:
            address = next((candidate for candidate in hosts if candidate not in used), "")
            if not address:
                raise LabError("network %s has no free address left for node %s" % (network, node["name"]))
            used.add(address)
        record = lab.wanted_record(node, address)
        if old:
            differing = sorted(key for key in record if key not in MUTABLE_FIELDS and old.get(key) != record[key])
            if differing:
                raise LabError(
                    "lab node %s already exists with a different %s; remove the lab (lab_state=absent) "
                    "or that node (lab_prune_nodes) before changing it" % (node["name"], ", ".join(differing)))
        elif record["netns"] and record["netns"] in netns_names():
            raise LabError("network namespace %s exists but this lab did not create it" % record["netns"])
        if not args.check:
            os.makedirs(record["dir"], mode=0o700, exist_ok=True)
            changed |= write_file(os.path.join(record["dir"], "node.json"),
                                  json.dumps(record, indent=2, sort_keys=True) + "\n")
            if record["netns"]:
                changed |= write_file(os.path.join(record["dir"], "python"), python_wrapper(record), 0o755)
        else:
            changed |= old != record
        records[node["name"]] = record
    if not args.check:
        changed |= write_file(lab.definition_file, json.dumps(definition, indent=2, sort_keys=True) + "\n", 0o600)
    return report(lab, records, wanted_names, changed)


def check_network_is_ours(lab, network, records):
    """Refuse a network some other interface of this host already uses (another lab, a real LAN)."""
    if bridge_status(lab)["exists"] and not any(record.get("bridge") == lab.bridge for record in records.values()):
        raise LabError("bridge %s exists but this lab did not create it" % lab.bridge)
    out = run(["ip", "-json", "-4", "addr", "show"]).stdout.strip()
    for link in json.loads(out or "[]"):
        if link["ifname"] == lab.bridge:
            continue
        for info in link.get("addr_info", []):
            interface = ipaddress.ip_interface("%s/%s" % (info["local"], info["prefixlen"]))
            if interface.network.overlaps(network):
                raise LabError("lab network %s overlaps %s on %s; choose another lab_network"
                               % (network, interface, link["ifname"]))


def python_wrapper(record):
    return (
        "#!/bin/sh\n"
        "# Written by the kairos.kcrypt lab: runs Python inside lab node %s's network namespace,\n"
        "# so Ansible modules for this node run there (ansible_python_interpreter).\n"
        "exec ip netns exec %s %s \"$@\"\n" % (record["name"], record["netns"], record["python"])
    )


def cmd_status(lab, args):
    records = lab.recorded_nodes()
    wanted = [node["name"] for node in lab.definition["nodes"]] if lab.definition else []
    return report(lab, records, wanted, False)


def report(lab, records, wanted_names, changed):
    statuses = {name: node_status(record) for name, record in records.items()}
    return {
        "changed": changed,
        "lab_dir": lab.dir,
        "nodes": statuses,
        "wanted": [name for name in wanted_names if name in statuses],
        "stale": [name for name in statuses if name not in wanted_names],
        "bridge": bridge_status(lab),
        "inventory": (lab.definition or {}).get("inventory", ""),
    }


def node_record(lab, name):
    record = lab.recorded_nodes().get(name)
    if not record:
        raise LabError("lab node %s has no record in %s" % (name, lab.nodes_dir))
    return record


# Per-node steps: each makes one part of a node exist (or go away) and returns True when it
# changed something. The subcommands below apply a step to the nodes named on the command line.

def provision_tpm(record):
    """Manufacture the node's TPM: EK persisted at 0x81010001 and its certificate in NV."""
    if os.path.exists(os.path.join(record["state_dir"], "tpm2-00.permall")):
        return False
    os.makedirs(record["state_dir"], mode=0o700, exist_ok=True)
    run(["swtpm_setup", "--tpm2", "--tpmstate", record["state_dir"], "--create-ek-cert",
         "--pcr-banks", "sha256", "--overwrite"])
    return True


def build_disk(record):
    """Build the node's disk image if it does not exist: GPT, [oem], persistent, ext4 with labels.

    The image is built under a temporary name and renamed when complete, so a failed run
    never leaves a half-made disk that a later run would take for a finished one.
    """
    if os.path.exists(record["image"]):
        return False
    tmp = record["image"] + ".building"
    with open(tmp, "wb") as handle:
        handle.truncate(record["disk_size_mb"] * 1024 * 1024)
    layout = "label: gpt\n"
    if record["oem"]:
        layout += "size=%dMiB, type=linux, name=oem\n" % record["oem_size_mb"]
    layout += "type=linux, name=persistent\n"
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", tmp], stdin=layout)
    table = json.loads(run(["sfdisk", "--json", tmp]).stdout)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    for partition in table["partitions"]:
        label = PARTITION_LABELS[partition["name"]]
        # mkfs straight into the image at the partition's offset: no loop device needed yet
        run(["mkfs.ext4", "-q", "-F", "-L", label, "-E", "offset=%d" % (partition["start"] * sector),
             tmp, "%dk" % (partition["size"] * sector // 1024)])
    os.replace(tmp, record["image"])
    return True


def ensure_netns(record):
    """The node's namespace: lo up, eth0 (veth to the lab bridge) up with the node's address.

    A namespace left half-configured by an interrupted run is ours (it is recorded), so it is
    rebuilt from scratch rather than patched.
    """
    if not record["netns"]:
        return False
    if record["netns"] in netns_names() and netns_ready(record):
        return False
    remove_netns(record)
    ns = record["netns"]
    run(["ip", "netns", "add", ns])
    run(["ip", "link", "add", record["veth"], "type", "veth", "peer", "name", "eth0", "netns", ns])
    run(["ip", "link", "set", record["veth"], "master", record["bridge"], "up"])
    run(["ip", "-n", ns, "addr", "add", "%s/%d" % (record["address"], record["prefixlen"]), "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    return True


def remove_netns(record):
    """Delete the recorded namespace and host-side veth if they exist."""
    changed = False
    if record["netns"] and record["netns"] in netns_names():
        run(["ip", "netns", "delete", record["netns"]])
        changed = True
    # the kernel removes the veth pair with the namespace, but asynchronously
    deadline = time.monotonic() + 5
    while record["veth"] and link_exists(record["veth"]):
        if time.monotonic() > deadline:
            run(["ip", "link", "delete", record["veth"]], check=False)
            changed = True
            break
        time.sleep(0.05)
    return changed


def start_swtpm(record):
    """Start the node's swtpm if it is not running (daemonized, PID file, log next to the state)."""
    if swtpm_pids(record):
        return False
    if not os.path.exists(os.path.join(record["state_dir"], "tpm2-00.permall")):
        raise LabError("its swtpm state is not provisioned")
    port_file = os.path.join(record["dir"], "swtpm.port")
    error = ""
    for _attempt in range(5):
        if record["netns"]:
            port = SWTPM_NETNS_PORT
        else:
            previous = read_json(port_file)  # keep the port (and the inventory) across restarts
            port = free_port_pair(previous if isinstance(previous, int) else None)
        argv = [
            "swtpm", "socket", "--tpm2",
            "--tpmstate", "dir=%s" % record["state_dir"],
            "--server", "type=tcp,port=%d,bindaddr=127.0.0.1" % port,
            "--ctrl", "type=tcp,port=%d,bindaddr=127.0.0.1" % (port + 1),
            "--flags", "not-need-init,startup-clear",
            "--daemon", "--pid", "file=%s" % os.path.join(record["dir"], "swtpm.pid"),
            "--log", "file=%s" % os.path.join(record["dir"], "swtpm.log"),
        ]
        if record["netns"]:
            argv = ["ip", "netns", "exec", record["netns"]] + argv
        # swtpm binds both sockets before it daemonizes: exit 0 means it is listening
        result = run(argv, check=False)
        if result.returncode == 0:
            write_file(port_file, "%d\n" % port)
            return True
        error = (result.stderr or "").strip() or tail(os.path.join(record["dir"], "swtpm.log"))
        if record["netns"]:
            break  # a fixed port in an empty namespace: retrying will not help
    raise LabError("swtpm did not start: %s" % error)


def tail(path, lines=3):
    try:
        with open(path) as handle:
            return " ".join(handle.read().splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def attach_disk(record):
    """Attach the image to a loop device (unless it is) and make sure its partition nodes exist."""
    loops = loop_devices_of(record["image"])
    count = len(image_partitions(record["image"]))
    if loops and partitions_ready(loops[0], count):
        return False
    if not loops:
        loops = [run(["losetup", "--find", "--show", record["image"]]).stdout.strip()]
    show_partitions(loops[0], count)
    return True


def _kernel_dev(loop, number):
    """The device number the kernel gave partition ``number`` of ``loop`` (sysfs), or None."""
    try:
        with open("/sys/class/block/%sp%d/dev" % (os.path.basename(loop), number)) as handle:
            major, minor = (int(x) for x in handle.read().split(":"))
        return os.makedev(major, minor)
    except FileNotFoundError:
        return None


def _node_ready(loop, number):
    wanted = _kernel_dev(loop, number)
    try:
        return wanted is not None and os.stat("%sp%d" % (loop, number)).st_rdev == wanted
    except FileNotFoundError:
        return False


def partitions_ready(loop, count):
    """Whether /dev/<loop>p1..p<count> exist as the kernel's partition devices."""
    return all(_node_ready(loop, number) for number in range(1, count + 1))


def show_partitions(loop, count, timeout=15.0):
    """Give the kernel the partition table of a just attached ``loop`` and make /dev/<loop>p1..p<count>.

    No udev here, and losetup -P does not create partition nodes on every kernel: partx tells the
    kernel about the partitions and devtmpfs makes the nodes. ``partx --update`` always runs once:
    a loop number reused after an earlier user could not remove its partitions still carries them,
    with the old sizes. Under load the kernel or devtmpfs can lag (seen in CI), so partx is repeated;
    a node the kernel knows (sysfs) that /dev lacks, or a stale node with other device numbers, is
    (re)made by hand. Shared with the tests' loop disks.
    """
    deadline = time.monotonic() + timeout
    while True:
        update = run(["partx", "--update", loop], check=False)
        for number in range(1, count + 1):
            wanted, device = _kernel_dev(loop, number), "%sp%d" % (loop, number)
            if wanted is not None and not _node_ready(loop, number):
                if os.path.lexists(device):
                    os.unlink(device)
                try:
                    os.mknod(device, 0o600 | stat.S_IFBLK, wanted)
                except FileExistsError:
                    pass  # devtmpfs made it meanwhile
        if partitions_ready(loop, count):
            return
        if time.monotonic() > deadline:
            raise LabError("the partitions of %s did not appear (partx: rc=%d %s)" % (loop, update.returncode, update.stderr.strip()))
        time.sleep(0.2)


def detach_disk(record):
    """Detach every loop device backed by the node's image (partition nodes first)."""
    if not os.path.exists(record["image"]):
        return False
    loops = loop_devices_of(record["image"])
    for loop in loops:
        run(["partx", "--delete", loop], check=False)  # fails only when there is nothing to delete
        run(["losetup", "--detach", loop])
    return bool(loops)


def stop_swtpms(records):
    """Stop the nodes' swtpms together: SIGTERM all, wait (SIGKILL after 10 s); names of stopped nodes."""
    pids = {record["name"]: swtpm_pids(record) for record in records}
    for pid in (pid for node_pids in pids.values() for pid in node_pids):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    markers = {pid: "dir=%s" % record["state_dir"] for record in records for pid in pids[record["name"]]}

    def still_ours(pid):  # the same swtpm, not a process that got its PID since
        return markers[pid] in cmdline(pid)

    deadline = time.monotonic() + 10
    while any(still_ours(pid) for pid in markers):
        if time.monotonic() > deadline:
            for pid in markers:
                if still_ours(pid):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
        time.sleep(0.05)
    return sorted(name for name, node_pids in pids.items() if node_pids)


def forget_node(record):
    """Delete the node's directory (state, image, logs, record): the last step of removing a node."""
    if not os.path.isdir(record["dir"]):
        return False
    shutil.rmtree(record["dir"])
    return True


STEPS = {  # subcommand: (step, run the nodes in parallel)
    "provision": (provision_tpm, True),
    "disk": (build_disk, True),
    "netns": (ensure_netns, False),
    "swtpm": (start_swtpm, False),
    "attach": (attach_disk, False),
    "detach": (detach_disk, False),
    "remove-netns": (remove_netns, False),
    "forget": (forget_node, False),
}


def cmd_step(lab, args):
    step, parallel = STEPS[args.command]
    records = [node_record(lab, name) for name in args.node]
    outcomes = {}

    def apply(record):
        try:
            outcomes[record["name"]] = step(record)
        except LabError as error:
            outcomes[record["name"]] = error

    if parallel and len(records) > 1:
        # swtpm_setup and mkfs are CPU-bound: one worker per core
        with ThreadPoolExecutor(max_workers=max(1, min(len(records), os.cpu_count() or 1))) as pool:
            list(pool.map(apply, records))
    else:
        for record in records:
            apply(record)
    errors = ["%s: %s" % (name, outcome) for name, outcome in sorted(outcomes.items())
              if isinstance(outcome, Exception)]
    if errors:
        raise LabError("; ".join(errors))
    changed = sorted(name for name, outcome in outcomes.items() if outcome)
    return {"changed": bool(changed), "changed_nodes": changed}


def cmd_stop(lab, args):
    stopped = stop_swtpms([node_record(lab, name) for name in args.node])
    return {"changed": bool(stopped), "changed_nodes": stopped}


def lab_programs(lab):
    """PIDs of processes running a program from inside the lab directory, by parent PID.

    The program is the command (argv[0]) or, for an interpreter, its script (argv[1]): a KMS
    deployed into the lab runs as ``<lab>/kms/opt/venv/bin/python <lab>/kms/opt/bin/kcrypt_supervise.py``
    and ``... <lab>/kms/opt/kcrypt-challenger.pyz serve``. A process that merely names a file of
    the lab (``tail -f <lab>/...``) is not the lab's.
    """
    inside = lab.dir + os.sep
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        argv = cmdline(int(entry))
        if any(os.path.abspath(arg).startswith(inside) for arg in argv[:2] if arg.startswith("/")):
            found[int(entry)] = parent_of(int(entry))
    return found


def parent_of(pid):
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def cmd_stop_programs(lab, args):
    """Stop every process running from the lab directory: SIGTERM to the topmost ones (a supervisor
    stops its server and does not restart it), then SIGKILL whatever is left after 20 s."""
    programs = lab_programs(lab)
    if not programs:
        return {"changed": False, "stopped": []}
    argv = {pid: cmdline(pid) for pid in programs}
    for pid, parent in programs.items():
        if parent not in programs:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def alive():  # the same processes, not others that got their PIDs since
        return [pid for pid in programs if argv[pid] and cmdline(pid) == argv[pid]]

    deadline = time.monotonic() + 20  # the supervisor gives its server 10 s before SIGKILL
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive():
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive():
        raise LabError("processes running from %s did not stop: %s" % (lab.dir, alive()))
    return {"changed": True, "stopped": [" ".join(argv[pid]) for pid in sorted(programs)]}


def cmd_bridge(lab, args):
    """The host side of the lab network: a bridge with the host address, multicast flooded."""
    definition = lab.require_definition()
    network = ipaddress.ip_network(definition["network"])
    host = "%s/%d" % (network.network_address + 1, network.prefixlen)
    changed = False
    if not link_exists(lab.bridge):
        # no snooping: without a multicast querier the bridge would drop mDNS between ports
        run(["ip", "link", "add", lab.bridge, "type", "bridge", "mcast_snooping", "0"])
        changed = True
    addresses = json.loads(run(["ip", "-json", "-4", "addr", "show", "dev", lab.bridge]).stdout or "[]")
    present = ["%s/%s" % (info["local"], info["prefixlen"]) for link in addresses for info in link.get("addr_info", [])]
    if host not in present:
        run(["ip", "addr", "add", host, "dev", lab.bridge])
        changed = True
    link = json.loads(run(["ip", "-json", "link", "show", "dev", lab.bridge]).stdout)[0]
    if "UP" not in link["flags"]:
        run(["ip", "link", "set", lab.bridge, "up"])
        changed = True
    return {"changed": changed, "bridge": lab.bridge}


COMMANDS = dict({name: cmd_step for name in STEPS}, plan=cmd_plan, status=cmd_status, bridge=cmd_bridge, stop=cmd_stop,
                **{"stop-programs": cmd_stop_programs})


def main(argv=None):
    parser = argparse.ArgumentParser(description="kairos.kcrypt lab helper")
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("--lab-dir", required=True)
    parser.add_argument("--node", action="append", default=[], help="a node to work on (repeat for more)")
    parser.add_argument("--definition", default="", help="plan: the wanted lab as JSON (the role's variables)")
    parser.add_argument("--check", action="store_true", help="plan: report what would change, write nothing")
    args = parser.parse_args(argv)
    try:
        lab = Lab(args.lab_dir, json.loads(args.definition) if args.definition else None)
        result = COMMANDS[args.command](lab, args)
    except (LabError, OSError, ValueError, KeyError) as error:
        message = "lab %s: %s" % (args.command, error)
        sys.stderr.write(message + "\n")
        json.dump({"failed": True, "changed": False, "msg": message}, sys.stdout)
        return 1
    json.dump(result, sys.stdout, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
