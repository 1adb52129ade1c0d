//! JWT authentication. The algorithm is pinned by configuration and never read from the token.
//!
//! Dev mode (no key configured): a random HS256 secret is created under `server.data_dir` on first
//! start and reused, so `chat-gateway token` and the dev-only `POST /dev/token` can mint tokens.
//! With a key configured, neither exists.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::config::{AuthSettings, JwtAlgorithm, Settings};

/// Roles a token may carry. Unknown roles are treated as `USER`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum Role {
    /// May read and join any room.
    Admin,
    /// A backend service: may use the management API (rooms, members).
    Service,
    /// Everyone else (also any role the gateway does not know).
    #[default]
    #[serde(other)]
    User,
}

/// The claims the gateway reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
    #[serde(default)]
    pub role: Role,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// A string or an array of strings (checked by the verifier when `auth.audience` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
}

/// Who is on the other end of a socket or request, from a verified token.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user_id: String,
    pub name: Option<String>,
    pub avatar: Option<String>,
    pub role: Role,
    /// Token expiry (`exp`), seconds since the Unix epoch.
    pub expires_at: i64,
    /// When a socket holding this token is closed: `exp` plus the configured leeway, so a token
    /// accepted at the edge of its life is not closed the same instant.
    pub valid_until: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("token signed with a different algorithm than the server accepts")]
    WrongAlgorithm,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token is malformed or unsigned")]
    Malformed,
    #[error("token claims are invalid: {0}")]
    BadClaims(String),
    #[error("a refreshed token must be for the same user")]
    SubjectMismatch,
}

/// Verifies tokens with the configured key and algorithm.
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    leeway_secs: i64,
}

impl Authenticator {
    pub fn new(settings: &AuthSettings, dev_secret: Option<&SecretString>) -> anyhow::Result<Self> {
        let (key, alg) = match settings.algorithm {
            JwtAlgorithm::HS256 => {
                let secret = dev_secret.unwrap_or(&settings.jwt_secret);
                (
                    DecodingKey::from_secret(secret.expose_secret().as_bytes()),
                    Algorithm::HS256,
                )
            }
            JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => {
                let pem = std::fs::read(&settings.public_key_file).map_err(|e| {
                    anyhow::anyhow!(
                        "invalid configuration: auth.public_key_file: cannot read {}: {e}",
                        settings.public_key_file.display()
                    )
                })?;
                if settings.algorithm == JwtAlgorithm::RS256 {
                    (DecodingKey::from_rsa_pem(&pem)?, Algorithm::RS256)
                } else {
                    (DecodingKey::from_ec_pem(&pem)?, Algorithm::ES256)
                }
            }
        };
        let mut validation = Validation::new(alg);
        validation.leeway = settings.leeway_secs;
        // A configured issuer or audience is required, not only checked when present: a token
        // that leaves `iss` or `aud` out is refused like one that names another.
        let mut required = vec!["exp", "sub"];
        if !settings.issuer.is_empty() {
            validation.set_issuer(&[&settings.issuer]);
            required.push("iss");
        }
        if settings.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[&settings.audience]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        Ok(Self {
            key,
            validation,
            leeway_secs: settings.leeway_secs as i64,
        })
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    AuthError::WrongAlgorithm
                }
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidIssuer
                | ErrorKind::InvalidAudience
                | ErrorKind::MissingRequiredClaim(_)
                | ErrorKind::ImmatureSignature => AuthError::BadClaims(e.to_string()),
                _ => AuthError::Malformed,
            },
        )?;
        let c = data.claims;
        if c.sub.is_empty() || c.sub.len() > 256 {
            return Err(AuthError::BadClaims("sub must be 1..=256 bytes".into()));
        }
        Ok(Identity {
            user_id: c.sub,
            name: c.name,
            avatar: c.avatar,
            role: c.role,
            expires_at: c.exp,
            valid_until: c.exp.saturating_add(self.leeway_secs),
        })
    }
}

/// Mints tokens where the signing key is known: dev mode, or an HS256 secret in the settings.
pub struct TokenMinter {
    key: EncodingKey,
    alg: Algorithm,
}

impl TokenMinter {
    pub fn hs256(secret: &SecretString) -> Self {
        Self {
            key: EncodingKey::from_secret(secret.expose_secret().as_bytes()),
            alg: Algorithm::HS256,
        }
    }

    /// An RS256/ES256 minter from a PEM private key (for `chat-gateway token --private-key`).
    pub fn from_private_pem(alg: JwtAlgorithm, pem: &[u8]) -> anyhow::Result<Self> {
        Ok(match alg {
            JwtAlgorithm::HS256 => anyhow::bail!("HS256 signs with a secret, not a private key"),
            JwtAlgorithm::RS256 => Self {
                key: EncodingKey::from_rsa_pem(pem)?,
                alg: Algorithm::RS256,
            },
            JwtAlgorithm::ES256 => Self {
                key: EncodingKey::from_ec_pem(pem)?,
                alg: Algorithm::ES256,
            },
        })
    }

    pub fn mint(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(self.alg), claims, &self.key)
            .expect("encoding claims with a valid key cannot fail")
    }
}

/// Claims for a token valid `ttl_secs` from now.
pub fn claims_for(user_id: &str, name: Option<&str>, role: Role, ttl_secs: i64) -> Claims {
    Claims {
        sub: user_id.to_string(),
        name: name.map(str::to_string),
        avatar: None,
        role,
        exp: chrono::Utc::now().timestamp() + ttl_secs,
        iss: None,
        aud: None,
    }
}

const DEV_SECRET_FILE: &str = "dev-jwt-secret";

/// Loads the dev-mode secret from the data directory, creating it on first use (mode 0600).
pub fn load_or_create_dev_secret(data_dir: &Path) -> anyhow::Result<SecretString> {
    let path = data_dir.join(DEV_SECRET_FILE);
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let existing = existing.trim();
        if existing.len() >= 32 {
            return Ok(SecretString::from(existing.to_string()));
        }
    }
    std::fs::create_dir_all(data_dir)?;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&path, &secret)?;
    Ok(SecretString::from(secret))
}

/// Reads the dev secret without creating one (for the `token` subcommand).
pub fn read_dev_secret(settings: &Settings) -> Option<SecretString> {
    let s = std::fs::read_to_string(settings.server.data_dir.join(DEV_SECRET_FILE)).ok()?;
    Some(SecretString::from(s.trim().to_string()))
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, contents)
}
