//! Changes in group commits: what a batch of change requests writes, decided in one pass over
//! what one read of the store found, so that each store writes a whole batch in a fixed number
//! of set-based statements whatever its size (as sends are written).
//!
//! The requests are taken in arrival order. Each is decided ([`decide`]) and applied ([`apply`])
//! to its message as the earlier requests of the batch left it, so two changes of one message in
//! one batch behave as they would one after the other. A room's changes take its next numbers in
//! that order: the `index`-th change of a room in the batch gets `base + index`, where `base` is
//! the room's head, which the write statement moves by the room's number of changes and returns.
//!
//! What the write does, for the whole batch: each changed message's final state (its version the
//! seq of its last change), every change row, and the net effect on reaction rows (a reaction
//! added and taken back within the batch writes nothing; a deleted message's rows are cleared).
//! Each message is written only if its version is still the one the read found (`expected`), so
//! a store that does not hold the write lock from the read to the write (Postgres across nodes)
//! can tell that another writer got there first, and write the batch again the slow way.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use super::Message;
use super::changes::{
    Change, ChangeOp, ChangeRequest, Changed, Decision, Refusal, Written, apply, decide,
};

/// What the batch's read found for one request, in one snapshot.
pub(crate) struct Found {
    pub message: Message,
    /// The seq of a change stored under the edit's `clientChangeId` (the request is a retry).
    pub key_seq: Option<i64>,
    /// Whether the actor reacts with the request's emoji already (reactions only).
    pub reacted: bool,
}

/// A batch's read, the same on both stores after its input: `$input` a CTE `input` of the
/// requests (`ord` from 1, `in_room`, `in_seq` or `in_id`, `in_actor`, `in_key`, `in_emoji`),
/// then the store's message columns. Rows of [`FoundRow`].
macro_rules! read_sql {
    ($input:literal, $($columns:tt)*) => {
        concat!(
            $input,
            "\nSELECT i.ord, ",
            $($columns)*,
            r#",
    (SELECT k.seq FROM "ChatMessageChange" k
     WHERE k."roomId" = i.in_room AND k."actorId" = i.in_actor AND k."clientChangeId" = i.in_key) AS "keySeq",
    EXISTS (SELECT 1 FROM "ChatReaction" r
            WHERE r."roomId" = i.in_room AND r."messageSeq" = m.seq AND r.emoji = i.in_emoji
              AND r."userId" = i.in_actor) AS reacted
FROM input i JOIN "ChatMessage" m ON m."roomId" = i.in_room AND m.seq = coalesce(i.in_seq,
    (SELECT x.seq FROM "ChatMessage" x WHERE x."roomId" = i.in_room AND x.id = i.in_id))"#
        )
    };
}
pub(crate) use read_sql;

/// One row of a batch's read: the request's place in the batch (`ord`, from 1) and what it found
/// (columns: the message's, `keySeq` and `reacted`).
pub(crate) struct FoundRow {
    ord: i64,
    found: Found,
}

macro_rules! found_row_from_row {
    ($($row:ty),+) => {$(
        impl<'r> sqlx::FromRow<'r, $row> for FoundRow {
            fn from_row(row: &'r $row) -> Result<Self, sqlx::Error> {
                use sqlx::Row;
                let locked: super::Locked = sqlx::FromRow::from_row(row)?;
                Ok(Self {
                    ord: row.try_get("ord")?,
                    found: Found {
                        message: locked.message,
                        key_seq: locked.key_seq,
                        reacted: row.try_get("reacted")?,
                    },
                })
            }
        }
    )+};
}
found_row_from_row!(sqlx::sqlite::SqliteRow, sqlx::postgres::PgRow);

/// What the read found for each of `n` requests, in order (`None`: no such message).
pub(crate) fn found(n: usize, rows: Vec<FoundRow>) -> Vec<Option<Found>> {
    let mut found: Vec<Option<Found>> = (0..n).map(|_| None).collect();
    for row in rows {
        if let Some(slot) = usize::try_from(row.ord - 1)
            .ok()
            .and_then(|i| found.get_mut(i))
        {
            *slot = Some(row.found);
        }
    }
    found
}

/// A changed message as the batch leaves it.
pub(crate) struct MessageWrite {
    pub room: String,
    pub seq: i64,
    /// Its version when the batch read it: written only while it still is.
    pub expected: Option<i64>,
    pub message: Message,
    /// Its last change's index in its room (its version is the room's base plus this).
    pub index: i64,
}

