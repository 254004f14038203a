"""`make gpu-check`: the first minutes on a lent GPU machine, planned and proven beforehand by a dry run.

``python -m benchmarks.gpu_check OUT`` (``make gpu-check GPU_CHECK_OUT=OUT``) builds, tests, sanitizes and times
genfast on the GPU within 540 s; ``python -m benchmarks.gpu_check --dry-run OUT`` (``make gpu-check-dry``, part
of ``make test``) runs every phase of the same plan on the CPU, with the packages the lent image lacks hidden.

plan.py      what runs, in which phase, with how much time (one plan for both runs)
phases.py    the phases, real or dry, and how their output is read
workload.py  the sanitizer's workload: every op of each family under every backend that serves it
collect.py   the dry run's pytest plugin: the tests phase's selection, collected as on a GPU
lent_image.py  the lent image's packages, and running a module with every other package hidden
summary.py   gpu-check.json / .md, rewritten after every step; the verdicts
__main__.py  the command line

Keep this package's import light: lent_image runs from it before anything else is imported.
"""
