//! Changes to stored messages (proto-docs/protocol.md section 15): edits, deletions, reactions and
//! moderation. Each one takes the room's next `seq` in the transaction that stores it, like a
//! message, and is kept as a row of `"ChatMessageChange"` for resume and gap repair.
//!
//! What a change does to its message is decided here, the same for both stores: [`decide`]
//! whether the request is allowed and changes anything, [`apply`] it to get the message's new
//! state and the change. The stores write changes in group commits (`super::change_batch`:
//! one read of all the messages, the decisions made here in arrival order, one set-based write
//! that takes each room's next seqs); Postgres also writes one change at a time, in a transaction
//! that locks the message first, for moderation and for a batch that lost a race with another
//! node. A change that turns out to change nothing (a repeated reaction, deleting a deleted
//! message) is not written: no seq is spent, and the caller gets the message as it is.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::Message;

/// How a request names the message it changes: by seq (the socket) or by id (REST).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Seq(i64),
    Id(String),
}

/// What a change request asks for.
#[derive(Debug, Clone)]
pub enum ChangeOp {
    /// New content (validated and trimmed by the service); `window`: how long after the send an
    /// edit is allowed (`None`: always).
    Edit {
        content: String,
        client_change_id: Option<String>,
        window: Option<Duration>,
    },
    /// `any`: the actor may delete other users' messages (ADMIN, SERVICE).
    Delete {
        any: bool,
    },
    /// `max_keys`: the most distinct keys a message may hold.
    React {
        emoji: String,
        max_keys: usize,
    },
    Unreact {
        emoji: String,
    },
    /// A new moderation status (`APPROVED` or `REJECTED`).
    Moderate {
        status: &'static str,
    },
}

#[derive(Debug, Clone)]
pub struct ChangeRequest {
    pub room_id: String,
    pub target: Target,
    pub actor: String,
    pub op: ChangeOp,
    pub at: DateTime<Utc>,
}

impl ChangeRequest {
    pub fn kind(&self) -> &'static str {
        match self.op {
            ChangeOp::Edit { .. } => "edit",
            ChangeOp::Delete { .. } => "delete",
            ChangeOp::React { .. } | ChangeOp::Unreact { .. } => "reaction",
            ChangeOp::Moderate { .. } => "moderation",
        }
    }

    pub fn client_change_id(&self) -> Option<&str> {
        match &self.op {
            ChangeOp::Edit {
                client_change_id, ..
            } => client_change_id.as_deref(),
            _ => None,
        }
    }
}

/// What a change did, as stored in `"ChatMessageChange"."change"` (JSON, tagged by `kind`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ChangeWhat {
    Edit {
        content: String,
    },
    Delete,
    Reaction {
        emoji: String,
        added: bool,
        /// Users reacting with `emoji` after this change.
        count: i64,
    },
    Moderation {
        status: String,
    },
}

/// A stored change: its place in the room's sequence, the message it changed, who and when.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub room_id: String,
    pub seq: i64,
    pub target: i64,
    pub by: String,
    pub at: DateTime<Utc>,
    pub what: ChangeWhat,
}

/// The outcome of a change request: the message in its current state, the change stored (or,
/// for a retried edit, the one stored the first time), and whether nothing new was stored.
#[derive(Debug, Clone)]
pub struct Changed {
    pub message: Message,
    pub change: Option<Change>,
    pub duplicate: bool,
}

/// What a store's change transaction did (returned once per change, never stored).
#[allow(clippy::large_enum_variant)]
pub(crate) enum Written {
    Changed(Changed),
    /// The edit's `clientChangeId` was stored by an earlier attempt: that change answers.
    Stored,
}

/// Why a change was refused (nothing was written).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("message not found")]
    NotFound,
    #[error("the message is deleted")]
    Deleted,
    #[error("the edit window of this message has closed")]
    WindowClosed,
    #[error("only the sender may change this message")]
    NotYours,
    #[error("the message has as many reaction keys as allowed")]
    TooManyReactions,
}

/// Whether a request changes the message (before anything is written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go on: allocate, write, apply.
    Proceed,
    /// Nothing to change: answer with the message as it is (`duplicate`).
    Nothing,
}

