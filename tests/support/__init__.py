"""Helpers the tests share and the product never imports: the reference model of the policy
decision (refmodel), the DNS fuzz target (dns_fuzz), a daemon with Prometheus scraping it
(metrics_support), how long a test's real client waits for an answer (client_waits), and the
other `*_support` modules here.

Not here: a CA and an HTTP(S) echo upstream. Tests and benchmarks use the lab's (skyguard.lab.ca
LabCA.issue/certify, skyguard.lab.internet EchoServer, or `python -m skyguard.lab.serve echo` in
another namespace), so there is one of each.

Importable as `support.<module>`: pytest puts tests/ on sys.path (pyproject.toml, `pythonpath`);
a subprocess gets it through PYTHONPATH (`PYTHONPATH=tests python -m support.<module>`).
"""
