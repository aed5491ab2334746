"""GPU kernels (Triton): imported only when a Kernel.TRITON path is asked for."""
