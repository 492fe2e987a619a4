"""Lanes: the suite runs in two pytest-xdist workers (pyproject.toml: ``-n 2 --dist loadgroup``).

Tests marked ``xdist_group("name")`` run in one lane, one after the other: those sharing a
module fixture that runs every case at once (it would run them all again in the other
lane), and those needing something only one of them may hold at a time (a fixed port).

pytest-xdist's own loadgroup learns a test's group from a suffix it appends to the node
id in the worker, and pytest 9.2 no longer lets a plugin change a node id
(pytest-dev/pytest-xdist#1386): the marks were silently ignored. So each worker writes the
groups it collected into the run's shared temporary directory, before it reports its
collection, and the controller's scheduler (loadgroup's, a work unit per group or per
ungrouped test) reads them from there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

MARK = "xdist_group"


def _groups_file(shared: Path, worker: str) -> Path:
    return shared / f"lane-groups-{worker}.json"


@pytest.hookimpl(trylast=True)  # after every reordering and renaming of the items
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:
        return
    groups = {}
    for item in items:
        mark = item.get_closest_marker(MARK)
        if mark is not None:
            groups[item.nodeid] = str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
    # xdist gives each worker <the run's temporary directory>/<worker id> as basetemp.
    path = _groups_file(Path(config.option.basetemp).parent, workerinput["workerid"])
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(groups))
    os.replace(partial, path)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):  # type: ignore[misc]
        """loadgroup's scheduling, with the groups the workers wrote down."""

        groups: dict[str, str] | None = None

        def schedule(self) -> None:
            if self.groups is None:
                shared = config._tmp_path_factory.getbasetemp()  # the workers' basetemp is below it
                # A worker whose collection failed wrote nothing; xdist reports its errors.
                self.groups = {}
                for written in (_groups_file(shared, node.gateway.id) for node in self.nodes):
                    if written.exists():
                        self.groups.update(json.loads(written.read_text()))
            super().schedule()

        def _split_scope(self, nodeid: str) -> str:
            assert self.groups is not None
            group = self.groups.get(nodeid)
            return f"group {group}" if group is not None else nodeid

    return GroupScheduling(config, log)
