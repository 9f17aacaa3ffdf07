//! Connection tokens: HMAC-SHA256 signed JWTs carrying the user, the tenant and an expiry.
//! Nodes verify them; the harness (and tests) mint them with the shared secret.

use serde::{Deserialize, Serialize};

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    pub tenant: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token expired")]
    Expired,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token has an empty user or tenant")]
    EmptyIdentity,
}

/// Signs `claims` with `secret` (HS256).
pub fn sign(secret: &[u8], claims: &Claims) -> Result<String, TokenError> {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .map_err(|e| TokenError::Malformed(e.to_string()))
}

/// Checks signature and expiry (no leeway) and returns the claims.
pub fn verify(secret: &[u8], token: &str) -> Result<Claims, TokenError> {
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp", "sub"]);
    let data = jsonwebtoken::decode::<Claims>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(secret),
        &validation,
    )
    .map_err(|e| match e.kind() {
        jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
        jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenError::BadSignature,
        _ => TokenError::Malformed(e.to_string()),
    })?;
    if data.claims.sub.is_empty() || data.claims.tenant.is_empty() {
        return Err(TokenError::EmptyIdentity);
    }
    if crate::frames::has_nul(&data.claims.sub) || crate::frames::has_nul(&data.claims.tenant) {
        return Err(TokenError::Malformed(
            "user or tenant holds a NUL character".into(),
        ));
    }
    Ok(data.claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn tokens_verify_and_fail_clearly() {
        let claims = Claims {
            sub: "alice".into(),
            tenant: "acme".into(),
            exp: now() + 60,
        };
        let t = sign(b"secret", &claims).unwrap();
        assert_eq!(verify(b"secret", &t).unwrap(), claims);
        assert_eq!(verify(b"other", &t).unwrap_err(), TokenError::BadSignature);
        let old = sign(
            b"secret",
            &Claims {
                exp: now() - 5,
                ..claims.clone()
            },
        )
        .unwrap();
        assert_eq!(verify(b"secret", &old).unwrap_err(), TokenError::Expired);
        assert!(matches!(
            verify(b"secret", "not.a.token"),
            Err(TokenError::Malformed(_))
        ));
        let anon = sign(
            b"secret",
            &Claims {
                sub: String::new(),
                ..claims
            },
        )
        .unwrap();
        assert_eq!(
            verify(b"secret", &anon).unwrap_err(),
            TokenError::EmptyIdentity
        );
    }
}
