"""One torch thread for a block of work, and the caller's thread count back after it.

Library code must not change torch's thread count for the rest of the process (a test, or a user's script, would
then run differently depending on what ran before). Some work still wants one thread: ChemNet's LSTM (350 tiny
sequential steps) and symmetric eigendecompositions synchronise threads at every step, so on a busy 2-core machine
one thread measured 15x (ChemNet) and 140x (512 x 512 eigh) faster than two; and CHGNet runs on `workers`
processes of one thread each, and on one thread in this process too, so that its energies (and the caches built
from them) are the same whatever the number of workers.
"""
from contextlib import contextmanager


@contextmanager
def one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
