"""Key material for a deployed federation (``fedgen certs``), made with ``cryptography``.

What flwr 1.42 expects, read from its sources:

- **TLS** (every link to the SuperLink): the SuperLink takes ``--ssl-ca-certfile``,
  ``--ssl-certfile``, ``--ssl-keyfile`` (PEM); SuperNodes and ``flwr`` verify the server
  with the CA (``--root-certificates`` / ``root-certificates`` in ``config.toml``). The
  server certificate must name every address the SuperLink is reached at in its
  subjectAltName (IP entries for addresses, DNS entries for names).
- **SuperNode authentication** (``flower-superlink --enable-supernode-auth``): each
  SuperNode signs its requests with an elliptic-curve key on a NIST curve.
  ``flower-supernode --auth-supernode-private-key`` loads the private key with
  ``load_ssh_private_key`` (OpenSSH format) and ``flwr supernode register`` loads the
  public key with ``load_ssh_public_key`` (``ecdsa-sha2-nistp384 AAAA...``). We use P-384,
  the curve Flower's own docs use.

Layout written under ``OUT_DIR``::

    ca.crt  ca.key                       the federation's CA (keep ca.key offline)
    superlink.crt  superlink.key         the SuperLink's TLS certificate and key
    sites/<site>/auth.key  auth.pub      one SuperNode key pair per site

Private keys are written 0600 (created with that mode; never world-readable, not even
for a moment).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedgen.privacy.site_id import check_site_id

AUTH_CURVE = ec.SECP384R1()  # SuperNode auth keys: Flower accepts NIST curves, docs use P-384
TLS_CURVE = ec.SECP384R1()
# Always in the SuperLink certificate: the operator's `flwr` reaches the Control API, and the
# SuperLink's own SuperExec its Runtime API, on loopback (docs/deploy.md §2).
DEFAULT_HOSTS = ("127.0.0.1", "localhost")


@dataclass
class FederationKeys:
    """Paths of everything :func:`write_federation_keys` created."""

    out_dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    site_private_keys: dict[str, Path] = field(default_factory=dict)
    site_public_keys: dict[str, Path] = field(default_factory=dict)


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret file that is 0600 from the moment it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)  # in case the umask was stricter/odd: exactly 0600


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: list[str] | tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # dedupe, keep order
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_ca(common_name: str = "fedgen federation CA", days: int = 3650
            ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(TLS_CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str] | tuple[str, ...],
                     days: int = 825) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for the SuperLink, valid for every name/IP in ``hosts``."""
    if not hosts:
        raise ValueError("the SuperLink certificate needs at least one host name or IP address")
    key = ec.generate_private_key(TLS_CURVE)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=True, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def make_auth_key_pair(comment: str = "") -> tuple[bytes, bytes]:
    """(OpenSSH private key, OpenSSH public key line) for ``--auth-supernode-private-key``
    and ``flwr supernode register``."""
    key = ec.generate_private_key(AUTH_CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if comment:
        public += b" " + comment.encode()
    return private, public + b"\n"


def write_site_key(out_dir: Path, site: str) -> tuple[Path, Path]:
    """(Re)create one site's key pair under ``out_dir/sites/<site>/`` (also used to rotate).

    ``site`` is checked first (:func:`privacy.site_id.check_site_id`): a name such as
    ``../../x`` would otherwise write keys outside ``out_dir``."""
    folder = Path(out_dir) / "sites" / check_site_id(site)
    private, public = make_auth_key_pair(comment=f"fedgen-site-{site}")
    _write_private(folder / "auth.key", private)
    _write_public(folder / "auth.pub", public)
    return folder / "auth.key", folder / "auth.pub"


def write_federation_keys(out_dir: Path, *, sites: int | list[str], hosts: list[str] | tuple[str, ...] = DEFAULT_HOSTS,
                          overwrite: bool = False) -> FederationKeys:
    """Create the CA, the SuperLink certificate and one auth key pair per site."""
    out_dir = Path(out_dir)
    site_names = [str(i) for i in range(sites)] if isinstance(sites, int) else [str(s) for s in sites]
    if not site_names:
        raise ValueError("--sites must be at least 1")
    for site in site_names:  # before anything is written: a bad name leaves no half-made CA
        check_site_id(site)
    ca_crt = out_dir / "ca.crt"
    if ca_crt.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already holds a CA (ca.crt); choose another folder, or rotate one "
                              "site's key with `fedgen certs OUT_DIR --rotate-site SITE`")
    out_dir.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca()
    server_key, server_cert = make_server_cert(ca_key, ca_cert, list(dict.fromkeys([*hosts, *DEFAULT_HOSTS])))
    keys = FederationKeys(out_dir=out_dir, ca_cert=ca_crt, ca_key=out_dir / "ca.key",
                          server_cert=out_dir / "superlink.crt", server_key=out_dir / "superlink.key")
    _write_private(keys.ca_key, _pem_key(ca_key))
    _write_public(keys.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(keys.server_key, _pem_key(server_key))
    _write_public(keys.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    for site in site_names:
        keys.site_private_keys[site], keys.site_public_keys[site] = write_site_key(out_dir, site)
    return keys
