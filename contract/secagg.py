"""Secure aggregation's wire agreement between the sites and the server (SecAgg+, Bell et
al. 2020, on Bonawitz et al. 2017): the stage names and record keys, the integer encoding
of an update (clip, scale, stochastic rounding to integers modulo ``2^bits``) and the mask
expansion. Both ``client/secagg.py`` and ``server/secagg.py`` use these, so they agree by
construction.

Every cryptographic primitive comes from a library: elliptic-curve key agreement
(ECDH on SECP384R1) and the key derivation (HKDF-SHA256) from ``cryptography`` through
Flower's ``generate_shared_key``; authenticated encryption of the shares (Fernet) and
Shamir secret sharing (pycryptodome, GF(2^128)) from ``flwr.common.secure_aggregation``;
the mask generator is the ChaCha20 stream cipher of ``cryptography`` keyed by HKDF of the
seed. Nothing here invents a primitive.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key

#: the ConfigRecord of a secure-aggregation message (both ways) and its ``stage`` key
RECORD = "secagg"
#: the ArrayRecord of a masked input (the site's update never leaves it in the clear)
MASKED = "secagg-masked"
MASKED_KEY = "y"
#: distributed DP (``noise: distributed``): the release's public parameters travel to the
#: site in the collect stage's record and on to its training in the train config under
#: this key (privacy/skellam.py's ``DistributedRelease`` as JSON); the site's noised
#: integer release comes back from its training in the reply's arrays under the same key
DISTRIBUTED = "secagg-distributed"
#: the train config key by which the mod tells the site's training that its spend is
#: pending: the masked input leaves, and the round may still abort (privacy/ledger.py)
PENDING = "secagg-pending"
#: where a site keeps its round secrets between the stages (``Context.state``)
STATE = "secagg-state"

SETUP, SHARE_KEYS, COLLECT, UNMASK = "setup", "share-keys", "collect-masked-input", "unmask"
#: the server aborts the round before any unmask: the site erases its round secrets (it can
#: then never reveal them) and records its pending spend as aborted
ABORT = "abort"
STAGES = (SETUP, SHARE_KEYS, COLLECT, UNMASK, ABORT)

MAX_BITS = 62  # sums of two values below 2^62 fit an unsigned 64-bit integer
MIN_LEVELS = 2 ** 8  # fewer quantisation levels per site than this is refused


class SecAggError(Exception):
    """A secure-aggregation step that cannot go on (one line, says why)."""


THREAT_MODEL = ("honest-but-curious server: it follows the protocol; it and any up to threshold - 1 colluding "
                "sites learn nothing about an honest site's update beyond the sum of the updates aggregated "
                "(at least threshold sites); up to n - threshold of the n sampled sites may drop out after "
                "sharing their keys and the round still completes. Not covered: a malicious server that lies "
                "about who dropped out, sites that send bad updates (they can no longer be checked one by one), "
                "and the metrics and privacy ledger a site returns, which stay in the clear. DP noise: with "
                "noise: local each site adds its full DP noise; with noise: distributed each adds a Skellam share "
                "of mu / threshold, so the released sum carries at least the central variance mu whenever it is "
                "released (at least threshold sites); the (epsilon, delta) guarantee holds against the server "
                "and any sites that do not subtract their own shares -- c colluding sites that do leave "
                "mu (s - c) / threshold of the s survivors' noise. An aborted round's spend is withdrawn only "
                "at a site that trusts the server's word (node-config trust-secagg-abort; deployed default: "
                "it stays charged)")


# -- keys -------------------------------------------------------------------------------

def generate_key_pair() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh EC key pair (SECP384R1, as Flower's SecAgg+); the public key as bytes."""
    sk = ec.generate_private_key(ec.SECP384R1())
    return sk, public_bytes(sk)


def public_bytes(sk: ec.EllipticCurvePrivateKey) -> bytes:
    return sk.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)


def load_public(data: bytes) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), bytes(data))


def private_bytes(sk: ec.EllipticCurvePrivateKey) -> bytes:
    return sk.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())


