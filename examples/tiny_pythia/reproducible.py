"""The same numbers on every x86-64 machine of this kind, for training and scoring alike.

torch's own kernels and MKL pick their code path by CPU (AVX-512 on some machines, AVX2 on
others), and the paths round differently: the demo's numbers then differ in the third digit from
machine to machine. AVX2 is the widest path every such machine has, so both are pinned to it.
These must be set before torch is imported; child processes inherit them. Measured here: after
100 training steps, AVX-512 and these settings gave weights differing by up to 8e-5; one thread and
two gave identical weights under these settings.
"""

import os

SETTINGS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "OMP_NUM_THREADS": "2"}


def pin() -> None:
    for key, value in SETTINGS.items():
        os.environ.setdefault(key, value)
