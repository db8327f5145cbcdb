"""Run a function on W local gloo ranks (127.0.0.1, a free port) from a test, with a deadline."""
from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Ranks fork from one server that imported torch and the package once: fresh interpreters cost
# ~5 s of imports each on 2 loaded cores, and DistributedDataParallel's first construction
# another ~5 s (it imports torch._dynamo). The server itself starts clean, so no thread or
# connection of the test process (e.g. Ray's) is forked.
mp.get_context("forkserver").set_forkserver_preload(
    ["torch._dynamo", "torch.distributed", "dist_rec.models", "dist_rec.losses",
     "dist_rec.embeddings.sharded"])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ranks(function, world_size: int, *args, timeout: float = 120.0) -> None:
    """Call function(rank, world_size, *args) in `world_size` spawned processes joined to one gloo
    group. An exception in a rank is raised here; ranks still running after `timeout` seconds
    (e.g. a collective one rank never joined) are terminated and TimeoutError is raised."""
    port = free_port()
    context = mp.start_processes(_entry, args=(function, world_size, port, args), nprocs=world_size,
                                 join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            raise TimeoutError(f"{function.__name__} on {world_size} ranks ran past {timeout} s")


def _entry(rank: int, function, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # W processes share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        function(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
