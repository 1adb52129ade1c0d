//! The embedded store: one SQLite file in WAL mode.
//!
//! Write transactions start with `BEGIN IMMEDIATE`, taking the write lock up front, so several
//! processes may share the file (the busy timeout queues them) without a reader upgrading to a
//! writer on a stale snapshot.
//! SQLite has one writer at a time, so the store keeps exactly one writer connection (sends are
//! serialized through it, which is also what makes the per-room sequence trivially gap-free) and
//! a small pool of reader connections, which WAL lets run beside the writer.
//! `synchronous = NORMAL`: a commit survives a crash of the gateway; a power loss may lose the last
//! few commits (the embedded default is for one machine; production runs on Postgres).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::{
    Access, Inserted, Message, NewMessage, OutboxEntry, ReadMark, Room, RoomSummary, Store,
    StoreError,
};

/// The embedded migrations (migrations/sqlite), applied by `migrate` and at start-up.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

macro_rules! columns {
    () => {
        r#"id, "roomId", seq, "senderId", "senderName", "senderAvatarUrl", content, "contentType", status, "moderationStatus", "createdAt", "clientMsgId""#
    };
}

const FIND_BY_CLIENT_MSG_ID: &str = concat!(
    "SELECT ",
    columns!(),
    r#" FROM "ChatMessage" WHERE "roomId" = ? AND "senderId" = ? AND "clientMsgId" = ?"#
);

pub struct SqliteStore {
    /// The only connection that writes. Held for one transaction at a time.
    writer: SqlitePool,
    readers: SqlitePool,
}

fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl SqliteStore {
    /// Opens (creating if missing) the database file; does not migrate.
    pub async fn open(path: &Path, readers: u32) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Unavailable(format!("{}: {e}", dir.display())))?;
        }
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(StoreError::from)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        // An in-process connection does not go stale: no ping (a round trip to the connection's
        // thread) before every use.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        let readers = SqlitePoolOptions::new()
            .max_connections(readers.max(1))
            .test_before_acquire(false)
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self { writer, readers })
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR
            .run(&self.writer)
            .await
            .map_err(|e| StoreError::Other(format!("migration failed: {e}")))
    }

    pub async fn close(&self) {
        self.writer.close().await;
        self.readers.close().await;
    }
}

