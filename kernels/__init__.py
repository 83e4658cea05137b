"""Public ops: Triton kernels with autograd, dispatching to `kernels.reference` where Triton
does not run (see `kernels.dispatch`)."""
from kernels.varifocal import varifocal_loss, varifocal_loss_dense

__all__ = ["varifocal_loss", "varifocal_loss_dense"]
