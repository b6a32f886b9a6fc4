"""Triton kernels, one op per file; shipped inside the package as digfast.kernels.

Import a kernel module only where Triton is installed (digfast.ops._backend does that);
under TRITON_INTERPRET=1 (set before the module is imported) the kernels run on the CPU.
"""
