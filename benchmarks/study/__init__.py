"""The tuning study behind `benchmarks/tuning.py`: arms, scheduling, records, report, plots.

Imported with `benchmarks/` on `sys.path` (benchmarks run as scripts, not as a package).
"""
