"""JWT bearer tokens (PyJWT), the alternative to API keys for teams with an identity
provider: its tokens' ``sub`` is the user.

A token is accepted only if it is signed with an allowed asymmetric algorithm by the
configured key (a PEM public key, or a JWKS URL whose keys are fetched and cached), and
its ``iss``, ``aud``, ``exp`` and ``sub`` are present and right. ``none`` and the HMAC
algorithms are refused by construction: a gateway that verifies with a *public* key must
never be talked into treating it as a shared secret (the algorithm-confusion attack).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import jwt

from ..access import Principal
from ..exceptions import AuthenticationFailed, ConfigError, InvalidUserId
from ..validation import validate_user_id

__all__ = ["ALLOWED_ALGORITHMS", "JwtSettings", "authenticate_jwt"]

#: Asymmetric algorithms only: the gateway holds a public key, never a shared secret.
ALLOWED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


@dataclass(frozen=True)
class JwtSettings:
    """How to check tokens: who issues them, for which audience, signed how and with
    which key (``public_key`` PEM, or ``jwks_url``). ``admin_claim``: a boolean claim
    that makes the caller an admin (none: no token is an admin)."""

    issuer: str
    audience: str
    public_key: str | None = None
    jwks_url: str | None = None
    algorithms: tuple[str, ...] = ("RS256",)
    admin_claim: str | None = None
    leeway_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.issuer or not self.audience:
            raise ConfigError("JWT: an issuer and an audience are required")
        if (self.public_key is None) == (self.jwks_url is None):
            raise ConfigError("JWT: give exactly one of a public key (PEM) or a JWKS URL")
        if self.jwks_url is not None and not self.jwks_url.startswith(("https://", "http://")):
            raise ConfigError(f"JWT: the JWKS URL must be http(s)://, got {self.jwks_url!r}")
        if not self.algorithms or not set(self.algorithms) <= ALLOWED_ALGORITHMS:
            raise ConfigError(
                f"JWT: algorithms must be among {', '.join(sorted(ALLOWED_ALGORITHMS))} "
                f"(asymmetric only), got {list(self.algorithms)}"
            )
        if self.public_key is not None:
            try:
                jwt.algorithms.get_default_algorithms()[self.algorithms[0]].prepare_key(
                    self.public_key
                )
            except (ValueError, TypeError, jwt.InvalidKeyError) as exc:
                raise ConfigError(f"JWT: the public key is not a usable PEM key: {exc}") from exc
        if not 0 <= self.leeway_s <= 300:
            raise ConfigError(f"JWT: leeway_s must be 0..300, got {self.leeway_s!r}")


_JWKS: dict[str, jwt.PyJWKClient] = {}


async def authenticate_jwt(settings: JwtSettings, token: str) -> Principal:
    """The principal a token stands for; :class:`AuthenticationFailed` naming what is
    wrong with it (never quoting it). A failed check is not chained (``from None``):
    each message says which check failed, and the cause may quote the token's parts."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise AuthenticationFailed("malformed bearer token") from None
    if header.get("alg") not in settings.algorithms:
        raise AuthenticationFailed(f"token algorithm {str(header.get('alg'))[:20]!r} not allowed")
    key: Any = settings.public_key
    if settings.jwks_url is not None:
        client = _JWKS.setdefault(settings.jwks_url, jwt.PyJWKClient(settings.jwks_url))
        try:  # fetched (and cached) over HTTP: off the event loop
            key = (await asyncio.to_thread(client.get_signing_key_from_jwt, token)).key
        except jwt.PyJWKClientError as exc:
            raise AuthenticationFailed(f"no signing key for this token: {exc}") from exc
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=list(settings.algorithms),
            audience=settings.audience,
            issuer=settings.issuer,
            leeway=settings.leeway_s,
            options={"require": ["exp", "iss", "aud", "sub"]},
        )
    except jwt.ExpiredSignatureError:
        raise AuthenticationFailed("token expired") from None
    except jwt.InvalidAudienceError:
        raise AuthenticationFailed("token is for another audience") from None
    except jwt.InvalidIssuerError:
        raise AuthenticationFailed("token from another issuer") from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthenticationFailed(f"token lacks the {exc.claim!r} claim") from None
    except jwt.InvalidSignatureError:
        raise AuthenticationFailed("token signature does not verify") from None
    except jwt.InvalidTokenError as exc:
        raise AuthenticationFailed(f"invalid token: {type(exc).__name__}") from None
    try:
        user = validate_user_id(claims["sub"])
    except InvalidUserId as exc:
        raise AuthenticationFailed(f"token sub is not a usable user id: {exc}") from None
    admin = bool(settings.admin_claim and claims.get(settings.admin_claim) is True)
    return Principal(user, admin, "jwt", None)
