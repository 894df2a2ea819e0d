"""The benchmark harness: every mixer against its reference implementation and the machine's limits, in one run.

Nothing here names a mixer or a family: subjects come from the registries (each mixer's and family's
``bench_cases``), references from :mod:`zoo.bench.references`, FLOP counts from ``Mixer.flops``.

* :mod:`zoo.bench.cases`      subjects (from the registries) x phase x T x dtype x device, building, the phases
* :mod:`zoo.bench.references` the reference registry (``@register_reference``; ``mixer:<name>``)
* :mod:`zoo.bench.adapters`   one interface (``forward`` / ``new_state`` / ``step``) for every implementation
* :mod:`zoo.bench.flops`      the FLOP conventions and a model's count (the sum of its layers)
* :mod:`zoo.bench.timing`     timing (perf_counter / CUDA events), median and spread, the log-log exponent fit
* :mod:`zoo.bench.memory`     peak RSS of a fresh process per (implementation, case)
* :mod:`zoo.bench.machine`    machine info and the measured GEMM FLOP/s
* :mod:`zoo.bench.runner`     running the cases (resume, load average, flags); :mod:`zoo.bench.report` JSON /
  Markdown / PNG reports
* :mod:`zoo.bench.cli`        ``main(argv)``, the ``zoo bench`` command
"""
