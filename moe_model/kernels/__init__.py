"""PolyNorm / PolyReLU kernels, layered one way (nothing imports upward):

* :mod:`.precision`       -- autocast switched off inside every backend (fp32 statistics);
* :mod:`.reference`       -- the paper's math in plain PyTorch (the eager backend; what the
  others are tested against);
* :mod:`.polynorm_fused`  -- ``torch.autograd.Function``s with analytic backwards (any device);
* :mod:`.polynorm_triton` -- fused Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``);
* :mod:`.triton_build`    -- builds the Triton kernels for sm_90a / sm_100a on CPU and reads
  registers, spills and 64-bit offsets from ptxas and the PTX;
* :mod:`.dispatch`        -- picks one of them by backend name (``auto|eager|fused|triton|compile``).

:mod:`moe_model.activations` (the ``nn.Module``s) calls only :mod:`.dispatch`.
"""
