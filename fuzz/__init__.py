"""Coverage-guided fuzzing of every sans-IO decoder and of the session (atheris/libFuzzer).

``fuzz/targets.py`` holds one target per decoder, ``python -m fuzz.run`` runs them for a given
time, ``python -m fuzz.capture`` records the seed corpus from real DICOM peers. See
docs/fuzzing.md.
"""
