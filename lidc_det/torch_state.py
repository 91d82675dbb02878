"""torch's process-wide state, changed only inside a block and restored after it.

Library calls must leave the caller's global RNG streams and thread count as
they found them:

* :func:`torch_threads` sets ``torch.set_num_threads`` for a block and restores
  the previous count (also when the block raises).
* :func:`seeded_torch_rng` seeds torch's *global* generator for a block, inside
  ``torch.random.fork_rng``, for third-party layers that initialise their
  weights from it (MONAI's ``UNet`` and ``RetinaNet``, mmdet): the result is a
  function of the seed, and the caller's stream is back after the block. Code
  of our own draws from a ``torch.Generator`` / ``numpy.random.Generator``
  passed in instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["seeded_torch_rng", "torch_threads"]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block (unchanged when ``n`` is None or 0), restored after."""
    if not n:
        yield
        return
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def seeded_torch_rng(seed: int, device: str = "cpu") -> Iterator[None]:
    """torch's global generator seeded with ``seed`` inside the block; the caller's state restored after.

    ``device``: where the block draws random numbers. ``"cpu"``: only the CPU
    generator is seeded and restored (CUDA is not touched). ``"cuda..."``: every
    CUDA device's generator is seeded, saved and restored as well.
    """
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            torch.manual_seed(int(seed))
            yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int(seed))
        yield
