#!/usr/bin/env python3
"""A whole mirror job driven through mirrorfs's QMP socket by the real qemu.qmp library.

usage: qmp_lifecycle.py SOCKET IMAGE_NAME TARGET
Prints the events it saw; exits non-zero on any mismatch with QEMU's behaviour.
"""
import asyncio
import sys

from qemu.qmp import QMPClient


async def main(socket, device, target):
    client = QMPClient("mirrorfs-test")
    await client.connect(socket)
    version = await client.execute("query-version")
    assert {"major", "minor", "micro"} <= set(version["qemu"]), version
    seen = []
    ready = asyncio.Event()
    done = asyncio.Event()

    async def collect():
        async for event in client.events:
            name = event["event"]
            if name == "JOB_STATUS_CHANGE":
                seen.append("JSC " + event["data"]["status"])
                if event["data"]["status"] == "null":
                    done.set()
                    return
            else:
                seen.append(name)
                assert event["data"]["device"] == device, event
                assert set(event["timestamp"]) == {"seconds", "microseconds"}, event
                if name == "BLOCK_JOB_READY":
                    ready.set()
                if name == "BLOCK_JOB_COMPLETED":
                    assert "error" not in event["data"], event
                    assert event["data"]["offset"] == event["data"]["len"], event

    collector = asyncio.create_task(collect())
    await client.execute("drive-mirror", {"device": device, "target": target, "sync": "full", "format": "raw"})
    await asyncio.wait_for(ready.wait(), 60)
    jobs = await client.execute("query-block-jobs")
    assert jobs[0]["actively-synced"] is False and jobs[0]["copy-mode"] == "background", jobs
    await client.execute("block-job-change", {"id": device, "type": "mirror", "copy-mode": "write-blocking"})
    for _ in range(600):
        jobs = await client.execute("query-block-jobs")
        if jobs[0]["actively-synced"]:
            break
        await asyncio.sleep(0.05)
    assert jobs[0]["actively-synced"] is True, jobs
    query_jobs = await client.execute("query-jobs")
    assert query_jobs[0]["id"] == device and query_jobs[0]["status"] == "ready", query_jobs
    await client.execute("block-job-complete", {"device": device})
    await asyncio.wait_for(done.wait(), 60)
    await collector
    assert await client.execute("query-block-jobs") == []
    await client.disconnect()
    expected = ["JSC created", "JSC running", "JSC ready", "BLOCK_JOB_READY",
                "JSC waiting", "JSC pending", "BLOCK_JOB_COMPLETED", "JSC concluded", "JSC null"]
    print(" | ".join(seen))
    assert seen == expected, f"events {seen} != {expected}"


asyncio.run(main(*sys.argv[1:4]))
