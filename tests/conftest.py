"""Suite-wide settings: one intra-op thread (on 2-core machines torch's default pool makes the
many small ops of tiny test models far slower), and the fashion-mnist path for data tests."""
import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("VISREP_TEST_THREADS", "1")))

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


def fmnist_available() -> bool:
    return os.path.isdir(FMNIST_DIR)


needs_fmnist = pytest.mark.skipif(not fmnist_available(), reason=f"Fashion-MNIST not installed at {FMNIST_DIR} "
                                  "(apt-get install dataset-fashion-mnist)")
