"""The JSON Schemas of what other programs exchange with us, generated from the same msgspec
structs the code uses. Checked in under docs/schemas/; a test fails when they drift.

    python -m orchestrator.contract docs/schemas     (re)write them
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from .commands import CreateCommand, DeleteCommand, ExecCommand, StartCommand, StopCommand
from .exec_types import ExecRecord, ExecRequest
from .schemas import (
    DesktopStarted,
    DisplayReady,
    DisplayRestarted,
    DockerdReady,
    ErrorBody,
    Event,
    ImagesLoaded,
    LifecycleJob,
    SandboxInfo,
    SessionChanged,
    SessionCreate,
    SessionRecord,
    VolumeCreated,
)

SCHEMAS: dict[str, Any] = {
    "command-create": CreateCommand,
    "command-stop": StopCommand,
    "command-start": StartCommand,
    "command-delete": DeleteCommand,
    "command-exec": ExecCommand,
    "exec-request": ExecRequest,
    "exec-record": ExecRecord,
    "session-create": SessionCreate,
    "session-record": SessionRecord,
    "lifecycle-job": LifecycleJob,
    "event": Event,
    "event-data-session-changed": SessionChanged,
    "event-data-volume-created": VolumeCreated,
    "event-data-desktop-started": DesktopStarted,
    "event-data-dockerd-ready": DockerdReady,
    "event-data-display-ready": DisplayReady,
    "event-data-display-restarted": DisplayRestarted,
    "event-data-images-loaded": ImagesLoaded,
    "event-data-sandbox-heartbeat": SandboxInfo,
    "error": ErrorBody,
}


def render() -> dict[str, str]:
    out = {}
    for name, struct in SCHEMAS.items():
        schema = msgspec.json.schema(struct)
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": f"{name}.json", **schema}
        out[f"{name}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def main(argv: list[str]) -> int:
    target = Path(argv[0] if argv else "docs/schemas")
    target.mkdir(parents=True, exist_ok=True)
    for filename, text in render().items():
        (target / filename).write_text(text)
        print(f"wrote {target / filename}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
