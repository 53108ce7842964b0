"""The paper's drivers: the Fashion-MNIST reproduction of Tables 3 and 6 (:mod:`.reproduction`), its report
(:mod:`.report`: tables, paired differences, plots for REPRODUCTION.md) and the analyses of Sections 3-5
(:mod:`.analysis`).

Not part of the ``hf_csr`` library: these modules use it (every training run goes through its runner,
:func:`hf_csr.experiment.run`) to produce REPRODUCTION.md and the analysis figures, and nothing in ``hf_csr``
imports them.
"""
