"""kvproof.kernels: Triton kernels for DSA-style KV and their torch references.

Modules (import them directly; this package imports nothing, so `import kvproof.kernels`
needs no Triton): `common` (layouts, fp8 references), `paged_copy`, `indexer`, `topk`,
`sparse_mla`, `bench`, `compile_target` and `compile_report` (compile for sm_90/sm_100 on
the CPU). See docs/kernels.md.
"""
