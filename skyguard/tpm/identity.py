"""`skyguard tpm init`: the TPM's identity, as Keylime's registrar establishes it.

- The endorsement key (EK): the one persisted at 0x81010001 when the TPM was provisioned with one
  (swtpm_setup does; so do most platforms), otherwise made from the standard RSA template
  (`tpm2_createek`, the same key every time on one TPM).
- The EK certificate, read from its NV index (0x01c00002) where the manufacturer stored one.
- An attestation key (AK): ECC P-256 ECDSA/SHA-256, restricted signing, made under the EK
  (`tpm2_createak`) and persisted at 0x81010002. Reused when it is already there.
- The AK's attributes: a restricted signing key made in this TPM (fixedTPM, fixedParent,
  sensitiveDataOrigin, restricted, sign, not decrypt). The credential below binds any key resident
  in the TPM; only a restricted one refuses to sign bytes that look like a TPM's own TPMS_ATTEST,
  so a key found at the handle without these (left there by an image, a previous owner, root)
  could sign a forged quote, with any nonce and PCR values, and init refuses it.
- The binding of AK to EK by make/activate credential: a secret encrypted to the EK public key for
  the AK's name (`tpm2_makecredential`, done in software as a registrar would) is recovered only by
  the TPM that holds both (`tpm2_activatecredential`). A mismatch stops init.

The AK public key, its name and the EK public key are saved in <state dir>/tpm/tpm.json (nothing
secret: the private parts never leave the TPM).
Not here: quotes (quote.py).
"""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path

from skyguard.tpm.device import AK_HANDLE, EK_CERT_NV, EK_HANDLES, Tpm, TpmConfig, TpmError, check_pcr


def _pem_of_der_cert(der: bytes) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    # Some NV certificates are padded after the DER: load_der refuses trailing bytes, so cut at the
    # outer SEQUENCE's length.
    if len(der) > 4 and der[0] == 0x30 and der[1] == 0x82:
        der = der[: 4 + int.from_bytes(der[2:4], "big")]
    return x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM).decode()


def ek_certificate(tpm: Tpm) -> str | None:
    """The EK certificate (PEM) from its NV index, or None when the TPM has none."""
    try:
        listing = tpm.run("tpm2_nvreadpublic", flush=False)
    except TpmError:
        return None
    if f"{EK_CERT_NV:#x}:" not in listing.lower():
        return None
    out = tpm.file("ekcert.der")
    tpm.run("tpm2_nvread", "-C", "o", "-o", str(out), f"{EK_CERT_NV:#x}")
    try:
        return _pem_of_der_cert(out.read_bytes())
    except ValueError as e:
        raise TpmError(f"the EK certificate in NV {EK_CERT_NV:#x} is not a DER certificate: {e}") from None


def _ek_context(tpm: Tpm) -> str:
    """A handle or context file for the EK."""
    for handle in EK_HANDLES:
        if tpm.handle_exists(handle):
            return f"{handle:#x}"
    ctx = tpm.file("ek.ctx")
    tpm.run("tpm2_createek", "-c", str(ctx), "-G", "rsa", "-u", str(tpm.file("ek.pub")))
    return str(ctx)


def _ek_public(tpm: Tpm, ek: str) -> str:
    pem = tpm.file("ek.pem")
    tpm.run("tpm2_readpublic", "-c", ek, "-f", "pem", "-o", str(pem))
    return pem.read_text()


# TPMA_OBJECT bits (TPM 2.0 Part 2, 8.3)
FIXED_TPM, FIXED_PARENT, SENSITIVE_DATA_ORIGIN = 0x2, 0x10, 0x20
RESTRICTED, DECRYPT, SIGN = 0x10000, 0x20000, 0x40000
AK_REQUIRED = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | SIGN


def object_attributes(tpm: Tpm, handle: int) -> int:
    """The TPMA_OBJECT of a persistent object, from `tpm2_readpublic` (its `attributes: raw:`)."""
    lines = tpm.run("tpm2_readpublic", "-c", f"{handle:#x}").splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "attributes:":
            for sub in lines[i + 1:i + 3]:
                key, _, value = sub.strip().partition(":")
                if key == "raw":
                    try:
                        return int(value.strip(), 16)
                    except ValueError:
                        break
    raise TpmError(f"tpm2_readpublic printed no object attributes for {handle:#x}")


def check_ak_attributes(attributes: int, handle: int) -> None:
    missing = AK_REQUIRED & ~attributes
    if missing or attributes & DECRYPT:
        raise TpmError(f"the key at {handle:#x} is not a restricted signing key made in this TPM (attributes "
                       f"{attributes:#x}, needs fixedtpm|fixedparent|sensitivedataorigin|restricted|sign and no "
                       f"decrypt): it could sign a forged quote. Remove it with `tpm2_evictcontrol -C o -c "
                       f"{handle:#x}` and run init again")


