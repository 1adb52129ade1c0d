//! Stored rows as the two doors show them: the socket's lean message object and the REST
//! message object of the app the gateway replaces (both defined in [`crate::protocol`], which
//! knows nothing of the store), the shared `message` push, and the REST history page made from
//! the socket's (what the cache holds).

use std::borrow::Cow;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::broker::Published;
use serde_json::value::RawValue;

use crate::protocol::{
    self, HistoryPage, MessageJson, MessageParts, Push, Reactions, RoomsResult, SocketMessage,
    WireChange, WireMessage, WireQuote, WireRoom, WireSender,
};
use crate::store::changes::ChangeWhat;
use crate::store::{Change, Event, Message, Quote, RoomSummary};

/// A reply's quote as both doors show it.
fn wire_quote(q: &Quote) -> WireQuote<'_> {
    WireQuote {
        seq: q.seq,
        sender_id: Cow::Borrowed(&q.sender_id),
        name: q.sender_name.as_deref().map(Cow::Borrowed),
        excerpt: q.excerpt.as_deref().map(Cow::Borrowed),
        deleted: q.excerpt.is_none(),
    }
}

/// A message's stored reactions (a JSON object), as they are.
fn reactions(m: &Message) -> Option<Reactions<'_>> {
    m.reactions
        .as_deref()
        .and_then(|json| serde_json::from_str::<&RawValue>(json).ok())
        .map(Reactions)
}

/// A stored change as both doors show it.
pub fn wire_change(c: &Change) -> WireChange<'_> {
    let ts = c.at.timestamp_millis();
    let mut wire = WireChange {
        seq: c.seq,
        target: c.target,
        kind: "",
        by: &c.by,
        ts,
        content: None,
        edited_at: None,
        deleted_at: None,
        emoji: None,
        added: None,
        count: None,
        moderation_status: None,
    };
    match &c.what {
        ChangeWhat::Edit { content } => {
            wire.kind = "edit";
            wire.content = Some(content);
            wire.edited_at = Some(ts);
        }
        ChangeWhat::Delete => {
            wire.kind = "delete";
            wire.deleted_at = Some(ts);
        }
        ChangeWhat::Reaction {
            emoji,
            added,
            count,
        } => {
            wire.kind = "reaction";
            wire.emoji = Some(emoji);
            wire.added = Some(*added);
            wire.count = Some(*count);
        }
        ChangeWhat::Moderation { status } => {
            wire.kind = "moderation";
            wire.moderation_status = Some(status);
        }
    }
    wire
}

/// The shared `change` push of a stored change (no sender profile to announce).
pub fn change_frame(c: &Change) -> Arc<Published> {
    let push = protocol::encode(&Push::Change {
        room: &c.room_id,
        change: wire_change(c),
    });
    Arc::new(Published::new(c.seq, push.into(), ""))
}

/// The push of a room event read from the store (a catch-up, a gap fill): a message with its
/// sender's profile (the room may not have told it), or a change.
pub fn event_frame(e: &Event) -> Arc<Published> {
    match e {
        Event::Message(m) => publish_frame(m),
        Event::Change(c) => change_frame(c),
    }
}

/// A stored message as the socket shows it in send results and history: with its `clientMsgId`
/// and its sender's profile.
pub fn socket_message(m: &Message) -> SocketMessage<'_> {
    SocketMessage {
        seq: m.seq,
        id: Some(Cow::Borrowed(&m.id)),
        sender_id: Cow::Borrowed(&m.sender_id),
        content: Cow::Borrowed(&m.content),
        ts: m.created_at.timestamp_millis(),
        content_type: Cow::Borrowed(&m.content_type),
        status: Cow::Borrowed(&m.status),
        moderation_status: Cow::Borrowed(&m.moderation_status),
        client_msg_id: m.client_msg_id.as_deref().map(Cow::Borrowed),
        sender_name: Some(m.sender_name.as_deref().map(Cow::Borrowed)),
        sender_avatar_url: Some(m.sender_avatar_url.as_deref().map(Cow::Borrowed)),
        reply_to: m.reply.as_ref().map(wire_quote),
        edited_at: m.edited_at.map(|t| t.timestamp_millis()),
        deleted_at: m.deleted_at.map(|t| t.timestamp_millis()),
        version: m.version,
        reactions: reactions(m),
    }
}

