"""Coverage-guided fuzzing of pyvirtio's parsers (atheris), with a hypothesis fallback.

    python -m fuzz ring --seconds 60          # the split/packed ring walker
    python -m fuzz codec --seconds 60         # the vhost-user codec (bytes + fds)
    python -m fuzz ring --engine hypothesis   # no atheris: a hypothesis long run
    fuzz/run.sh codec 300                     # the same, from a shell

Targets live in `fuzz.targets` (plain functions of one `bytes` argument);
`fuzz.make_corpus` writes the seed corpus under fuzz/corpus/<target>/ from
valid rings and messages. Crashes land in fuzz/crashes/; each one found so
far is a regression test in tests/test_fuzz_regressions.py.
"""
