"""Helpers the tests share and the product never imports: the reference model of the policy
decision (refmodel), the DNS fuzz target (dns_fuzz), a daemon with Prometheus scraping it
(metrics_support), the credential proxy's test CA and echo upstream (credproxy_support).

Importable as `support.<module>`: pytest puts tests/ on sys.path (pyproject.toml, `pythonpath`);
a subprocess gets it through PYTHONPATH (`PYTHONPATH=tests python -m support.credproxy_support echo`).
"""
