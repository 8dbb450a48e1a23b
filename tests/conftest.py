"""Suite-wide settings: one intra-op thread (on 2-core machines torch's default pool makes the
many small ops of tiny test models far slower); learning tests (marked ``slow``: real models, real
batches) get every core, ``VISREP_LEARNING_THREADS`` (default: all CPUs, at most 8)."""
import os
import socket

import pytest
import torch

torch.set_num_threads(int(os.environ.get("VISREP_TEST_THREADS", "1")))



@pytest.fixture(autouse=True)
def _learning_threads(request):
    if request.node.get_closest_marker("slow") is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("VISREP_LEARNING_THREADS", min(8, os.cpu_count() or 1))))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def free_port() -> int:
    """A free TCP port on the loopback interface (for gloo process groups)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
