"""Key custody for VMs: keys generated inside a PKCS#11 token (SoftHSM, an HSM, a smart card) or
sealed in skyguard's store, managed with `skyguard key`, and used by VMs only through the crypto
proxy, which never hands out a private key.

    types.py        key types, KeyInfo, the error class, standard encodings
    pkcs11.py       the token backend (python-pkcs11; non-extractable, sensitive keys)
    filebackend.py  keys sealed in the secret store (hosts without a token)
    backends.py     open the backend a policy's `keys:` section names (PIN from the sealed store)
    softhsm.py      a SoftHSM token in a folder of its own (tests, benchmarks, trying it out)
    api.py          the proxy's HTTP API as decisions without I/O
    proxy.py        the crypto proxy, a daemon part
    record.py       key_create / key_remove in the signed log
    tlskey.py       token keys in TLS (client certificates, termination) through OpenSSL's pkcs11 engine
    doctor.py       `skyguard doctor`'s PKCS#11 check

pkcs11.py and tlskey.py stand below the credential proxy, which presents token keys in TLS with
them (tests/unit/test_import_graph.py); the rest of the package stands above it.

Not here: the policy section (skyguard/policy/keys.py), the CLI (skyguard/cli/key.py).
"""
