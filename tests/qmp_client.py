#!/usr/bin/env python3
"""Drives a running blockjobd with PyPI's qemu.qmp client (the standard Python QMP library).

Usage: qmp_client.py SOCKET WORKDIR
Exits non-zero on the first mismatch. Run by crates/daemon/tests/python_client.rs.
"""
import asyncio
import os
import sys

from qemu.qmp import ExecuteError, QMPClient


async def main(sock: str, workdir: str) -> None:
    qmp = QMPClient("blockjob-test")
    await qmp.connect(sock)  # greeting + qmp_capabilities, done by the library
    greeting = qmp.greeting
    assert greeting is not None
    assert greeting.QMP.version["qemu"]["major"] == 10, greeting
    assert str(greeting.QMP.version["package"]).startswith("blockjob "), greeting

    version = await qmp.execute("query-version")
    assert version["qemu"] == {"major": 10, "minor": 0, "micro": 0}, version

    img = os.path.join(workdir, "disk.qcow2")
    await qmp.execute("blockdev-add", {
        "driver": "qcow2", "node-name": "disk0",
        "file": {"driver": "file", "filename": img},
    })
    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    names = sorted(n["node-name"] for n in nodes)
    assert "disk0" in names, names
    disk = next(n for n in nodes if n["node-name"] == "disk0")
    assert disk["drv"] == "qcow2" and disk["image"]["virtual-size"] == 16 << 20, disk

    try:
        await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": "disk0"})
        raise AssertionError("duplicate node accepted")
    except ExecuteError as e:
        assert e.error.error.class_ == "GenericError", e
        assert e.error.error.desc == "Duplicate nodes with node-name='disk0'", e

    try:
        await qmp.execute("no-such-command")
        raise AssertionError("unknown command accepted")
    except ExecuteError as e:
        assert e.error.error.class_ == "CommandNotFound", e

    schema = await qmp.execute("query-qmp-schema")
    assert any(e["name"] == "blockdev-add" for e in schema)

    await qmp.execute("blockdev-del", {"node-name": "disk0"})
    await qmp.execute("quit")
    try:
        await qmp.disconnect()
    except EOFError:
        pass  # the daemon hangs up after quit, as qemu-storage-daemon does
    print("qemu.qmp client: ok")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