/// Checks a request against the message it names.
pub fn decide(req: &ChangeRequest, m: &Message) -> Result<Decision, Refusal> {
    if let ChangeOp::Moderate { status } = req.op {
        return Ok(if m.moderation_status == status {
            Decision::Nothing
        } else {
            Decision::Proceed
        });
    }
    if !m.is_visible() {
        return Err(Refusal::NotFound);
    }
    let deleted = m.deleted_at.is_some();
    match &req.op {
        ChangeOp::Edit {
            content, window, ..
        } => {
            if m.sender_id != req.actor {
                return Err(Refusal::NotYours);
            }
            if deleted {
                return Err(Refusal::Deleted);
            }
            if let Some(window) = window
                && (req.at - m.created_at).to_std().unwrap_or_default() > *window
            {
                return Err(Refusal::WindowClosed);
            }
            Ok(if *content == m.content {
                Decision::Nothing
            } else {
                Decision::Proceed
            })
        }
        ChangeOp::Delete { any } => {
            if m.sender_id != req.actor && !any {
                return Err(Refusal::NotYours);
            }
            Ok(if deleted {
                Decision::Nothing
            } else {
                Decision::Proceed
            })
        }
        ChangeOp::React { emoji, max_keys } => {
            if deleted {
                return Err(Refusal::Deleted);
            }
            let keys = reactions(m);
            if !keys.iter().any(|(k, _)| k == emoji) && keys.len() >= *max_keys {
                return Err(Refusal::TooManyReactions);
            }
            Ok(Decision::Proceed)
        }
        // A deleted message has no reactions left.
        ChangeOp::Unreact { .. } if deleted => Ok(Decision::Nothing),
        ChangeOp::Unreact { .. } => Ok(Decision::Proceed),
        ChangeOp::Moderate { .. } => unreachable!("answered above"),
    }
}

/// The message after the change stored as `seq`, and the change. `count`: for a reaction, how
/// many users react with its emoji after the reaction row was written.
pub fn apply(req: &ChangeRequest, m: &Message, seq: i64, count: i64) -> (Message, Change) {
    let mut after = m.clone();
    after.version = Some(seq);
    let what = match &req.op {
        ChangeOp::Edit { content, .. } => {
            after.content = content.clone();
            after.edited_at = Some(req.at);
            ChangeWhat::Edit {
                content: content.clone(),
            }
        }
        ChangeOp::Delete { .. } => {
            after.content = String::new();
            after.deleted_at = Some(req.at);
            after.reactions = None;
            ChangeWhat::Delete
        }
        ChangeOp::React { emoji, .. } | ChangeOp::Unreact { emoji } => {
            let mut keys = reactions(m);
            match keys.iter().position(|(k, _)| k == emoji) {
                Some(i) if count == 0 => {
                    keys.remove(i);
                }
                Some(i) => keys[i].1 = count,
                None if count > 0 => keys.push((emoji.clone(), count)),
                None => {}
            }
            after.reactions = (!keys.is_empty()).then(|| reactions_json(&keys));
            ChangeWhat::Reaction {
                emoji: emoji.clone(),
                added: matches!(req.op, ChangeOp::React { .. }),
                count,
            }
        }
        ChangeOp::Moderate { status } => {
            after.moderation_status = (*status).to_string();
            ChangeWhat::Moderation {
                status: (*status).to_string(),
            }
        }
    };
    let change = Change {
        room_id: m.room_id.clone(),
        seq,
        target: m.seq,
        by: req.actor.clone(),
        at: req.at,
        what,
    };
    (after, change)
}

/// A message's reactions, in the order their keys were first used.
pub fn reactions(m: &Message) -> Vec<(String, i64)> {
    m.reactions
        .as_deref()
        .and_then(|json| serde_json::from_str::<Ordered>(json).ok())
        .map(|o| o.0)
        .unwrap_or_default()
}

fn reactions_json(keys: &[(String, i64)]) -> String {
    let mut json = String::from("{");
    for (i, (key, count)) in keys.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&serde_json::to_string(key).expect("a string serializes"));
        json.push(':');
        json.push_str(&count.to_string());
    }
    json.push('}');
    json
}

