"""Run by tests/test_ddp.py under torchrun (2 ranks, gloo): dcdit's teardown with the SIGABRT's trigger injected.

``destroy_process_group`` used to leave the gloo group alive: ``torch.distributed.nn.functional``, imported
lazily on the first model forward (torch._dynamo -> fsdp -> _shard), captured the live group in its default
arguments. Its ``pt_gloo_runloop`` threads then ran on into interpreter shutdown, and one that dropped the last
reference to a collective's tensor there had to take the GIL of a finalizing interpreter: CPython ends such a
thread with pthread_exit, whose unwinding through a noexcept C++ destructor calls std::terminate (SIGABRT).

Here rank 1 leaves a tensor with a gloo worker (an async all_reduce that rank 0 joins only once rank 1 is in
teardown), and an atexit handler holds the GIL in C right before the interpreter starts finalizing: the last
milliseconds in which a late worker used to kill the rank, widened to about a second. argv[1]: a flag file;
each rank writes the names of the threads left after teardown next to it.
"""
import atexit
import os
import sys
import time
from pathlib import Path

atexit.register(sum, range(30_000_000))  # registered first, so it runs last: the GIL held, no bytecode run

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dcdit.training.distributed import setup, teardown  # noqa: E402

flag = Path(sys.argv[1])
info = setup("cpu")
import torch._dynamo  # noqa: E402,F401  the import dcdit's first model forward triggers, after setup

try:
    if info.rank == 1:
        t = torch.ones(4)
        dist.all_reduce(t, async_op=True)  # completes on a pt_gloo_runloop thread once rank 0 joins...
        del t  # ...and that thread now holds the tensor's last reference (and its Python object)
        flag.touch()
    else:
        while not flag.exists():
            time.sleep(0.01)
        time.sleep(0.3)  # rank 1 is in teardown now (without the fix: already shutting down)
        dist.all_reduce(torch.ones(4))
finally:
    teardown(info)

names = sorted(Path(f"/proc/self/task/{tid}/comm").read_text().strip() for tid in os.listdir("/proc/self/task"))
flag.with_name(f"threads-rank{info.rank}.txt").write_text("\n".join(names))  # what still runs after teardown