/// A stored message as the REST routes show it.
pub fn rest_message(m: &Message) -> WireMessage<'_> {
    WireMessage {
        id: &m.id,
        room_id: &m.room_id,
        seq: m.seq,
        sender_id: &m.sender_id,
        sender_name: m.sender_name.as_deref(),
        sender_avatar_url: m.sender_avatar_url.as_deref(),
        sender: WireSender {
            id: &m.sender_id,
            name: m.sender_name.as_deref(),
            avatar_url: m.sender_avatar_url.as_deref(),
        },
        content: &m.content,
        content_type: &m.content_type,
        status: &m.status,
        moderation_status: &m.moderation_status,
        created_at: m.created_at,
        client_msg_id: m.client_msg_id.as_deref(),
        reply_to: m.reply.as_ref().map(wire_quote),
        edited_at: m.edited_at,
        deleted_at: m.deleted_at,
        version: m.version,
        reactions: reactions(m),
    }
}

/// A socket message object (from the cache, or a socket page) as the REST routes show it.
fn rest_from_socket<'a>(room: &'a str, m: &'a SocketMessage<'a>) -> WireMessage<'a> {
    let name = m.sender_name.as_ref().and_then(|n| n.as_deref());
    let avatar = m.sender_avatar_url.as_ref().and_then(|a| a.as_deref());
    WireMessage {
        id: m.id.as_deref().unwrap_or_default(),
        room_id: room,
        seq: m.seq,
        sender_id: &m.sender_id,
        sender_name: name,
        sender_avatar_url: avatar,
        sender: WireSender {
            id: &m.sender_id,
            name,
            avatar_url: avatar,
        },
        content: &m.content,
        content_type: &m.content_type,
        status: &m.status,
        moderation_status: &m.moderation_status,
        created_at: from_millis(m.ts),
        client_msg_id: m.client_msg_id.as_deref(),
        reply_to: m.reply_to.clone(),
        edited_at: m.edited_at.map(from_millis),
        deleted_at: m.deleted_at.map(from_millis),
        version: m.version,
        reactions: m.reactions,
    }
}

fn from_millis(ms: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default()
}

/// A stored message serialized once, as the socket's full object: what the cache holds and
/// pushes are cut from.
pub fn message_json(m: &Message) -> MessageJson {
    MessageJson {
        seq: m.seq,
        json: protocol::encode_exact(&socket_message(m)),
    }
}

/// The shared `message` push of a stored message.
pub fn publish_frame(m: &Message) -> Arc<Published> {
    published(&m.room_id, &message_json(m))
}

/// The shared `message` push of a message serialized once (a send's): the push without the
/// sender's profile, and the profile to splice in where the room announces it.
pub fn published(room: &str, message: &MessageJson) -> Arc<Published> {
    let parts = MessageParts::of(&message.json);
    Arc::new(Published::new(
        message.seq,
        protocol::message_push(room, &message.json, false),
        parts.profile,
    ))
}

/// The REST history page of a socket history page (the JSON `service::history` builds or the
/// cache holds): the same messages in the REST object. `None` when `socket_page` is not one.
pub fn rest_page(socket_page: &str) -> Option<String> {
    let page: HistoryPage<'_, SocketMessage<'_>> = serde_json::from_str(socket_page).ok()?;
    let rest = HistoryPage {
        room: Cow::Borrowed(&*page.room),
        messages: page
            .messages
            .iter()
            .map(|m| rest_from_socket(&page.room, m))
            .collect(),
        next_before: page.next_before,
        my_reactions: page.my_reactions,
    };
    Some(protocol::encode(&rest))
}

/// The user's rooms, with each last message in the socket's object.
pub fn socket_rooms(rooms: &[RoomSummary]) -> RoomsResult<'_, SocketMessage<'_>> {
    rooms_result(rooms, socket_message)
}

