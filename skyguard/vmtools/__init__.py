"""Small programs that run inside lab VMs (network namespaces) for `skyguard demo`, `skyguard
attack` and the lab's health probe, started with `python -m skyguard.vmtools.<tool> ARGS...`
(lab.exec / lab.popen). Each prints one line (or one JSON object) a caller parses; none imports
the rest of skyguard, so each starts in a few milliseconds. Not here: what they are run for
(demo.py, attack.py, lab/lab.py).
"""