def activate(tpm: Tpm, ek: str, ak_handle: int, ak_name_hex: str) -> bool:
    """Make a credential for the AK's name with the EK public key, have the TPM activate it."""
    secret = secrets.token_bytes(32)
    ek_tss, secret_file, blob, recovered = (tpm.file(n) for n in ("ek.tss", "cred.secret", "cred.blob", "cred.out"))
    tpm.run("tpm2_readpublic", "-c", ek, "-o", str(ek_tss))
    secret_file.write_bytes(secret)
    # -T none: made in software from the EK public key, as a remote registrar does.
    tpm.run("tpm2_makecredential", "-T", "none", "-u", str(ek_tss), "-s", str(secret_file),
            "-n", ak_name_hex, "-o", str(blob), flush=False)
    secret_file.unlink()
    session = tpm.file("endorse.session")
    tpm.run("tpm2_startauthsession", "--policy-session", "-S", str(session))
    try:
        tpm.run("tpm2_policysecret", "-S", str(session), "-c", "e")  # the EK's policy: endorsement auth
        tpm.run("tpm2_activatecredential", "-c", f"{ak_handle:#x}", "-C", ek, "-i", str(blob),
                "-o", str(recovered), "-P", f"session:{session}")
    finally:
        tpm.run("tpm2_flushcontext", str(session), flush=False)
    try:
        return hmac.compare_digest(recovered.read_bytes(), secret)
    finally:
        recovered.unlink(missing_ok=True)


def init(tpm: Tpm, state_dir: Path, pcr: int | None = None, ak_handle: int = AK_HANDLE) -> dict:
    """Create or reuse the EK and AK, bind them, save the config. Returns what `tpm init` prints."""
    saved = TpmConfig.load(state_dir)
    pcr = check_pcr(pcr if pcr is not None else saved.pcr)
    with tpm.locked():
        ek = _ek_context(tpm)
        ek_pem = _ek_public(tpm, ek)
        reused = tpm.handle_exists(ak_handle)
        if not reused:
            ak_ctx = tpm.file("ak.ctx")
            tpm.run("tpm2_createak", "-C", ek, "-c", str(ak_ctx), "-G", "ecc", "-g", "sha256", "-s", "ecdsa",
                    "-u", str(tpm.file("ak.pub")), "-r", str(tpm.file("ak.priv")), "-n", str(tpm.file("ak.name")))
            tpm.run("tpm2_evictcontrol", "-C", "o", "-c", str(ak_ctx), f"{ak_handle:#x}")
        check_ak_attributes(object_attributes(tpm, ak_handle), ak_handle)
        ak_pem, ak_name = tpm.read_public_pem(ak_handle)
        if not activate(tpm, ek, ak_handle, ak_name):
            raise TpmError(f"the key at {ak_handle:#x} is not bound to this TPM's EK (activate credential "
                           f"returned another secret); remove it with `tpm2_evictcontrol -C o -c {ak_handle:#x}` "
                           f"and run init again")
        cert = ek_certificate(tpm)
    config = TpmConfig(tcti=tpm.tcti, pcr=pcr, ak_handle=ak_handle, ak_public=ak_pem, ak_name=ak_name,
                       ek_public=ek_pem)
    config.save(state_dir)
    return {"tcti": tpm.tcti, "pcr": pcr, "ak_handle": f"{ak_handle:#x}", "ak_reused": reused,
            "ak_public": ak_pem, "ak_name": ak_name, "ek_public": ek_pem, "ek_certificate": cert,
            "bound": "make/activate credential: the AK is resident in the TPM that holds this EK"}


def check_ek_certificate(cert_pem: str, ek_public_pem: str, issuer_pem: str | None = None) -> list[str]:
    """Problems with an EK certificate: its key is not the EK, or (given the issuer's certificate)
    its signature does not verify under the issuer. Empty when all is well."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

    problems = []
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    ek = load_pem_public_key(ek_public_pem.encode()).public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if spki != ek:
        problems.append("the EK certificate certifies another key than this TPM's EK")
    if issuer_pem:
        issuer = x509.load_pem_x509_certificate(issuer_pem.encode())
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError) as e:
            problems.append(f"the EK certificate is not issued by {issuer.subject.rfc4514_string()}: {e}")
        except Exception as e:  # cryptography's InvalidSignature has no message
            problems.append(f"the EK certificate's signature does not verify under "
                            f"{issuer.subject.rfc4514_string()} ({type(e).__name__})")
    return problems
