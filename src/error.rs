//! The chat service's error type, and its two mappings: to an HTTP status (REST door) and to a
//! protocol error code (socket door). Both are exhaustive matches, so a new variant cannot be
//! forgotten by either door. Internals are logged; clients get a stable code and a human message.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::auth::AuthError;
use crate::protocol::code;
use crate::store::{Refusal, StoreError};

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
    #[error("rate limited; retry in {} ms", retry_ms(*retry_after))]
    RateLimited { retry_after: Duration },
    #[error("a socket may join at most {max} rooms")]
    TooManyRooms { max: usize },
    #[error("join the room on this socket first")]
    NotJoined,
    /// A change (or reply) the message does not allow: `message_not_found`, `message_deleted`,
    /// `edit_window_closed`, `forbidden` (not the sender's), `too_many_reactions`.
    #[error("{0}")]
    Message(Refusal),
    #[error("a reaction is one emoji")]
    UnknownReaction,
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
            ChatError::Message(Refusal::NotFound) => code::MESSAGE_NOT_FOUND,
            ChatError::Message(Refusal::Deleted) => code::MESSAGE_DELETED,
            ChatError::Message(Refusal::WindowClosed) => code::EDIT_WINDOW_CLOSED,
            ChatError::Message(Refusal::NotYours) => code::FORBIDDEN,
            ChatError::Message(Refusal::TooManyReactions) => code::TOO_MANY_REACTIONS,
            ChatError::UnknownReaction => code::UNKNOWN_REACTION,
            ChatError::Unavailable => code::UNAVAILABLE,
            ChatError::Internal => code::INTERNAL,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ChatError::BadRequest(_) | ChatError::ContentEmpty | ChatError::UnknownReaction => {
                StatusCode::BAD_REQUEST
            }
            ChatError::Message(Refusal::NotFound) => StatusCode::NOT_FOUND,
            ChatError::Message(Refusal::WindowClosed | Refusal::NotYours) => StatusCode::FORBIDDEN,
            ChatError::Message(Refusal::Deleted | Refusal::TooManyReactions) => {
                StatusCode::CONFLICT
            }
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

    /// How long to wait before retrying, for errors where waiting helps.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ChatError::RateLimited { retry_after } => Some(*retry_after),
            ChatError::Unavailable => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// [`ChatError::retry_after`] as the `retryAfterMs` both doors send.
    pub fn retry_after_ms(&self) -> Option<u64> {
        self.retry_after().map(retry_ms)
    }
}

/// Whole milliseconds, rounded up and at least 1: a limiter's wait is often a fraction of a
/// millisecond, and a client told to retry in 0 ms retries at once and is refused again.
fn retry_ms(wait: Duration) -> u64 {
    (wait.as_micros().div_ceil(1000) as u64).max(1)
}

impl From<StoreError> for ChatError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(e) => {
                tracing::warn!(error = %e, "store unavailable");
                ChatError::Unavailable
            }
            // Logged once, when the database was found unreachable.
            StoreError::Down => ChatError::Unavailable,
            StoreError::RoomNotFound => ChatError::RoomNotFound,
            StoreError::Conflict(what) => ChatError::Conflict(what),
            StoreError::Invalid(what) => ChatError::BadRequest(what),
            StoreError::Refused(refusal) => ChatError::Message(refusal),
            StoreError::Other(e) => {
                tracing::error!(error = %e, "store error");
                ChatError::Internal
            }
        }
    }
}

impl IntoResponse for ChatError {
    fn into_response(self) -> Response {
        let retry_ms = self.retry_after_ms();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_hint_is_never_zero_and_never_early() {
        let hint = |us| {
            ChatError::RateLimited {
                retry_after: Duration::from_micros(us),
            }
            .retry_after_ms()
        };
        assert_eq!(hint(0), Some(1));
        assert_eq!(hint(1), Some(1));
        assert_eq!(hint(999), Some(1));
        assert_eq!(hint(1000), Some(1));
        assert_eq!(hint(1001), Some(2));
        assert_eq!(hint(333_334), Some(334));
        let limited = ChatError::RateLimited {
            retry_after: Duration::from_micros(10),
        };
        assert_eq!(limited.to_string(), "rate limited; retry in 1 ms");
    }
}
