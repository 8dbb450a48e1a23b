"""Suite-wide settings: one intra-op thread (on 2-core machines torch's default pool makes the
many small ops of tiny test models far slower)."""
import os

import torch

torch.set_num_threads(int(os.environ.get("VISREP_TEST_THREADS", "1")))

