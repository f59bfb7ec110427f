# Numba reads NUMBA_ENABLE_CUDASIM when it is first imported: without a GPU, the CUDA kernels'
# tests run on its CUDA simulator, on the CPU.
import os

if "NUMBA_ENABLE_CUDASIM" not in os.environ:
    from minparcae.backend import gpu_available

    os.environ["NUMBA_ENABLE_CUDASIM"] = "0" if gpu_available() else "1"

import sys

# train.py and sample.py live at the repository root, next to this folder
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
