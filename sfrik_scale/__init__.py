"""sfrik-scale: DeepSpeed-scaled self-supervised learning with rotation-invariant kernels."""

__version__ = "0.1.0"
