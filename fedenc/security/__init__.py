"""Security: CA, certificates and keys (``cryptography``), TLS credentials, child identity.

One concept per module; nothing is imported here so that ``fedenc --help`` stays fast:

* :mod:`~fedenc.security.ca`, :mod:`~fedenc.security.issue`: the CA, master and child certificates;
* :mod:`~fedenc.security.revocation`, :mod:`~fedenc.security.allowlist`: who is refused / allowed;
* :mod:`~fedenc.security.credentials`: ``load_master_tls`` / ``load_child_tls`` and the gRPC
  credential builders;
* :mod:`~fedenc.security.identity`: ``IdentityVerifier`` (stream peer -> verified child name);
* :mod:`~fedenc.security.rpc_errors`: ``explain_rpc_error`` for a child's operator;
* :mod:`~fedenc.security.policy`: ``choose_transport`` / ``insecure_warning`` (``--insecure``);
* :mod:`~fedenc.security.store`, :mod:`~fedenc.security.cli`: ``fedenc certs``;
* :mod:`~fedenc.security.pem`, :mod:`~fedenc.security.layout`: files, modes and their places.
"""
