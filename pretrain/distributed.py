"""Process-group start-up through DeepSpeed, and one clean-up DeepSpeed leaves undone.

On the CPU accelerator DeepSpeed's shared-memory all-reduce gives every rank a POSIX shm segment,
``/dev/shm/deepspeed_allreduce_buffer_<uid>_<master addr>_<master port>_<rank>`` (about 66 MB,
fully written), and never unlinks it: each multi-rank CPU run leaves 66 MB per rank in RAM-backed
tmpfs until reboot, and a machine that runs many (a test suite, a sweep) runs out of memory. Once
every rank has mapped every peer's segment, the names are no longer needed, so each rank unlinks its
own; the mappings stay valid and the kernel frees the memory when the last rank exits, SIGKILL
included.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

SHM_DIR = Path("/dev/shm")


def shm_workspace_path(rank: int) -> Path:
    """The segment DeepSpeed's shm_initialize creates for ``rank`` (named from MASTER_ADDR/PORT)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def init_distributed(backend: str) -> None:
    """``deepspeed.init_distributed`` followed by the unlink of this rank's shm workspace."""
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)
    segment = shm_workspace_path(dist.get_rank())
    if segment.exists():
        # shm_initialize returns on a rank only after it has opened every peer's segment; after this
        # barrier no rank is still looking any name up. A barrier that fails means a peer died: the
        # run is over and the name is still not needed.
        try:
            dist.barrier()
        finally:
            segment.unlink(missing_ok=True)
