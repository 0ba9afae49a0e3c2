"""DSA kernels: a plain-torch reference (``keye_dsa_reference``) and Triton kernels.

Kept near-empty on purpose: importing this package never imports triton.
"""