/// The user's rooms, with each last message in the REST object.
pub fn rest_rooms(rooms: &[RoomSummary]) -> RoomsResult<'_, WireMessage<'_>> {
    rooms_result(rooms, rest_message)
}

fn rooms_result<'a, M>(
    rooms: &'a [RoomSummary],
    message: impl Fn(&'a Message) -> M,
) -> RoomsResult<'a, M> {
    RoomsResult {
        rooms: rooms
            .iter()
            .map(|r| WireRoom {
                id: &r.id,
                name: &r.name,
                last_seq: r.last_seq,
                last_read_seq: r.last_read_seq,
                unread: r.unread,
                last_message: r.last_message.as_ref().map(&message),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Push, encode, history_page, message_push};

    fn message(room: &str, seq: i64, content: &str) -> Message {
        Message {
            id: format!("m{seq}"),
            room_id: room.into(),
            seq,
            sender_id: "alice".into(),
            sender_name: Some("Alice \"A\"".into()),
            sender_avatar_url: None,
            content: content.into(),
            content_type: "TEXT".into(),
            status: "SENT".into(),
            moderation_status: "APPROVED".into(),
            created_at: Utc::now(),
            client_msg_id: Some("c1".into()),
            edited_at: None,
            deleted_at: None,
            version: None,
            reply_to_seq: None,
            reactions: None,
            reply: None,
        }
    }

    #[test]
    fn assembled_history_pages_and_pushes_are_what_serde_writes() {
        for room in ["lobby", r#"a "quoted" \ room"#, "caf\u{e9} \u{1F600}"] {
            let rows = [
                message(room, 7, "hi \"there\"\n\tbye ,\"senderName\":\"x\""),
                message(room, 8, "\u{e9} \u{2713} \u{7f}"),
            ];
            for (messages, next_before) in
                [(&rows[..], Some(7)), (&rows[..1], None), (&[][..], None)]
            {
                let expected = encode(&HistoryPage {
                    room: Cow::Borrowed(room),
                    messages: messages.iter().map(socket_message).collect(),
                    next_before,
                    my_reactions: None,
                });
                let fragments: Vec<MessageJson> = messages.iter().map(message_json).collect();
                assert_eq!(&*history_page(room, &fragments, next_before), expected);
                // And its REST twin is what serializing the REST objects gives.
                let rest = encode(&HistoryPage {
                    room: Cow::Borrowed(room),
                    messages: messages.iter().map(rest_message).collect(),
                    next_before,
                    my_reactions: None,
                });
                assert_eq!(rest_page(&expected).as_deref(), Some(&*rest));
            }
            let json = message_json(&rows[0]);
            let lean = SocketMessage {
                id: None,
                client_msg_id: None,
                sender_name: None,
                sender_avatar_url: None,
                ..socket_message(&rows[0])
            };
            assert_eq!(
                &*message_push(room, &json.json, false),
                encode(&Push::Message {
                    room,
                    message: lean.clone()
                })
            );
            let announcing = SocketMessage {
                id: None,
                client_msg_id: None,
                ..socket_message(&rows[0])
            };
            assert_eq!(
                &*message_push(room, &json.json, true),
                encode(&Push::Message {
                    room,
                    message: announcing
                })
            );
        }
    }

    #[test]
    fn defaults_are_left_out_and_read_back() {
        let mut m = message("r", 1, "x");
        let lean = encode(&socket_message(&m));
        assert!(!lean.contains("contentType") && !lean.contains("status"));
        m.content_type = "IMAGE".into();
        m.moderation_status = "PENDING".into();
        m.client_msg_id = None;
        let odd = encode(&socket_message(&m));
        assert!(odd.contains(r#""contentType":"IMAGE""#), "{odd}");
        assert!(odd.contains(r#""moderationStatus":"PENDING""#), "{odd}");
        let back: SocketMessage = serde_json::from_str(&odd).unwrap();
        assert_eq!(back.status, "SENT");
        assert_eq!(back.content_type, "IMAGE");
        assert_eq!(
            MessageParts::of(&odd).profile,
            r#","senderName":"Alice \"A\"","senderAvatarUrl":null"#
        );
    }
}