def load_private(data: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_der_private_key(bytes(data), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SecAggError("a reconstructed secret key is not an EC key")
    return key


def shared_key(sk: ec.EllipticCurvePrivateKey, pk: bytes) -> bytes:
    """The key two parties agree on (ECDH + HKDF, Flower's ``generate_shared_key``)."""
    return generate_shared_key(sk, load_public(pk))


def new_seed() -> bytes:
    """A site's self-mask seed ``b``: 32 bytes of OS entropy."""
    return secrets.token_bytes(32)


# -- masks ------------------------------------------------------------------------------

def expand_mask(seed: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` integers uniform in [0, 2^bits) from ``seed``: the ChaCha20 keystream under
    the key HKDF(seed), read as little-endian 64-bit words and reduced mod 2^bits (a power
    of two, so the reduction keeps them uniform)."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedgen secagg mask").derive(bytes(seed))
    encryptor = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    words = np.frombuffer(encryptor.update(b"\x00" * (8 * length)), dtype="<u8").astype(np.uint64)
    return words & np.uint64(modulus_mask(bits))


def modulus_mask(bits: int) -> int:
    return (1 << bits) - 1


def pair_sign(i: int, j: int) -> int:
    """The sign with which site ``i`` adds its pairwise mask with ``j`` (+ for the lower
    index, - for the higher): the two cancel in the sum."""
    return 1 if i < j else -1


def add_mod(total: np.ndarray, term: np.ndarray, sign: int, bits: int) -> np.ndarray:
    """``total + sign * term`` modulo 2^bits (unsigned 64-bit arithmetic wraps mod 2^64,
    a multiple of 2^bits)."""
    with np.errstate(over="ignore"):
        out = total + term if sign > 0 else total - term
    return out & np.uint64(modulus_mask(bits))


# -- the integer encoding of an update --------------------------------------------------

MAX_LEVELS = 2 ** 52  # the encoding is computed in float64, exact for integers up to 2^53


def levels(bits: int, num_sites: int) -> int:
    """Quantisation levels per site, so that the sum of ``num_sites`` encoded updates stays
    below 2^bits: the modular sum is the true integer sum, no wrap-around. At most 2^52,
    so that every encoded value is an exact float64 (the rounding cannot overshoot)."""
    return min(modulus_mask(bits) // num_sites, MAX_LEVELS)


def clip_l2(vec: np.ndarray, clip_norm: float) -> tuple[np.ndarray, bool]:
    norm = float(np.linalg.norm(vec))
    if norm <= clip_norm:
        return vec, False
    return vec * (clip_norm / norm), True


def quantize(vec: np.ndarray, clip: float, num_levels: int, rng: np.random.Generator) -> np.ndarray:
    """Coordinates in [-clip, clip] to integers in [0, num_levels], by stochastic rounding
    (unbiased: the expected integer is the exact scaled value). Not Flower's
    ``secure_aggregation.quantization.quantize``: that rounds into int32 (levels here go
    up to 2^52) with numpy's global RNG, where this takes the site's OS-entropy ``rng``."""
    scaled = (np.clip(vec, -clip, clip) + clip) * (num_levels / (2.0 * clip))
    low = np.floor(scaled)
    up = rng.random(scaled.shape) < (scaled - low)
    return np.minimum(low + up, num_levels).astype(np.uint64)


def dequantize_sum(total: np.ndarray, count: int, clip: float, num_levels: int) -> np.ndarray:
    """The sum of ``count`` real vectors from the sum of their encodings."""
    return total.astype(np.float64) * (2.0 * clip / num_levels) - count * clip


def encode_signed(vec: np.ndarray, bits: int) -> np.ndarray:
    """Signed integers (int64) as residues modulo 2^bits (two's complement, truncated)."""
    return np.asarray(vec, dtype=np.int64).astype(np.uint64) & np.uint64(modulus_mask(bits))


def decode_signed(total: np.ndarray, bits: int) -> np.ndarray:
    """Residues modulo 2^bits back to the signed integers in [-2^(bits-1), 2^(bits-1)) they
    stand for: the integer sum, as long as it never left that range (privacy/skellam.py
    chooses the scale so that it does not, but with negligible probability)."""
    total = np.asarray(total, dtype=np.uint64) & np.uint64(modulus_mask(bits))
    signed = total.astype(np.int64)
    return np.where(total >= np.uint64(1 << (bits - 1)), signed - np.int64(1 << (bits - 1)) * 2, signed) \
        if bits < 64 else signed


# -- which tensors travel ---------------------------------------------------------------

def float_keys(arrays: dict[str, np.ndarray]) -> list[str]:
    """The tensors an update is made of, in order: the floating-point ones (integer buffers
    stay the server's)."""
    return [k for k, v in arrays.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


def flatten(arrays: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    if not keys:
        return np.zeros(0)
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in keys])


def unflatten(vec: np.ndarray, like: dict[str, np.ndarray], keys: list[str]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    at = 0
    for k in keys:
        ref = np.asarray(like[k])
        out[k] = vec[at:at + ref.size].reshape(ref.shape).astype(ref.dtype)
        at += ref.size
    return out


# -- the neighbourhoods -----------------------------------------------------------------

def neighbours(index: int, count: int, num_neighbours: int | None) -> list[int]:
    """The indices (0..count-1, the round's order) whose keys site ``index`` shares with,
    itself included: everybody (``None``, SecAgg) or the ``num_neighbours`` nearest on a
    ring, half on each side (SecAgg+'s k-regular graph over a random order)."""
    if num_neighbours is None or num_neighbours + 1 >= count:
        return list(range(count))
    half = num_neighbours // 2
    return sorted({(index + d) % count for d in range(-half, num_neighbours - half + 1)})


@dataclass(frozen=True)
class SecAggParams:
    """What the server tells every site at setup."""

    threshold: int
    bits: int
    clip_norm: float
    num_sites: int  # sampled this round: the bound on the sum
    num_neighbours: int | None = None

    @property
    def levels(self) -> int:
        return levels(self.bits, self.num_sites)

    def to_config(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "bits": self.bits, "clip-norm": float(self.clip_norm),
                "num-sites": self.num_sites, "num-neighbours": -1 if self.num_neighbours is None
                else self.num_neighbours}

    @classmethod
    def from_config(cls, cfg: Any) -> "SecAggParams":
        k = int(cfg["num-neighbours"])
        params = cls(threshold=int(cfg["threshold"]), bits=int(cfg["bits"]), clip_norm=float(cfg["clip-norm"]),
                     num_sites=int(cfg["num-sites"]), num_neighbours=None if k < 0 else k)
        params.check()
        return params

    def check(self) -> None:
        if not 2 <= self.threshold:
            raise SecAggError(f"threshold {self.threshold} must be at least 2")
        if not 1 <= self.bits <= MAX_BITS:
            raise SecAggError(f"bits {self.bits} must be in [1, {MAX_BITS}]")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise SecAggError(f"clip norm {self.clip_norm} must be a positive number")
        if self.levels < MIN_LEVELS:
            raise SecAggError(f"{self.bits} bits leave {self.levels} levels per site for {self.num_sites} sites; "
                              f"need at least {MIN_LEVELS}: raise bits")
