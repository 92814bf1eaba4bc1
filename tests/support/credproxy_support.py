"""Test and benchmark fixtures for the credential proxy: a throwaway CA that signs server
certificates (standing in for the lab's CA), and a small, fast HTTP(S) echo server that returns
each request's headers and body as JSON and appends it to a JSON-lines file.

Not used by the daemon. The echo server parses only what a test client sends (Content-Length
bodies, keep-alive); it is a fixture, not a web server. Run it with
`PYTHONPATH=tests python -m support.credproxy_support echo --port P [--cert F --key F] [--log F] [--host H]`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gzip
import ipaddress
import json
import ssl
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _now():
    return datetime.datetime.now(datetime.UTC)


class TestCA:
    __test__ = False  # a fixture, not a pytest test class

    """A CA in memory; `issue(names)` returns (certificate PEM, key PEM) for a server."""

    def __init__(self, common_name: str = "skyguard test upstream CA"):
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        self.certificate = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(hours=1))
            .not_valid_after(_now() + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.certificate_pem = self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(self, names: list[str], client: bool = False) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        usage = x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH if client else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.certificate.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(hours=1))
            .not_valid_after(_now() + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


class EchoProtocol(asyncio.Protocol):
    """HTTP/1.1 echo with keep-alive. The response body is JSON: method, path, headers, body,
    sni, client_certificate (subject CN when the client presented one)."""

    def __init__(self, log_file):
        self.log_file = log_file
        self.buffer = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            headers = [line.split(":", 1) for line in head[1:] if ":" in line]
            headers = [(k.strip(), v.strip()) for k, v in headers]
            length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4: end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            method, path, _ = (head[0].split(" ") + ["", ""])[:3]
            ssl_object = self.transport.get_extra_info("ssl_object")
            peer_cert = ssl_object.getpeercert() if ssl_object else None
            record = {
                "method": method, "path": path, "headers": headers, "body": body.decode("latin-1"),
                "sni": getattr(ssl_object, "skyguard_sni", None) if ssl_object else None,
                "client_certificate": dict(x[0] for x in peer_cert["subject"]).get("commonName") if peer_cert else None,
                "connection": id(self),  # which upstream connection carried it (pooling tests)
            }
            if self.log_file:
                self.log_file.write(json.dumps(record) + "\n")
                self.log_file.flush()
            payload = json.dumps(record).encode()
            close = any(k.lower() == "connection" and v.lower() == "close" for k, v in headers)
            # Tests ask for an encoded echo, to check that the proxy decodes before scrubbing.
            encoding = next((v.lower() for k, v in headers if k.lower() == "x-echo-encoding"), "")
            extra = b""
            if encoding == "gzip":
                payload = gzip.compress(payload)
                extra = b"content-encoding: gzip\r\n"
            elif encoding:
                extra = b"content-encoding: %s\r\n" % encoding.encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s%s\r\n%s"
                % (len(payload), extra, b"connection: close\r\n" if close else b"", payload)
            )
            if close:
                self.transport.close()
                return
            if any(k.lower() == "x-echo-drop-idle" for k, _ in headers):
                # Answer, then drop the kept-alive connection as an idle upstream would.
                asyncio.get_running_loop().call_later(0.05, self.transport.close)


def echo_ssl_context(cert_file: str, key_file: str, client_ca: str | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_OPTIONAL

    def remember_sni(ssl_object, server_name, _context):
        ssl_object.skyguard_sni = server_name  # echoed back, so tests see what upstream got

    context.sni_callback = remember_sni
    return context


async def serve_echo(host, port, context=None, log_path=None):
    log_file = open(log_path, "a") if log_path else None
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: EchoProtocol(log_file), host, port, ssl=context,
                                      reuse_address=True)
    return server


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m support.credproxy_support")
    parser.add_argument("mode", choices=["echo"])
    parser.add_argument("--host", action="append", help="repeatable; default 0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--client-ca")
    parser.add_argument("--log")
    args = parser.parse_args(argv)
    context = echo_ssl_context(args.cert, args.key, args.client_ca) if args.cert else None

    async def run():
        server = await serve_echo(args.host or ["0.0.0.0"], args.port, context, args.log)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
