"""The paper's drivers: the Fashion-MNIST reproduction of Table 3 and the analyses of Sections 3-5.

Not part of the ``hf_csr`` library: these modules use it (through its runner, :mod:`hf_csr.experiment`)
to produce REPRODUCTION.md and the analysis figures, and nothing in ``hf_csr`` imports them.
"""
