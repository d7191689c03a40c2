"""Session set-up shared by every test.

Without a GPU, Triton's kernels can only run in its interpreter, which must be chosen before triton is
first imported: so the whole session runs it (``tests/unit/test_lora_triton.py`` checks the kernels there;
nothing else here uses triton). With a GPU the kernels are compiled and run on it; to also run the
interpreter cases there: ``TRITON_INTERPRET=1 pytest tests/unit/test_lora_triton.py``.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def c_kernels() -> None:
    """The C kernels from the machine's cache, loaded once: an app built on a fresh cache dir would otherwise
    build them again (about 20 s). Use it with ``pytestmark = pytest.mark.usefixtures("c_kernels")``."""
    from server.lora import cpu_kernel
    from server.model import cpu_attention

    cpu_kernel.available()
    cpu_attention.available()
