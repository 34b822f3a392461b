"""The certificate life cycle: a site CA, leaf certificates, CSRs, CRLs, rotation, expiry.

``certs`` does the work (stdlib and ``cryptography`` only); ``cli`` wires it into
``dicomfw certs …``. See docs/architecture.md.
"""
