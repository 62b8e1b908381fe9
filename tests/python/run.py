"""Runs the Python tests (unittest) and ends with "N passed, M failed, K skipped".

    PYTHONPATH=python python3 tests/python/run.py [-v] [-k PATTERN]

The package tests need numpy; the torch / transformers tests skip, saying why,
where those are not installed; CUDA tests skip without a GPU."""
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "python"))
sys.path.insert(0, HERE)


def main():
    verbose = "-v" in sys.argv
    pattern = sys.argv[sys.argv.index("-k") + 1] if "-k" in sys.argv else None
    loader = unittest.TestLoader()
    if pattern:
        loader.testNamePatterns = ["*%s*" % pattern]
    suite = loader.discover(HERE, pattern="test_*.py", top_level_dir=HERE)
    result = unittest.TextTestRunner(verbosity=2 if verbose else 1, stream=sys.stdout).run(suite)
    reasons = {}
    for _, why in result.skipped:
        reasons[why] = reasons.get(why, 0) + 1
    for why, n in sorted(reasons.items()):
        print("skipped %d: %s" % (n, why))
    bad = len(result.failures) + len(result.errors)
    ok = result.testsRun - bad - len(result.skipped) - len(result.expectedFailures)
    line = "%d passed, %d failed" % (ok, bad)
    if result.skipped:
        line += ", %d skipped" % len(result.skipped)
    print(line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
