"""TLS connections we cannot decrypt: the ClientHello says it is TLS, and names the server.

Statically linked TLS (Go, Node's bundled OpenSSL, BoringSSL in Electron) has no
libssl for the uprobes; such a connection is still recorded, with its SNI.  The
ClientHello is read with scapy's TLS layer.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def looks_like_client_hello(first: bytes) -> bool:
    """A TLS handshake record (0x16, version 3.x) whose first message is a ClientHello (1)."""
    return len(first) >= 6 and first[0] == 0x16 and first[1] == 3 and first[5] == 1


def server_name(client_hello: bytes) -> str:
    """The SNI of a ClientHello, or "" (none sent, e.g. for an IP address, or unreadable)."""
    try:
        from scapy.layers.tls.record import TLS

        record = TLS(client_hello)   # type: ignore[no-untyped-call]  # scapy has no annotations
        for msg in getattr(record, "msg", None) or []:
            for ext in getattr(msg, "ext", None) or []:
                for name in getattr(ext, "servernames", None) or []:
                    value = name.servername
                    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    except Exception as e:   # scapy raises many kinds on truncated or odd records
        log.debug("ClientHello not readable: %s", e)
    return ""
