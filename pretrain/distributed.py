"""Process-group start-up through DeepSpeed, on a loopback-only store for one-node runs, and one
clean-up DeepSpeed leaves undone.

On the CPU accelerator DeepSpeed's shared-memory all-reduce gives every rank a POSIX shm segment,
``/dev/shm/deepspeed_allreduce_buffer_<uid>_<master addr>_<master port>_<rank>`` (about 66 MB,
fully written), and never unlinks it: each multi-rank CPU run leaves 66 MB per rank in RAM-backed
tmpfs until reboot, and a machine that runs many (a test suite, a sweep) runs out of memory. Once
every rank has mapped every peer's segment, the names are no longer needed, so each rank unlinks its
own; the mappings stay valid and the kernel frees the memory when the last rank exits, SIGKILL
included.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import torch.distributed as dist

SHM_DIR = Path("/dev/shm")


def shm_workspace_path(rank: int) -> Path:
    """The segment DeepSpeed's shm_initialize creates for ``rank`` (named from MASTER_ADDR/PORT)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def loopback_store() -> dist.TCPStore | None:
    """The rendezvous store of a one-node run whose ranks create it themselves, on loopback only.

    Launchers other than torchrun (the DeepSpeed launcher on one node) leave the store to rank 0's
    ``init_process_group``, and a TCPStore server binds every interface (``::``) whatever host it is
    given: an unauthenticated key-value store open to the network for the whole run. Handed a
    socket it does not bind itself (``master_listen_fd``), it listens where that socket does. So
    when MASTER_ADDR is a loopback address, rank 0 binds it and MASTER_PORT, and the other ranks
    connect as usual. None when there is nothing to do: torchrun ranks use their agent's store
    (``loopback_torchrun`` on one node), and a multi-node run must listen where its peers can reach.
    """
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or not port or "RANK" not in os.environ
            or not _is_loopback(addr)):
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if rank != 0:
        return dist.TCPStore(addr, int(port), world, is_master=False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a previous run's TIME_WAIT
    sock.bind((socket.gethostbyname(addr), int(port)))
    sock.listen(128)
    # The store owns the descriptor from here on (detach: Python must not close it as well).
    return dist.TCPStore(addr, int(port), world, is_master=True, wait_for_workers=False, master_listen_fd=sock.detach())


def restarted_agent_store() -> dist.Store | None:
    """The agent's store under a prefix of this restart's own, for ranks torchrun restarted.

    torch assumes each restart gets a fresh store, but a static rendezvous (``loopback_torchrun``,
    multi-node ``--node_rank``) keeps one store for the whole launch: a restarted rank would read its
    dead predecessors' gloo addresses and fail to connect. None when not restarted by torchrun.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or attempt == "0":
        return None
    from deepspeed.constants import default_pg_timeout

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=default_pg_timeout)
    return dist.PrefixStore(f"/worker/attempt_{attempt}", store)


def init_distributed(backend: str) -> None:
    """``deepspeed.init_distributed`` (on a loopback store when the run is one node's, see
    ``loopback_store``), then the unlink of this rank's shm workspace."""
    import deepspeed

    if not dist.is_initialized() and (store := loopback_store() or restarted_agent_store()) is not None:
        # DeepSpeed adopts a process group that is already up.
        from deepspeed.constants import default_pg_timeout

        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=default_pg_timeout)
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
