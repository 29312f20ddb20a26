import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _threads():
    # 2 cores here; on a machine busy with other work set HERO_TEST_THREADS=1 (OpenMP threads
    # that wait for a busy core slow small ops down by an order of magnitude)
    torch.set_num_threads(int(os.environ.get("HERO_TEST_THREADS", "2")))
    yield
