"""Skips for what inductor cannot build under ATEN_CPU_CAPABILITY=default (torch 2.13).

Inductor compiles its CPU kernels for the machine (``-march=native``, its own ISA probe) against
ATen's vector header, whose scalar build (the one ``ATEN_CPU_CAPABILITY=default`` selects, as CI's
second run of the numerics tests does) lacks helpers the generated code calls
(``at::vec::transpose_block``, ``pack_vnni2``, ...): the C++ compile fails whatever the model
does. A CPU that really lacks AVX2 gets a matching header and is not affected; this is an
artefact of forcing the scalar kernels on a vector CPU.
"""

import pytest
import torch

INDUCTOR_CPU = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() == "DEFAULT",
    reason="inductor's generated CPU code does not compile under ATEN_CPU_CAPABILITY=default",
)
