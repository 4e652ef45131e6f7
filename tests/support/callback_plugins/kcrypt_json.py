# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Test-only stdout callback: the whole run as one JSON document.

ansible-core 2.19 moved the ``json`` callback to ansible.posix, which cannot be
installed offline here; this keeps the same shape (plays → tasks → hosts, stats).
"""

from __future__ import annotations

import json

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = r"""
name: kcrypt_json
type: stdout
short_description: the run as one JSON document (tests only)
description: Collects task results per host and prints them with the stats at the end.
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "kcrypt_json"

    def __init__(self):
        super().__init__()
        self.plays = []

    def v2_playbook_on_play_start(self, play):
        self.plays.append({"play": {"name": play.get_name()}, "tasks": []})

    def _task(self, task):
        if not self.plays:  # ad hoc runs have no play start event with a name
            self.plays.append({"play": {"name": "adhoc"}, "tasks": []})
        tasks = self.plays[-1]["tasks"]
        if not tasks or tasks[-1]["task"]["id"] != task._uuid:
            tasks.append({"task": {"name": task.get_name(), "id": task._uuid}, "hosts": {}})
        return tasks[-1]

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._task(task)

    def _record(self, result, **extra):
        entry = dict(result._result)
        entry.update(extra)
        self._task(result._task)["hosts"][result._host.get_name()] = entry

    def v2_runner_on_ok(self, result):
        self._record(result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, failed=True)

    def v2_runner_on_skipped(self, result):
        self._record(result, skipped=True)

    def v2_runner_on_unreachable(self, result):
        self._record(result, unreachable=True)

    def v2_playbook_on_stats(self, stats):
        summary = {host: stats.summarize(host) for host in sorted(stats.processed)}
        self._display.display(json.dumps({"plays": self.plays, "stats": summary}, default=str))

    # ad hoc runs do not call v2_playbook_on_stats
    def v2_runner_on_ok_adhoc(self, result):  # pragma: no cover - kept for clarity
        self.v2_runner_on_ok(result)
