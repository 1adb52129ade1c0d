//! The chat service's error type, and its two mappings: to an HTTP status (REST door) and to a
//! protocol error code (socket door). Both are exhaustive matches, so a new variant cannot be
//! forgotten by either door. Internals are logged; clients get a stable code and a human message.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::auth::AuthError;
use crate::protocol::code;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{0}")]
    BadRequest(String),
    #[error("authentication required")]
    NotAuthenticated,
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("not a member of this room")]
    Forbidden,
    #[error("this operation needs the {0} role")]
    RoleRequired(&'static str),
    #[error("room not found")]
    RoomNotFound,
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("request body is larger than {max} bytes")]
    BodyTooLarge { max: usize },
    #[error("content is empty")]
    ContentEmpty,
    #[error("content is longer than {max} characters")]
    ContentTooLong { max: usize },
    #[error("rate limited; retry in {} ms", retry_after.as_millis())]
    RateLimited { retry_after: Duration },
    #[error("a socket may join at most {max} rooms")]
    TooManyRooms { max: usize },
    #[error("join the room on this socket first")]
    NotJoined,
    /// The store (or another backing service) cannot be reached. Retriable; nothing was stored.
    #[error("temporarily unavailable, retry")]
    Unavailable,
    #[error("internal error")]
    Internal,
}

impl ChatError {
    /// The protocol error code (also used as REST `error.code`).
    pub fn code(&self) -> &'static str {
        match self {
            ChatError::BadRequest(_) => code::BAD_REQUEST,
            ChatError::NotAuthenticated => code::NOT_AUTHENTICATED,
            ChatError::Auth(AuthError::Expired) => code::TOKEN_EXPIRED,
            ChatError::Auth(_) => code::INVALID_TOKEN,
            ChatError::Forbidden | ChatError::RoleRequired(_) => code::FORBIDDEN,
            ChatError::RoomNotFound => code::ROOM_NOT_FOUND,
            ChatError::NotFound(_) => code::NOT_FOUND,
            ChatError::Conflict(_) => code::CONFLICT,
            ChatError::BodyTooLarge { .. } => code::TOO_LARGE,
            ChatError::ContentEmpty => code::CONTENT_EMPTY,
            ChatError::ContentTooLong { .. } => code::CONTENT_TOO_LONG,
            ChatError::RateLimited { .. } => code::RATE_LIMITED,
            ChatError::TooManyRooms { .. } => code::TOO_MANY_ROOMS,
            ChatError::NotJoined => code::NOT_JOINED,
            ChatError::Unavailable => code::UNAVAILABLE,
            ChatError::Internal => code::INTERNAL,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ChatError::BadRequest(_) | ChatError::ContentEmpty => StatusCode::BAD_REQUEST,
            ChatError::NotAuthenticated | ChatError::Auth(_) => StatusCode::UNAUTHORIZED,
            ChatError::Forbidden | ChatError::RoleRequired(_) => StatusCode::FORBIDDEN,
            ChatError::RoomNotFound | ChatError::NotFound(_) => StatusCode::NOT_FOUND,
            ChatError::Conflict(_) | ChatError::TooManyRooms { .. } | ChatError::NotJoined => {
                StatusCode::CONFLICT
            }
            ChatError::ContentTooLong { .. } | ChatError::BodyTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ChatError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ChatError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ChatError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Milliseconds to wait before retrying, for errors where waiting helps.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ChatError::RateLimited { retry_after } => Some(*retry_after),
            ChatError::Unavailable => Some(Duration::from_secs(1)),
            _ => None,
        }
    }
}

impl From<StoreError> for ChatError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(e) => {
                tracing::warn!(error = %e, "store unavailable");
                ChatError::Unavailable
            }
            StoreError::RoomNotFound => ChatError::RoomNotFound,
            StoreError::Conflict(what) => ChatError::Conflict(what),
            StoreError::Invalid(what) => ChatError::BadRequest(what),
            StoreError::Other(e) => {
                tracing::error!(error = %e, "store error");
                ChatError::Internal
            }
        }
    }
}

impl IntoResponse for ChatError {
    fn into_response(self) -> Response {
        let retry_ms = self.retry_after().map(|d| d.as_millis() as u64);
        let mut error = serde_json::json!({ "code": self.code(), "message": self.to_string() });
        if let Some(ms) = retry_ms {
            error["retryAfterMs"] = ms.into();
        }
        let body = serde_json::json!({ "error": error });
        let mut response = (self.status(), Json(body)).into_response();
        if let Some(ms) = retry_ms {
            // Retry-After is whole seconds; round up so a client never retries too early.
            let secs = ms.div_ceil(1000).max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
