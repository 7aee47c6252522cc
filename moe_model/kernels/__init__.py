"""PolyNorm / PolyReLU kernels, layered one way (nothing imports upward):

* :mod:`.reference`       -- the paper's math in plain PyTorch (the eager backend; what the
  others are tested against);
* :mod:`.polynorm_fused`  -- ``torch.autograd.Function``s with analytic backwards (any device);
* :mod:`.polynorm_triton` -- fused Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``);
* :mod:`.dispatch`        -- picks one of them by backend name (``auto|eager|fused|triton|compile``).

:mod:`moe_model.activations` (the ``nn.Module``s) calls only :mod:`.dispatch`.
"""