/// Rows for `json_each(?)`: a JSON array (of arrays), so one fixed statement text (prepared once)
/// takes any number of rows.
fn json<T: serde::Serialize>(rows: &T) -> String {
    serde_json::to_string(rows).expect("strings and numbers serialize")
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.readers).await?;
        Ok(())
    }

    async fn insert_message(&self, msg: NewMessage) -> Result<Inserted, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        if let Some(client_msg_id) = &msg.client_msg_id {
            let existing: Option<Message> = sqlx::query_as(FIND_BY_CLIENT_MSG_ID)
                .bind(&msg.room_id)
                .bind(&msg.sender_id)
                .bind(client_msg_id)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(message) = existing {
                tx.rollback().await?;
                return Ok(Inserted {
                    message,
                    duplicate: true,
                });
            }
        }
        let seq: Option<i64> = sqlx::query_scalar(
            r#"UPDATE "ChatRoom" SET "lastSeq" = "lastSeq" + 1 WHERE id = ? RETURNING "lastSeq""#,
        )
        .bind(&msg.room_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(seq) = seq else {
            return Err(StoreError::RoomNotFound);
        };
        sqlx::query(
            r#"INSERT INTO "ChatMessage" (id, "roomId", seq, "senderId", "senderName", "senderAvatarUrl",
                 content, "contentType", status, "moderationStatus", "createdAt", "clientMsgId")
               VALUES (?, ?, ?, ?, ?, ?, ?, 'TEXT', 'SENT', 'APPROVED', ?, ?)"#,
        )
        .bind(&msg.id)
        .bind(&msg.room_id)
        .bind(seq)
        .bind(&msg.sender_id)
        .bind(&msg.sender_name)
        .bind(&msg.sender_avatar_url)
        .bind(&msg.content)
        .bind(ts(&msg.created_at))
        .bind(&msg.client_msg_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            r#"INSERT INTO "ChatOutbox" ("roomId", seq, "messageId", "createdAt") VALUES (?, ?, ?, ?)"#,
        )
        .bind(&msg.room_id)
        .bind(seq)
        .bind(&msg.id)
        .bind(ts(&msg.created_at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Inserted {
            message: Message {
                id: msg.id,
                room_id: msg.room_id,
                seq,
                sender_id: msg.sender_id,
                sender_name: msg.sender_name,
                sender_avatar_url: msg.sender_avatar_url,
                content: msg.content,
                content_type: "TEXT".into(),
                status: "SENT".into(),
                moderation_status: "APPROVED".into(),
                created_at: msg.created_at,
                client_msg_id: msg.client_msg_id,
            },
            duplicate: false,
        })
    }

    async fn find_by_client_msg_id(
        &self,
        room: &str,
        sender: &str,
        client_msg_id: &str,
    ) -> Result<Option<Message>, StoreError> {
        Ok(sqlx::query_as(FIND_BY_CLIENT_MSG_ID)
            .bind(room)
            .bind(sender)
            .bind(client_msg_id)
            .fetch_optional(&self.readers)
            .await?)
    }

    async fn history(
        &self,
        room: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        Ok(sqlx::query_as(concat!(
            "SELECT ",
            columns!(),
            r#" FROM "ChatMessage" WHERE "roomId" = ? AND seq < ? AND "moderationStatus" <> 'REJECTED'
                ORDER BY seq DESC LIMIT ?"#
        ))
        .bind(room)
        .bind(before.unwrap_or(i64::MAX))
        .bind(limit)
        .fetch_all(&self.readers)
        .await?)
    }

    async fn messages_between(
        &self,
        room: &str,
        after: i64,
        until: i64,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        Ok(sqlx::query_as(concat!(
            "SELECT ",
            columns!(),
            r#" FROM "ChatMessage" WHERE "roomId" = ? AND seq > ? AND seq <= ?
                AND "moderationStatus" <> 'REJECTED' ORDER BY seq ASC LIMIT ?"#
        ))
        .bind(room)
        .bind(after)
        .bind(until)
        .bind(limit)
        .fetch_all(&self.readers)
        .await?)
    }

    async fn room_head(&self, room: &str) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar(r#"SELECT "lastSeq" FROM "ChatRoom" WHERE id = ?"#)
                .bind(room)
                .fetch_optional(&self.readers)
                .await?,
        )
    }

    async fn access(&self, room: &str, user: &str) -> Result<Access, StoreError> {
        let (room_exists, member): (Option<i64>, Option<i64>) = sqlx::query_as(
            r#"SELECT (SELECT 1 FROM "ChatRoom" WHERE id = ?1),
                      (SELECT 1 FROM "ChatRoomMember" WHERE "roomId" = ?1 AND "userId" = ?2)"#,
        )
        .bind(room)
        .bind(user)
        .fetch_one(&self.readers)
        .await?;
        Ok(match (room_exists, member) {
            (None, _) => Access::NoRoom,
            (Some(_), None) => Access::NotMember,
            (Some(_), Some(_)) => Access::Member,
        })
    }

    async fn create_room(&self, id: &str, name: &str) -> Result<Room, StoreError> {
        sqlx::query(r#"INSERT INTO "ChatRoom" (id, name) VALUES (?, ?)"#)
            .bind(id)
            .bind(name)
            .execute(&self.writer)
            .await
            .map_err(|e| match StoreError::from(e) {
                StoreError::Conflict(_) => {
                    StoreError::Conflict(format!("room {id:?} already exists"))
                }
                other => other,
            })?;
        Ok(Room {
            id: id.to_string(),
            name: name.to_string(),
            last_seq: 0,
        })
    }

    async fn ensure_room(&self, id: &str, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            r#"INSERT INTO "ChatRoom" (id, name) VALUES (?, ?) ON CONFLICT (id) DO NOTHING"#,
        )
        .bind(id)
        .bind(name)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn add_member(&self, room: &str, user: &str) -> Result<bool, StoreError> {
        if self.room_head(room).await?.is_none() {
            return Err(StoreError::RoomNotFound);
        }
        let done = sqlx::query(
            r#"INSERT INTO "ChatRoomMember" (id, "roomId", "userId") VALUES (?, ?, ?)
               ON CONFLICT ("roomId", "userId") DO NOTHING"#,
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(room)
        .bind(user)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn remove_member(&self, room: &str, user: &str) -> Result<bool, StoreError> {
        let done =
            sqlx::query(r#"DELETE FROM "ChatRoomMember" WHERE "roomId" = ? AND "userId" = ?"#)
                .bind(room)
                .bind(user)
                .execute(&self.writer)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn touch_rooms(&self, rooms: &[(String, DateTime<Utc>)]) -> Result<(), StoreError> {
        if rooms.is_empty() {
            return Ok(());
        }
        let rows: Vec<(&str, String)> = rooms
            .iter()
            .map(|(room, at)| (room.as_str(), ts(at)))
            .collect();
        // One statement for every room; a room listed twice takes its latest time.
        sqlx::query(
            r#"UPDATE "ChatRoom" SET "lastMessageAt" = t.at, "updatedAt" = t.at
               FROM (SELECT value->>0 AS room, max(value->>1) AS at FROM json_each(?) GROUP BY 1) AS t
               WHERE "ChatRoom".id = t.room AND ("lastMessageAt" IS NULL OR "lastMessageAt" < t.at)"#,
        )
        .bind(json(&rows))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn my_rooms(&self, user: &str, limit: u32) -> Result<Vec<RoomSummary>, StoreError> {
        let rooms: Vec<(String, String, i64, i64)> = sqlx::query_as(
            r#"SELECT r.id, r.name, r."lastSeq", m."lastReadSeq"
               FROM "ChatRoomMember" m JOIN "ChatRoom" r ON r.id = m."roomId"
               WHERE m."userId" = ? ORDER BY r."lastMessageAt" IS NULL, r."lastMessageAt" DESC, r.id LIMIT ?"#,
        )
        .bind(user)
        .bind(limit)
        .fetch_all(&self.readers)
        .await?;
        let last: Vec<Message> = sqlx::query_as(concat!(
            "SELECT ",
            columns!(),
            r#" FROM "ChatMessage" WHERE ("roomId", seq) IN
                (SELECT r.id, r."lastSeq" FROM "ChatRoomMember" m JOIN "ChatRoom" r ON r.id = m."roomId"
                 WHERE m."userId" = ?) AND "moderationStatus" <> 'REJECTED'"#
        ))
        .bind(user)
        .fetch_all(&self.readers)
        .await?;
        Ok(super::summaries(rooms, last))
    }

    async fn member_count(&self, room: &str) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar(r#"SELECT COUNT(*) FROM "ChatRoomMember" WHERE "roomId" = ?"#)
                .bind(room)
                .fetch_one(&self.readers)
                .await?,
        )
    }

    async fn mark_read(&self, marks: &[ReadMark]) -> Result<u64, StoreError> {
        if marks.is_empty() {
            return Ok(0);
        }
        let rows: Vec<(&str, &str, i64, String)> = marks
            .iter()
            .map(|m| (m.room_id.as_str(), m.user_id.as_str(), m.seq, ts(&m.at)))
            .collect();
        // One statement for every mark; a (room, user) listed twice takes its furthest mark.
        let done = sqlx::query(
            r#"UPDATE "ChatRoomMember" SET "lastReadSeq" = r.seq, "lastReadAt" = r.at
               FROM (SELECT value->>0 AS room, value->>1 AS usr, max(value->>2) AS seq,
                            max(value->>3) AS at
                     FROM json_each(?) GROUP BY 1, 2) AS r
               WHERE "ChatRoomMember"."roomId" = r.room AND "ChatRoomMember"."userId" = r.usr
                 AND "lastReadSeq" < r.seq"#,
        )
        .bind(json(&rows))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    async fn outbox_claim(
        &self,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let now = Utc::now();
        let until =
            now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(30));
        let mut rows: Vec<OutboxEntry> = sqlx::query_as(
            r#"UPDATE "ChatOutbox" SET "claimedUntil" = ?1
               WHERE id IN (SELECT id FROM "ChatOutbox"
                            WHERE "claimedUntil" IS NULL OR "claimedUntil" < ?2
                            ORDER BY id LIMIT ?3)
               RETURNING id, "roomId", seq, "messageId", "createdAt""#,
        )
        .bind(ts(&until))
        .bind(ts(&now))
        .bind(limit)
        .fetch_all(&self.writer)
        .await?;
        rows.sort_by_key(|r| r.id);
        Ok(rows)
    }

    async fn outbox_ack(&self, ids: &[i64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        // One fixed statement text whatever the number of ids (prepared once).
        sqlx::query(r#"DELETE FROM "ChatOutbox" WHERE id IN (SELECT value FROM json_each(?))"#)
            .bind(json(&ids))
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn close(&self) {
        SqliteStore::close(self).await;
    }
}