/// A change row to insert: its room's `index`-th change of the batch.
pub(crate) struct ChangeWrite {
    pub room: String,
    pub index: i64,
    pub message_seq: i64,
    pub kind: &'static str,
    pub actor: String,
    pub key: Option<String>,
    /// The change (`ChangeWhat`) as JSON.
    pub what: String,
    pub at: chrono::DateTime<chrono::Utc>,
}

/// A reaction row to add or remove: (room, message seq, emoji, user, when).
pub(crate) type ReactionWrite = (String, i64, String, String, chrono::DateTime<chrono::Utc>);

/// What one request of the batch is.
enum Outcome {
    Refused(Refusal),
    /// Changes nothing: answered with the message as it is.
    Unchanged(Box<Message>),
    /// Its key was stored before the batch: that change answers.
    Stored,
    /// Its key came earlier in this batch: answered as that request is, as a duplicate.
    SameAs(usize),
    /// Written: the message after it and the change, numbered by `index` until the write
    /// returns the room's base.
    New {
        index: i64,
        changed: Box<(Message, Change)>,
    },
}

/// A batch decided: what to write, and how to answer each request once it is written.
pub(crate) struct Batch {
    outcomes: Vec<Outcome>,
    /// Each room's number of changes in the batch.
    pub rooms: Vec<(String, i64)>,
    pub messages: Vec<MessageWrite>,
    pub changes: Vec<ChangeWrite>,
    /// Reaction rows to insert (none already there).
    pub reacted: Vec<ReactionWrite>,
    /// Reaction rows to delete (all there), none of a message in `cleared`.
    pub unreacted: Vec<ReactionWrite>,
    /// Messages deleted by the batch: all their reaction rows go.
    pub cleared: Vec<(String, i64)>,
    /// Every reaction row the batch decided on, and whether it was there before the batch (as
    /// the decisions took it): a writer that decided from what it remembered checks these.
    pub assumed: Vec<(String, i64, String, String, bool)>,
}

/// A message's state through the batch.
struct State {
    message: Message,
    expected: Option<i64>,
    /// Its last change's index, once the batch changed it.
    index: Option<i64>,
}

/// Decides every request of a batch. `found[i]` is what the read found for `reqs[i]` (`None`:
/// no such message in its room).
pub(crate) fn plan(reqs: &[&ChangeRequest], found: Vec<Option<Found>>) -> Batch {
    let mut states: Vec<State> = Vec::new();
    let mut state_of: HashMap<(String, i64), usize> = HashMap::new();
    // (room, message seq, emoji, user) -> (there before the batch, there now, when it changed).
    type Reaction = (bool, bool, chrono::DateTime<chrono::Utc>);
    let mut reactions: HashMap<(String, i64, String, String), Reaction> = HashMap::new();
    let mut room_count: Vec<(String, i64)> = Vec::new();
    let mut room_slot: HashMap<String, usize> = HashMap::new();
    let mut first_of_key: HashMap<(&str, &str, &str), usize> = HashMap::new();
    let mut changes = Vec::new();
    let mut cleared = Vec::new();
    let mut outcomes = Vec::with_capacity(reqs.len());
    for (i, (req, found)) in reqs.iter().zip(found).enumerate() {
        let Some(found) = found else {
            outcomes.push(Outcome::Refused(Refusal::NotFound));
            continue;
        };
        if found.key_seq.is_some() {
            outcomes.push(Outcome::Stored);
            continue;
        }
        if let Some(key) = req.client_change_id() {
            match first_of_key.entry((&req.room_id, &req.actor, key)) {
                Entry::Occupied(first) => {
                    outcomes.push(Outcome::SameAs(*first.get()));
                    continue;
                }
                Entry::Vacant(slot) => {
                    slot.insert(i);
                }
            }
        }
        let at = (found.message.room_id.clone(), found.message.seq);
        let s = *state_of.entry(at.clone()).or_insert_with(|| {
            states.push(State {
                expected: found.message.version,
                message: found.message,
                index: None,
            });
            states.len() - 1
        });
        let m = &states[s].message;
        match decide(req, m) {
            Err(refusal) => {
                outcomes.push(Outcome::Refused(refusal));
                continue;
            }
            Ok(Decision::Nothing) => {
                outcomes.push(Outcome::Unchanged(Box::new(m.clone())));
                continue;
            }
            Ok(Decision::Proceed) => {}
        }
        let mut count = 0;
        if let ChangeOp::React { emoji, .. } | ChangeOp::Unreact { emoji } = &req.op {
            let adding = matches!(req.op, ChangeOp::React { .. });
            let row = reactions
                .entry((at.0.clone(), at.1, emoji.clone(), req.actor.clone()))
                .or_insert((found.reacted, found.reacted, req.at));
            if row.1 == adding {
                outcomes.push(Outcome::Unchanged(Box::new(m.clone())));
                continue;
            }
            *row = (row.0, adding, req.at);
            let before = super::changes::reactions(m)
                .into_iter()
                .find(|(k, _)| k == emoji)
                .map_or(0, |(_, n)| n);
            count = if adding { before + 1 } else { before - 1 };
        }
        let r = *room_slot.entry(at.0.clone()).or_insert_with(|| {
            room_count.push((at.0.clone(), 0));
            room_count.len() - 1
        });
        room_count[r].1 += 1;
        let index = room_count[r].1;
        let (after, change) = apply(req, m, index, count);
        if let ChangeOp::Delete { .. } = req.op {
            for ((room, seq, ..), row) in reactions.iter_mut() {
                if *room == at.0 && *seq == at.1 {
                    row.1 = false;
                }
            }
            cleared.push(at.clone());
        }
        changes.push(ChangeWrite {
            room: at.0.clone(),
            index,
            message_seq: at.1,
            kind: req.kind(),
            actor: req.actor.clone(),
            key: req.client_change_id().map(str::to_string),
            what: serde_json::to_string(&change.what).expect("a change serializes"),
            at: req.at,
        });
        states[s].message = after.clone();
        states[s].index = Some(index);
        outcomes.push(Outcome::New {
            index,
            changed: Box::new((after, change)),
        });
    }
    let mut reacted = Vec::new();
    let mut unreacted = Vec::new();
    let mut assumed = Vec::new();
    for ((room, seq, emoji, user), (before, now, at)) in reactions {
        assumed.push((room.clone(), seq, emoji.clone(), user.clone(), before));
        let row = (room, seq, emoji, user, at);
        if now && !before {
            reacted.push(row);
        } else if before && !now && !cleared.iter().any(|c| c.0 == row.0 && c.1 == row.1) {
            unreacted.push(row);
        }
    }
    let messages = states
        .into_iter()
        .filter_map(|s| {
            Some(MessageWrite {
                room: s.message.room_id.clone(),
                seq: s.message.seq,
                expected: s.expected,
                index: s.index?,
                message: s.message,
            })
        })
        .collect();
    Batch {
        outcomes,
        rooms: room_count,
        messages,
        changes,
        reacted,
        unreacted,
        cleared,
        assumed,
    }
}

