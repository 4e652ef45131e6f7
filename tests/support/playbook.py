# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run the collection's playbooks and ad-hoc modules with the real ansible-playbook / ansible.

Uses the checkout's ansible.cfg (the collection is found through .collections/, which
scripts/setup.sh links; this helper makes the link too) and the JSON stdout callback, so
tests read per-host stats and task results instead of scraping text (the JSON callback is
tests/support/callback_plugins/kcrypt_test_json.py: ansible-core 2.19 ships none).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


def ensure_collection_link():
    """.collections/ansible_collections/kairos/kcrypt -> the checkout (as scripts/setup.sh does)."""
    parent = os.path.join(ROOT, ".collections", "ansible_collections", "kairos")
    link = os.path.join(parent, "kcrypt")
    if not os.path.exists(link):
        os.makedirs(parent, exist_ok=True)
        try:
            os.symlink("../../..", link)
        except FileExistsError:
            pass


class Run:
    """The outcome of one ansible-playbook run (JSON callback)."""

    def __init__(self, args, process):
        self.args = args
        self.rc = process.returncode
        self.stderr = process.stderr
        try:
            self.data = json.loads(process.stdout[process.stdout.index("{"):])
        except ValueError:
            self.data = {"plays": [], "stats": {}, "unparsed": process.stdout}

    def stats(self, host="localhost"):
        return self.data["stats"].get(host, {})

    @property
    def changed(self):
        return sum(host.get("changed", 0) for host in self.data["stats"].values())

    @property
    def failed(self):
        return sum(host.get("failures", 0) + host.get("unreachable", 0) for host in self.data["stats"].values())

    def task_results(self, name, host="localhost"):
        """Results of every task whose name ends with ``name``."""
        found = []
        for play in self.data["plays"]:
            for task in play["tasks"]:
                if task["task"]["name"].endswith(name) and host in task["hosts"]:
                    found.append(task["hosts"][host])
        return found

    def changed_tasks(self):
        """``host | task name`` of every task that reported a change (for assertion messages)."""
        names = []
        for play in self.data["plays"]:
            for task in play["tasks"]:
                for host, result in task["hosts"].items():
                    if result.get("changed"):
                        names.append("%s | %s" % (host, task["task"]["name"]))
        return names

    def failure_messages(self):
        messages = []
        for play in self.data["plays"]:
            for task in play["tasks"]:
                for host, result in task["hosts"].items():
                    if result.get("failed"):
                        messages.append("%s | %s: %s %s" % (
                            host, task["task"]["name"], result.get("msg", ""), result.get("stderr", "")))
        return messages

    def __repr__(self):
        return "<Run rc=%d changed=%d changed_tasks=%s failures=%s stderr=%s>" % (
            self.rc, self.changed, self.changed_tasks(), self.failure_messages(), self.stderr[-2000:])


def environment(extra=None):
    env = dict(os.environ)
    env.update({
        "ANSIBLE_CONFIG": os.path.join(ROOT, "ansible.cfg"),
        "ANSIBLE_STDOUT_CALLBACK": "kcrypt_test_json",
        "ANSIBLE_CALLBACK_PLUGINS": os.path.join(ROOT, "tests", "support", "callback_plugins"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_DEPRECATION_WARNINGS": "0",
        "ANSIBLE_LOCALHOST_WARNING": "0",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0",
        "PATH": BIN + os.pathsep + env.get("PATH", ""),
    })
    env.pop("KCRYPT_TPM_DEVICE", None)
    env.update(extra or {})
    return env


def playbook(path, extra_vars=None, inventory=None, check=False, diff=False, timeout=600, env=None, limit=None):
    """Run ``ansible-playbook`` on a playbook of the checkout (relative to its root) or a path."""
    ensure_collection_link()
    args = [os.path.join(BIN, "ansible-playbook"), os.path.join(ROOT, path)]
    if inventory:
        args += ["-i", inventory]
    else:
        # the checkout's default inventory may be a lab someone else built: only localhost here
        args += ["-i", os.path.join(ROOT, "inventory", "localhost.yml")]
    if extra_vars:
        args += ["-e", json.dumps(extra_vars)]
    if check:
        args.append("--check")
    if diff:
        args.append("--diff")
    if limit:
        args += ["-l", limit]
    process = subprocess.run(args, capture_output=True, text=True, env=environment(env), cwd=ROOT,
                             timeout=timeout, check=False)
    return Run(args, process)


def adhoc(pattern, module, module_args, inventory, timeout=300):
    """Run ``ansible <pattern> -m <module> -a <args> -o``; return {host: result dict}."""
    ensure_collection_link()
    args = [os.path.join(BIN, "ansible"), pattern, "-i", inventory, "-m", module, "-a", module_args]
    env = environment({"ANSIBLE_LOAD_CALLBACK_PLUGINS": "1"})
    process = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout, check=False)
    data = json.loads(process.stdout[process.stdout.index("{"):])
    results = {}
    for play in data["plays"]:
        for task in play["tasks"]:
            results.update(task["hosts"])
    return results
