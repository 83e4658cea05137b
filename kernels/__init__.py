from kernels.star_conv import star_deform_conv2d, star_deform_conv2d_pair  # noqa: F401
