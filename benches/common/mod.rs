//! What the micro-benchmarks share: criterion's settings and a typical stored message.

use std::time::Duration;

use chat_gateway::store::Message;
use chrono::{TimeZone, Utc};
use criterion::Criterion;

/// Short runs, so `cargo bench` takes a minute or two on two cores. Command-line flags
/// (`--measurement-time`, `--sample-size`, ...) still override these.
pub fn criterion() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
}

/// A message as the store returns it: a uuid, a display name and avatar, about 100 characters of
/// text, a client id (what a browser sends through the SDK).
#[allow(dead_code)] // not every bench encodes messages
pub fn message(room: &str, seq: i64) -> Message {
    Message {
        id: format!("0193a5b2-7c1e-7d3f-9a4b-{seq:012}"),
        room_id: room.to_string(),
        seq,
        sender_id: "user-4242".to_string(),
        sender_name: Some("Alice Example".to_string()),
        sender_avatar_url: Some("https://cdn.example.com/avatars/user-4242.png".to_string()),
        content: "Shipping the release at five; shout in this room if anything in the \
                  checklist is still open."
            .to_string(),
        content_type: "TEXT".to_string(),
        status: "SENT".to_string(),
        moderation_status: "APPROVED".to_string(),
        created_at: Utc.with_ymd_and_hms(2026, 11, 27, 3, 14, 15).unwrap(),
        client_msg_id: Some(format!("c-{seq}")),
        edited_at: None,
        deleted_at: None,
        version: None,
        reply_to_seq: None,
        reactions: None,
        reply: None,
    }
}
