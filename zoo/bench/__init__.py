"""The benchmark harness: every mixer against its reference implementation and the machine's limits, in one run.

* :mod:`zoo.bench.cases`   the case registry (subject x phase x T x dtype x device) and the implementations
* :mod:`zoo.bench.flops`   analytic FLOP counts (formulas documented there)
* :mod:`zoo.bench.timing`  timing (perf_counter / CUDA events), median and spread, the log-log exponent fit
* :mod:`zoo.bench.memory`  peak RSS of a fresh process per (implementation, case)
* :mod:`zoo.bench.machine` machine info and the measured GEMM FLOP/s
* :mod:`zoo.bench.runner`  running the cases; :mod:`zoo.bench.report` JSON / Markdown / PNG reports
* :mod:`zoo.bench.cli`     ``main(argv)``, the ``zoo bench`` command
"""
