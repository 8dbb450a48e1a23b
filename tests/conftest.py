"""Suite-wide settings: one intra-op thread (on 2-core machines torch's default pool makes the
many small ops of tiny test models far slower)."""
import os
import socket

import pytest
import torch

torch.set_num_threads(int(os.environ.get("VISREP_TEST_THREADS", "1")))



@pytest.fixture
def free_port() -> int:
    """A free TCP port on the loopback interface (for gloo process groups)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
