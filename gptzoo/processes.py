"""Whether another process still runs: how a run's status and a corpus's temporary folders tell a
live owner from a killed one."""

import os


def alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (whoever owns it)."""
    try:
        os.kill(pid, 0)  # signal 0 checks only that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
