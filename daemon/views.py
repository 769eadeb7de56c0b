"""What the API shows of functions and instances (GET /functions/{name}, GET /instances)."""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

from daemon.keepalive import Form
from daemon.state import FunctionState, LiveInstance
from shmpool.errors import PoolError
from snapshot.template import Template


def describe_function(fs: FunctionState) -> dict[str, Any]:
    d = fs.deployed
    return {
        **fs.spec.to_json(),
        "revision": d.revision,
        "template": fs.template.name if fs.template else None,
        "status": "broken" if fs.broken else "ready",
        "error": fs.broken or None,
        "created_at": d.created_at,
        "updated_at": d.updated_at,
        "instances": len(fs.instances),
        "idle": len(fs.idle),
        "min_warm": fs.min_warm,
        "invocations": fs.invocations,
        "template_bytes": fs.template.template.manifest.data_bytes if fs.template else 0,
        "template_form": _form(fs),
        "template_codec": _codec(fs),
        "template_stored_bytes": _stored_bytes(fs.template.template) if fs.template else 0,
        "init_ms": None if d.init_ms is None else round(d.init_ms, 1),
        "captured": _captured(fs),
        "parent": fs.template.template.parent if fs.template else None,
    }


def describe_instance(i: LiveInstance) -> dict[str, Any]:
    return {
        "id": i.id,
        "function": i.function,
        "revision": i.revision,
        "pid": i.pid,
        "sandbox": i.sandbox.id,
        "address": str(i.sandbox.lease.address) if i.sandbox.lease else None,
        "state": "busy" if i.busy else "idle",
        "mode": i.restored.mode,
        "template": i.template.name,
        "started_at": i.started_at,
        "idle_seconds": 0.0 if i.busy else round(time.monotonic() - i.last_used, 3),
        "invocations": i.invocations,
        "restore_ms": round(i.restore_ms, 3),
        "memory": _memory(i.pid),
    }


def _stored_bytes(template: Template) -> int:
    """What the template holds of the pool now (holes and punched pages excluded), with the cold
    pages of a compressed one that are decompressed in its cache segment."""
    try:
        held = os.fstat(template.segment.fd).st_blocks * 512
        if template.manifest.cold is not None:
            held += os.fstat(template.cache().fd).st_blocks * 512
    except (OSError, PoolError):
        return 0
    return held


def _captured(fs: FunctionState) -> str | None:
    """layered: a child of the runtime template (daemon/layering.py); cold: from a cold start."""
    if fs.template is None:
        return None
    return "layered" if fs.template.template.parent else "cold"


def _form(fs: FunctionState) -> str:
    if fs.template is None:
        return str(Form.EVICTED) if fs.evicted else "none"
    return str(Form.COMPRESSED if fs.template.template.manifest.cold is not None else Form.WARM)


def _codec(fs: FunctionState) -> str | None:
    cold = fs.template.template.manifest.cold if fs.template else None
    return cold.codec if cold else None


def _memory(pid: int) -> dict[str, int] | None:
    """rss: all the pages it maps; uss: the pages only it has (what the instance costs beyond the
    template it shares); pss: its share of everything. None once the process is gone."""
    try:
        info = psutil.Process(pid).memory_full_info()
    except (psutil.Error, OSError):
        return None
    return {"rss": info.rss, "pss": info.pss, "uss": info.uss}
