"""Public ops: Triton kernels with autograd, dispatching to `kernels.reference` where Triton
does not run (see `kernels.dispatch`), and `Ops`, the set a model runs (see `kernels.ops`)."""
from kernels.deform_conv import deform_conv2d
from kernels.ops import Ops
from kernels.star_conv import star_deform_conv2d, star_deform_conv2d_pair
from kernels.varifocal import varifocal_loss, varifocal_loss_dense

__all__ = ["Ops", "deform_conv2d", "star_deform_conv2d", "star_deform_conv2d_pair", "varifocal_loss",
           "varifocal_loss_dense"]