/// A JSON object read as its entries in document order.
struct Ordered(Vec<(String, i64)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of counts")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, i64>()? {
                    entries.push(entry);
                }
                Ok(Ordered(entries))
            }
        }
        d.deserialize_map(Entries)
    }
}

/// Whether `key` is one emoji, at most 32 bytes: a keycap (`0`-`9`, `#`, `*`, U+FE0F, U+20E3);
/// a flag (two regional indicators); or pictographs joined by zero-width joiners, each with an
/// optional variation selector, skin tone and tag sequence (subdivision flags). Two emoji side
/// by side, or a modifier alone, are not one.
pub fn is_emoji(key: &str) -> bool {
    if key.is_empty() || key.len() > 32 {
        return false;
    }
    let chars: Vec<char> = key.chars().collect();
    if let [base, rest @ ..] = chars.as_slice()
        && (base.is_ascii_digit() || *base == '#' || *base == '*')
    {
        return matches!(rest, ['\u{FE0F}', '\u{20E3}'] | ['\u{20E3}']);
    }
    if let [a, b] = chars.as_slice()
        && is_regional(*a)
        && is_regional(*b)
    {
        return true;
    }
    chars.split(|&c| c == '\u{200D}').all(is_emoji_element)
}

/// One pictograph of a joined sequence, with what may follow it.
fn is_emoji_element(element: &[char]) -> bool {
    let [base, rest @ ..] = element else {
        return false;
    };
    let mut rest: &[char] = rest;
    if !is_pictographic(*base) || is_skin_tone(*base) || is_regional(*base) {
        return false;
    }
    if let [v, more @ ..] = rest
        && matches!(v, '\u{FE0E}' | '\u{FE0F}')
    {
        rest = more;
    }
    if let [tone, more @ ..] = rest
        && is_skin_tone(*tone)
    {
        rest = more;
    }
    if let [v, more @ ..] = rest
        && *v == '\u{FE0F}'
    {
        rest = more;
    }
    match rest {
        [] => true,
        // A tag sequence (subdivision flags): tags, then the cancel tag.
        [tags @ .., '\u{E007F}'] => {
            !tags.is_empty() && tags.iter().all(|t| ('\u{E0020}'..='\u{E007E}').contains(t))
        }
        _ => false,
    }
}

fn is_skin_tone(c: char) -> bool {
    ('\u{1F3FB}'..='\u{1F3FF}').contains(&c)
}

fn is_regional(c: char) -> bool {
    ('\u{1F1E6}'..='\u{1F1FF}').contains(&c)
}

