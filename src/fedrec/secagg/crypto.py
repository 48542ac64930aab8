"""The cryptographic pieces: key agreement, share encryption, Shamir sharing, masks, commitments.

Shamir sharing (over GF(2^128)) and the share bundle format are Flower's
(``flwr.common.secure_aggregation``). Three choices differ from Flower 1.42's SecAgg+ code:
X25519 keys (32-byte raw secrets, cheap to share) instead of PEM-encoded NIST-curve keys; shares
sealed with AES-GCM bound to round, sender and receiver; and masks from AES-256-CTR keyed with
the full 256-bit seed, where Flower folds the seed to 32 bits for NumPy's Mersenne Twister
(2^32 seeds can be searched, and the Twister is not a cryptographic generator).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from numpy.typing import NDArray

from fedrec.secagg.params import SecAggError

SEED_BYTES = 32
_NONCE_BYTES = 12


def new_secret() -> bytes:
    """A fresh secret: an X25519 private key or a self-mask seed (32 random bytes)."""
    return os.urandom(SEED_BYTES)


def public_key(secret: bytes) -> bytes:
    """The raw X25519 public key of ``secret``."""
    return X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw()


def agree(secret: bytes, peer_public: bytes, *, purpose: str, round_id: str) -> bytes:
    """A 32-byte key both ends derive (X25519 + HKDF-SHA256), separated by purpose and round."""
    try:
        shared = X25519PrivateKey.from_private_bytes(secret).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError as err:
        raise SecAggError(f"invalid public key: {err}") from None
    return _derive(shared, f"fedrec-secagg/{purpose}/{round_id}")


def usable_public_key(public: bytes) -> bool:
    """Whether an X25519 agreement with ``public`` works: a malformed or low-order key (whose
    agreement is all zeros, which ``cryptography`` refuses) fails with every peer's secret, so
    the server can drop its sender before any peer tries it."""
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return False
    return True


def _derive(material: bytes, info: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info.encode()).derive(
        material
    )


def commit(seed: bytes, round_id: str) -> bytes:
    """A hiding, binding commitment to a random seed (SHA-256, domain-separated)."""
    return hashlib.sha256(f"fedrec-secagg/commit/{round_id}/".encode() + seed).digest()


def split(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """``holders`` Shamir shares of ``secret``, any ``threshold`` of which rebuild it."""
    return create_shares(secret, threshold, holders)


def combine(shares: list[bytes]) -> bytes:
    """The secret behind ``shares`` (garbage, or an error, if one of them was altered)."""
    try:
        return combine_shares(shares)
    except ValueError as err:
        raise SecAggError(f"shares do not combine: {err}") from None


def seal(
    key: bytes, src: int, dst: int, round_id: str, seed_share: bytes, sk_share: bytes
) -> bytes:
    """Encrypt one holder's two shares so that only ``dst`` can read them, and detect tampering."""
    plaintext = share_keys_plaintext_concat(src, dst, seed_share, sk_share)
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(src, dst, round_id))


def open_sealed(key: bytes, src: int, dst: int, round_id: str, blob: bytes) -> tuple[bytes, bytes]:
    """The (seed share, key share) sealed by ``src`` for ``dst``; raises if anything differs."""
    try:
        plaintext = AESGCM(key).decrypt(
            blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], _aad(src, dst, round_id)
        )
    except (InvalidTag, ValueError):
        raise SecAggError(
            f"node {dst}: the shares from node {src} fail authentication (altered or misrouted)"
        ) from None
    got_src, got_dst, seed_share, sk_share = share_keys_plaintext_separate(plaintext)
    if (got_src, got_dst) != (src, dst):
        raise SecAggError(
            f"node {dst}: shares labelled {got_src}->{got_dst}, expected {src}->{dst}"
        )
    return seed_share, sk_share


def _aad(src: int, dst: int, round_id: str) -> bytes:
    return f"fedrec-secagg/shares/{round_id}/{src}/{dst}".encode()


def mask(seed: bytes, size: int, modulus: int, *, purpose: str) -> NDArray[np.unsignedinteger]:
    """A uniform vector in Z_modulus of length ``size``, expanded from ``seed`` by AES-256-CTR.

    Its dtype is uint32 when the modulus allows (see ``SecAggConfig.word``), else uint64.
    """
    key = _derive(seed, f"fedrec-secagg/mask/{purpose}")
    width = 4 if modulus <= 2**32 else 8
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(size * width))
    words = np.frombuffer(stream, dtype=f"<u{width}")
    return words & words.dtype.type(modulus - 1)