impl Batch {
    /// Whether each of the requests `which` is written (not refused, not changing nothing).
    pub fn writes_all(&self, which: &[usize]) -> bool {
        which
            .iter()
            .all(|&i| matches!(self.outcomes.get(i), Some(Outcome::New { .. })))
    }

    /// Whether the batch writes nothing (every request refused or changing nothing).
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The answers, once the write returned each room's base (its head before the batch; a room
    /// missing from `bases` is gone, with its messages). One per request, in order.
    pub fn answers(self, bases: &HashMap<String, i64>) -> Vec<Result<Written, Refusal>> {
        let mut answers: Vec<Result<Written, Refusal>> = Vec::with_capacity(self.outcomes.len());
        for outcome in self.outcomes {
            let answer = match outcome {
                Outcome::Refused(refusal) => Err(refusal),
                Outcome::Unchanged(message) => Ok(Written::Changed(Changed {
                    message: *message,
                    change: None,
                    duplicate: true,
                })),
                Outcome::Stored => Ok(Written::Stored),
                Outcome::SameAs(first) => match &answers[first] {
                    Ok(Written::Changed(first)) => Ok(Written::Changed(Changed {
                        duplicate: true,
                        ..first.clone()
                    })),
                    Ok(Written::Stored) => Ok(Written::Stored),
                    Err(refusal) => Err(*refusal),
                },
                Outcome::New { index, changed } => {
                    let (mut message, mut change) = *changed;
                    match bases.get(&message.room_id) {
                        Some(base) => {
                            change.seq = base + index;
                            message.version = Some(change.seq);
                            Ok(Written::Changed(Changed {
                                message,
                                change: Some(change),
                                duplicate: false,
                            }))
                        }
                        None => Err(Refusal::NotFound),
                    }
                }
            };
            answers.push(answer);
        }
        answers
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::Utc;

    use super::*;
    use crate::store::changes::{ChangeWhat, Target};

    /// Alice's message `seq`, changed last as 7.
    fn message(seq: i64) -> Message {
        let mut m = crate::store::changes::tests::message();
        m.id = format!("m{seq}");
        m.seq = seq;
        m.version = Some(7);
        m
    }

    fn request(seq: i64, actor: &str, op: ChangeOp) -> ChangeRequest {
        ChangeRequest {
            room_id: "r".into(),
            target: Target::Seq(seq),
            actor: actor.into(),
            op,
            at: Utc::now(),
        }
    }

    fn react(seq: i64, actor: &str, emoji: &str) -> ChangeRequest {
        let op = ChangeOp::React {
            emoji: emoji.into(),
            max_keys: 20,
        };
        request(seq, actor, op)
    }

    fn unreact(seq: i64, actor: &str, emoji: &str) -> ChangeRequest {
        let op = ChangeOp::Unreact {
            emoji: emoji.into(),
        };
        request(seq, actor, op)
    }

    fn edit(seq: i64, content: &str, key: Option<&str>) -> ChangeRequest {
        let op = ChangeOp::Edit {
            content: content.into(),
            client_change_id: key.map(str::to_string),
            window: Some(Duration::from_secs(60)),
        };
        request(seq, "alice", op)
    }

    fn found(m: &Message, reacted: bool) -> Option<Found> {
        Some(Found {
            message: m.clone(),
            key_seq: None,
            reacted,
        })
    }

    fn changed(answer: &Result<Written, Refusal>) -> &Changed {
        match answer {
            Ok(Written::Changed(changed)) => changed,
            _ => panic!("not a change"),
        }
    }

    #[test]
    fn changes_of_one_message_apply_in_order_and_take_the_rooms_next_numbers() {
        let m = message(4);
        let reqs = [
            edit(4, "hello", Some("k1")),
            react(4, "bob", "👍"),
            react(4, "carol", "👍"),
            react(4, "bob", "👍"),
            unreact(4, "dave", "👍"),
            edit(4, "hello", Some("k1")),
        ];
        let refs: Vec<&ChangeRequest> = reqs.iter().collect();
        let batch = plan(&refs, (0..6).map(|_| found(&m, false)).collect());
        assert_eq!(batch.rooms, vec![("r".to_string(), 3)]);
        assert_eq!(batch.changes.len(), 3);
        assert_eq!(batch.reacted.len(), 2);
        assert!(batch.unreacted.is_empty() && batch.cleared.is_empty());
        let [only] = batch.messages.as_slice() else {
            panic!("one message written");
        };
        assert_eq!((only.expected, only.index), (Some(7), 3));
        assert_eq!(only.message.reactions.as_deref(), Some(r#"{"👍":2}"#));
        let answers = batch.answers(&HashMap::from([("r".to_string(), 20)]));
        assert_eq!(
            changed(&answers[0]).change.as_ref().map(|c| c.seq),
            Some(21)
        );
        assert_eq!(changed(&answers[0]).message.content, "hello");
        let carol = changed(&answers[2]);
        assert_eq!(carol.message.version, Some(23));
        assert_eq!(
            carol.change.as_ref().map(|c| &c.what),
            Some(&ChangeWhat::Reaction {
                emoji: "👍".into(),
                added: true,
                count: 2
            })
        );
        // Bob's second reaction and Dave's removal of one he never made change nothing.
        assert!(changed(&answers[3]).duplicate && changed(&answers[3]).change.is_none());
        assert!(changed(&answers[4]).change.is_none());
        // The retried edit answers with the first one's change.
        let retry = changed(&answers[5]);
        assert!(retry.duplicate);
        assert_eq!(retry.change.as_ref().map(|c| c.seq), Some(21));
    }

    #[test]
    fn a_reaction_taken_back_writes_no_row_and_a_deletion_clears_them() {
        let m = message(4);
        let mut n = message(5);
        n.reactions = Some(r#"{"🎉":1}"#.into());
        let reqs = [
            react(4, "bob", "👍"),
            unreact(4, "bob", "👍"),
            unreact(5, "bob", "🎉"),
            request(5, "alice", ChangeOp::Delete { any: false }),
            react(5, "carol", "🎉"),
        ];
        let refs: Vec<&ChangeRequest> = reqs.iter().collect();
        let batch = plan(
            &refs,
            vec![
                found(&m, false),
                found(&m, false),
                found(&n, true),
                found(&n, false),
                None,
            ],
        );
        assert!(batch.reacted.is_empty());
        // Bob's 🎉 on 5 goes with the deletion's clearing, not on its own.
        assert!(batch.unreacted.is_empty());
        assert_eq!(batch.cleared, vec![("r".to_string(), 5)]);
        assert_eq!(batch.rooms, vec![("r".to_string(), 4)]);
        let answers = batch.answers(&HashMap::new());
        // The room went away before the write: nothing it numbered was stored.
        assert!(answers.iter().all(|a| matches!(a, Err(Refusal::NotFound))));
    }
}
