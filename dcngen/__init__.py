"""dcngen: a code-generating compiler for deformable convolution kernels."""