fn is_pictographic(c: char) -> bool {
    matches!(c,
        '\u{00A9}' | '\u{00AE}' | '\u{203C}' | '\u{2049}' | '\u{2122}' | '\u{2139}'
        | '\u{2194}'..='\u{21AA}'
        | '\u{231A}'..='\u{23FF}'
        | '\u{24C2}'
        | '\u{25AA}'..='\u{25FE}'
        | '\u{2600}'..='\u{27BF}'
        | '\u{2934}' | '\u{2935}'
        | '\u{2B05}'..='\u{2B55}'
        | '\u{3030}' | '\u{303D}' | '\u{3297}' | '\u{3299}'
        | '\u{1F000}'..='\u{1FAFF}')
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Alice's message 4 in room "r", never changed.
    pub(crate) fn message() -> Message {
        Message {
            id: "m1".into(),
            room_id: "r".into(),
            seq: 4,
            sender_id: "alice".into(),
            sender_name: None,
            sender_avatar_url: None,
            content: "helo".into(),
            content_type: "TEXT".into(),
            status: "SENT".into(),
            moderation_status: "APPROVED".into(),
            created_at: Utc::now(),
            client_msg_id: None,
            edited_at: None,
            deleted_at: None,
            version: None,
            reply_to_seq: None,
            reactions: None,
            reply: None,
        }
    }

    fn request(actor: &str, op: ChangeOp) -> ChangeRequest {
        ChangeRequest {
            room_id: "r".into(),
            target: Target::Seq(4),
            actor: actor.into(),
            op,
            at: Utc::now(),
        }
    }

    fn react(actor: &str, emoji: &str) -> ChangeRequest {
        request(
            actor,
            ChangeOp::React {
                emoji: emoji.into(),
                max_keys: 2,
            },
        )
    }

    #[test]
    fn emoji_keys() {
        let scotland = "🏴\u{E0067}\u{E0062}\u{E0073}\u{E0063}\u{E0074}\u{E007F}";
        for ok in [
            "👍",
            "❤️",
            "👍🏽",
            "👨‍👩‍👧",
            "🇫🇷",
            "1️⃣",
            "#⃣",
            "🏳️‍🌈",
            "✅",
            "🎉",
            "🧑🏽‍💻",
            scotland,
        ] {
            assert!(is_emoji(ok), "{ok}");
        }
        for bad in [
            "",
            "a",
            "+1",
            ":thumbsup:",
            "👍 ",
            "👍a",
            "1",
            "\u{200D}",
            "👍👍",
            "🎉🔥🔥",
            "🏽",
            "🇫",
            "🇫🇷🇫",
            "©™",
            "👍\u{200D}",
            "\u{200D}👍",
            "👍\u{200D}\u{200D}🎉",
            "👍\u{E007F}",
        ] {
            assert!(!is_emoji(bad), "{bad:?}");
        }
    }

    #[test]
    fn reactions_keep_the_order_of_first_use_and_drop_keys_at_zero() {
        let mut m = message();
        for (actor, emoji, count) in [("bob", "🎉", 1), ("carol", "👍", 1), ("dave", "🎉", 2)]
        {
            let (after, change) = apply(&react(actor, emoji), &m, 10, count);
            assert_eq!(change.target, 4);
            m = after;
        }
        assert_eq!(m.reactions.as_deref(), Some(r#"{"🎉":2,"👍":1}"#));
        assert_eq!(
            decide(&react("erin", "🔥"), &m),
            Err(Refusal::TooManyReactions)
        );
        assert_eq!(decide(&react("erin", "👍"), &m), Ok(Decision::Proceed));
        let unreact = request(
            "carol",
            ChangeOp::Unreact {
                emoji: "👍".into()
            },
        );
        let (after, change) = apply(&unreact, &m, 11, 0);
        assert_eq!(after.reactions.as_deref(), Some(r#"{"🎉":2}"#));
        assert_eq!(after.version, Some(11));
        assert_eq!(
            change.what,
            ChangeWhat::Reaction {
                emoji: "👍".into(),
                added: false,
                count: 0
            }
        );
    }

    #[test]
    fn only_the_sender_edits_and_deletes_unless_allowed() {
        let m = message();
        let edit = |actor: &str, content: &str| {
            request(
                actor,
                ChangeOp::Edit {
                    content: content.into(),
                    client_change_id: None,
                    window: Some(Duration::from_secs(60)),
                },
            )
        };
        assert_eq!(decide(&edit("bob", "x"), &m), Err(Refusal::NotYours));
        assert_eq!(decide(&edit("alice", "helo"), &m), Ok(Decision::Nothing));
        assert_eq!(decide(&edit("alice", "hello"), &m), Ok(Decision::Proceed));
        let mut old = message();
        old.created_at = Utc::now() - chrono::Duration::seconds(61);
        assert_eq!(
            decide(&edit("alice", "hello"), &old),
            Err(Refusal::WindowClosed)
        );
        let delete = |actor: &str, any| request(actor, ChangeOp::Delete { any });
        assert_eq!(decide(&delete("bob", false), &m), Err(Refusal::NotYours));
        assert_eq!(decide(&delete("bob", true), &m), Ok(Decision::Proceed));
        let (deleted, _) = apply(&delete("alice", false), &m, 9, 0);
        assert_eq!((deleted.content.as_str(), deleted.version), ("", Some(9)));
        assert_eq!(
            decide(&delete("alice", false), &deleted),
            Ok(Decision::Nothing)
        );
        assert_eq!(
            decide(&edit("alice", "back"), &deleted),
            Err(Refusal::Deleted)
        );
        assert_eq!(decide(&react("bob", "👍"), &deleted), Err(Refusal::Deleted));
    }
}
