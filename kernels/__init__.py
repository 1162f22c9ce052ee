"""Triton kernels of the custom ops, installed as ``upi_fast.kernels``: one module per op (kernels and
their launcher), named in the op table (``upi_fast/ops/table.py``) and loaded lazily by the dispatch
layer (:mod:`upi_fast.ops`) on first use.

* :mod:`.saliency_dissim` -- ``saliency_dissim_triton``: fused ``abs_sum_l1`` + dissimilarity + gradient;
* :mod:`.softplus` -- ``softplus_fwd_triton``, ``softplus_bwd_triton``, ``softplus_bwd2_triton``;
* :mod:`.sketch_update` -- ``sketch_update_triton``: in-place ``W += Psi @ normalize_rows(A)``.

This package imports nothing itself, so importing ``upi_fast`` never imports Triton. Set
``TRITON_INTERPRET=1`` before the first kernel module is imported to run them on CPU tensors.
"""
