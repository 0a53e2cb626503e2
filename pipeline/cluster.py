"""Which Ray cluster a job joins: the one Ray would find, unless what it would find is dead.

`ray.init()` with no address joins RAY_ADDRESS, else the cluster the last `ray start` on this
machine recorded in `<ray temp dir>/ray_current_cluster`, else starts a local one. A cluster
that died without `ray stop` (a killed session, a crashed head) leaves that file behind, and
`ray.init()` then waits on the dead GCS for many minutes before failing: `python jobs/...`
on a laptop, or a test run after one, hung. A recorded address where nothing listens is
therefore skipped, with a warning, and the job starts its own local cluster.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

logger = logging.getLogger(__name__)
ANSWER_TIMEOUT_S = 2.0


def recorded_address_file() -> Path | None:
    """Where `ray start` records its cluster's address; None where Ray's layout is unknown."""
    try:
        from ray._common.utils import get_ray_address_file  # no public API names this file
    except ImportError:
        return None
    return Path(get_ray_address_file(None))


def answers(address: str, timeout_s: float = ANSWER_TIMEOUT_S) -> bool:
    """Whether something accepts a TCP connection at `host:port` (a live GCS does)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return False
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def ray_init_address() -> str | None:
    """The `address` for `ray.init`: None (Ray's own choice) unless that choice is a dead cluster."""
    if os.environ.get("RAY_ADDRESS"):
        return None  # asked for by name (`ray job submit` sets it): a dead one should fail loudly
    path = recorded_address_file()
    if path is None or not path.is_file():
        return None
    recorded = path.read_text().strip()
    if not recorded or answers(recorded):
        return None
    logger.warning("%s names a Ray cluster at %s that does not answer (it was not stopped with `ray stop`); "
                   "starting a local cluster instead", path, recorded)
    return "local"


def connect() -> None:
    import ray

    ray.init(address=ray_init_address(), ignore_reinit_error=True, logging_level=logging.WARNING)
