//! The gateway on PostgreSQL: migrations (automatic, maintenance-window, rollback), the protocol's
//! expectations through both doors, gap-free sequences under concurrency, the history query's
//! plan, the backfill under live traffic, faults and hostile text. Each test has a database of its
//! own (see `common::scratch_database`); without a reachable Postgres the suite is skipped, or
//! fails when CI=true.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chat_gateway::store::backfill::{self, BackfillOptions, Outcome, Plan};
use chat_gateway::store::changes::ChangeOp;
use chat_gateway::store::postgres::{
    self, HISTORY_SQL, MAINTENANCE_DOWN_SQL, MIGRATOR, PgStore, SEQ_INDEX,
};
use chat_gateway::store::{ChangeRequest, NewMessage, Refusal, Store, StoreError, Target};
use common::faults::{CuttableProxy, postgres_addr};
use common::{TestApp, WAIT, scratch_database, seqs, with_host};
use serde_json::{Value, json};
use sqlx::{Executor, PgPool};
use tokio_util::sync::CancellationToken;

/// The test's database, or return (skipped) when Postgres is unreachable outside CI.
macro_rules! database {
    () => {
        match scratch_database().await {
            Some(db) => db,
            None => return,
        }
    };
}

async fn tables(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_name NOT LIKE '\\_%' ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The definitions of the gateway's indexes on "ChatMessage".
async fn message_indexes(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT indexdef FROM pg_indexes WHERE tablename = 'ChatMessage' ORDER BY indexname",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn columns(pool: &PgPool, table: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns WHERE table_name = $1 ORDER BY 1",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_create_the_schema_roll_back_and_apply_again() {
    let db = database!();
    let pool = db.migrated().await;
    assert_eq!(
        tables(&pool).await,
        [
            "ChatMessage",
            "ChatMessageChange",
            "ChatOutbox",
            "ChatReaction",
            "ChatRoom",
            "ChatRoomMember",
            "User"
        ]
    );
    let fresh_indexes = message_indexes(&pool).await;
    assert!(
        fresh_indexes
            .iter()
            .any(|d| d.contains(SEQ_INDEX) && d.contains("UNIQUE")),
        "{fresh_indexes:?}"
    );

    // Safe to run twice: sqlx skips applied migrations, and each file itself is idempotent.
    MIGRATOR.run(&pool).await.unwrap();
    for migration in MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
    {
        pool.execute(&*migration.sql)
            .await
            .unwrap_or_else(|e| panic!("{} is not idempotent: {e}", migration.description));
    }
    assert_eq!(message_indexes(&pool).await, fresh_indexes);

    MIGRATOR.undo(&pool, 0).await.unwrap();
    assert!(
        tables(&pool).await.is_empty(),
        "rollback drops what it created"
    );
    MIGRATOR.run(&pool).await.unwrap();
    assert_eq!(tables(&pool).await.len(), 7);
    assert_eq!(message_indexes(&pool).await, fresh_indexes);
}

/// The app's schema before the gateway, the Prisma way: enums for statuses, no sequence, no
/// denormalized sender. `rows` legacy messages in room "legacy".
async fn create_legacy_app_schema(pool: &PgPool, rows: i64) {
    sqlx::raw_sql(
        r#"
        CREATE TYPE "ModerationStatus" AS ENUM ('PENDING', 'APPROVED', 'REJECTED');
        CREATE TABLE "User" (id TEXT PRIMARY KEY, name TEXT, email TEXT, image TEXT,
            role TEXT NOT NULL DEFAULT 'USER',
            "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP);
        CREATE TABLE "ChatRoom" (id TEXT PRIMARY KEY, name TEXT NOT NULL,
            "lastMessageAt" TIMESTAMP(3),
            "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
            "updatedAt" TIMESTAMP(3) NOT NULL);
        CREATE TABLE "ChatRoomMember" (id TEXT PRIMARY KEY,
            "roomId" TEXT NOT NULL REFERENCES "ChatRoom"(id) ON DELETE CASCADE,
            "userId" TEXT NOT NULL, "lastReadAt" TIMESTAMP(3),
            "joinedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP);
        CREATE UNIQUE INDEX "ChatRoomMember_roomId_userId_key" ON "ChatRoomMember"("roomId", "userId");
        CREATE TABLE "ChatMessage" (id TEXT PRIMARY KEY,
            "roomId" TEXT NOT NULL REFERENCES "ChatRoom"(id) ON DELETE CASCADE,
            "senderId" TEXT NOT NULL, content TEXT NOT NULL,
            "contentType" TEXT NOT NULL DEFAULT 'TEXT', status TEXT NOT NULL DEFAULT 'SENT',
            "moderationStatus" "ModerationStatus" NOT NULL DEFAULT 'APPROVED',
            "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP);
        INSERT INTO "User" (id, name, image) VALUES ('alice', 'Alice', 'https://cdn/alice.png');
        INSERT INTO "ChatRoom" (id, name, "updatedAt") VALUES ('legacy', 'Legacy', now());
        "#,
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        r#"INSERT INTO "ChatMessage" (id, "roomId", "senderId", content, "createdAt")
           SELECT 'old-' || i, 'legacy', 'alice', 'old message ' || i,
                  TIMESTAMP '2026-01-01' + i * INTERVAL '1 minute'
           FROM generate_series(1, $1) AS i"#,
    )
    .bind(rows)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_app_database_takes_the_maintenance_file_first_and_rolls_back_to_the_app() {
    let db = database!();
    let pool = db.pool().await;
    create_legacy_app_schema(&pool, 50).await;
    let app_columns = columns(&pool, "ChatMessage").await;
    let store = PgStore::connect(&db.url, 2, WAIT).await.unwrap();

    // The automatic migrations would build the indexes with writes blocked: refused.
    let refused = store.migrate().await.unwrap_err().to_string();
    assert!(refused.contains("migrate --maintenance"), "{refused}");

    let mut report = Vec::new();
    postgres::run_maintenance(&db.url, &mut |line| report.push(line.to_string()))
        .await
        .unwrap();
    assert!(
        report.iter().any(|l| l.starts_with(
            "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS \"ChatMessage_roomId_seq_key\""
        )),
        "{report:#?}"
    );
    store.migrate().await.unwrap();
    // Rerunning the maintenance file is harmless.
    postgres::run_maintenance(&db.url, &mut |_| {})
        .await
        .unwrap();

    // The live path ends with the same indexes as a fresh database.
    let fresh = database!();
    let fresh_pool = fresh.migrated().await;
    assert_eq!(
        message_indexes(&pool).await,
        message_indexes(&fresh_pool).await
    );

    // The gateway reads and writes the app's enum-typed rows.
    sqlx::query(r#"INSERT INTO "ChatRoom" (id, name, "updatedAt") VALUES ('new', 'New', now())"#)
        .execute(&pool)
        .await
        .unwrap();
    let sent = store
        .insert_message(new_message("new", "alice", "hi", Some("c1")))
        .await
        .unwrap();
    assert_eq!(
        (sent.message.seq, sent.message.moderation_status.as_str()),
        (1, "APPROVED")
    );
    // And changes them: a reaction, then moderation into the app's enum column.
    let change = |op| ChangeRequest {
        room_id: "new".into(),
        target: Target::Seq(1),
        actor: "alice".into(),
        op,
        at: chrono::Utc::now(),
    };
    let reacted = store
        .change_message(change(ChangeOp::React {
            emoji: "👍".into(),
            max_keys: 20,
        }))
        .await
        .unwrap();
    assert_eq!(reacted.message.reactions.as_deref(), Some(r#"{"👍":1}"#));
    let rejected = store
        .change_message(change(ChangeOp::Moderate { status: "REJECTED" }))
        .await
        .unwrap();
    assert_eq!(
        (
            rejected.message.moderation_status.as_str(),
            rejected.message.version
        ),
        ("REJECTED", Some(3))
    );
    let status: String =
        sqlx::query_scalar(r#"SELECT "moderationStatus"::text FROM "ChatMessage" WHERE id = $1"#)
            .bind(&sent.message.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(status, "REJECTED");
    assert!(store.history("new", None, 10).await.unwrap().is_empty());

    // Rollback in the runbook's order: the maintenance down file statement by statement, then
    // the automatic migrations' down files. The app's tables and rows stay, as the app had them.
    for statement in postgres::maintenance_statements(MAINTENANCE_DOWN_SQL) {
        sqlx::raw_sql(&statement).execute(&pool).await.unwrap();
    }
    MIGRATOR.undo(&pool, 0).await.unwrap();
    assert_eq!(columns(&pool, "ChatMessage").await, app_columns);
    assert_eq!(
        tables(&pool).await,
        ["ChatMessage", "ChatRoom", "ChatRoomMember", "User"]
    );
    let rows: i64 = sqlx::query_scalar(r#"SELECT count(*) FROM "ChatMessage""#)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 51);

    // And forward again.
    postgres::run_maintenance(&db.url, &mut |_| {})
        .await
        .unwrap();
    store.migrate().await.unwrap();
    assert_eq!(
        message_indexes(&pool).await,
        message_indexes(&fresh_pool).await
    );
    store.close().await;
}

fn new_message(room: &str, sender: &str, content: &str, client_msg_id: Option<&str>) -> NewMessage {
    NewMessage {
        id: uuid::Uuid::now_v7().to_string(),
        room_id: room.into(),
        sender_id: sender.into(),
        sender_name: Some(format!("{sender} name")),
        sender_avatar_url: None,
        content: content.into(),
        created_at: chrono::Utc::now(),
        client_msg_id: client_msg_id.map(str::to_string),
        reply: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protocol_holds_on_postgres_send_history_resume_idempotency_through_both_doors() {
    let db = database!();
    let app = TestApp::spawn_on_postgres(&db.url, |_| {}).await;
    app.room("lobby", &["alice", "bob"]).await;
    let mut alice = app.client("alice").await;
    let mut bob = app.client("bob").await;
    bob.join("lobby", None).await;

    let first = alice.send("lobby", "one", "c-1").await;
    assert_eq!(first["result"]["duplicate"], false, "{first}");
    let again = alice.send("lobby", "one (retried)", "c-1").await;
    assert_eq!(again["result"]["duplicate"], true);
    assert_eq!(
        again["result"]["message"], first["result"]["message"],
        "a retry returns the stored original"
    );
    for text in ["two", "three"] {
        alice.send_ok("lobby", text).await;
    }
    let (status, rest) = app.rest_send("bob", "lobby", "four", Some("r-4")).await;
    assert_eq!(status, 201, "{rest}");
    let (status, rest_again) = app.rest_send("bob", "lobby", "four", Some("r-4")).await;
    assert_eq!(status, 200);
    assert_eq!(rest_again["message"], rest["message"]);
    let (_, five) = app.rest_send("alice", "lobby", "five", None).await;
    assert_eq!(five["message"]["seq"], 5, "a retry allocates no sequence");

    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(bob.expect_message("lobby").await);
    }
    assert_eq!(seqs(&got), [1, 2, 3, 4, 5]);
    assert_eq!(got[3]["senderName"], "bob name");

    // A rejected message is never served; history pages walk back with nextBefore.
    let pool = db.pool().await;
    sqlx::query(
        r#"UPDATE "ChatMessage" SET "moderationStatus" = 'REJECTED' WHERE "roomId" = 'lobby' AND seq = 2"#,
    )
    .execute(&pool)
    .await
    .unwrap();
    let page = alice.history("lobby", None, Some(2)).await;
    let messages: Vec<Value> = page["result"]["messages"].as_array().unwrap().clone();
    assert_eq!(seqs(&messages), [4, 5]);
    assert_eq!(page["result"]["nextBefore"], 4);
    let page = alice.history("lobby", Some(4), Some(10)).await;
    let older = page["result"]["messages"].as_array().unwrap().clone();
    assert_eq!(seqs(&older), [1, 3], "seq 2 was rejected");
    assert!(page["result"]["nextBefore"].is_null());
    let (status, rest_page) = app.rest_history("bob", "lobby", "?limit=10").await;
    assert_eq!(status, 200);
    assert_eq!(
        seqs(rest_page["messages"].as_array().unwrap()),
        [1, 3, 4, 5]
    );
    assert_eq!(rest_page["messages"][3], five["message"]);

    // Resume: a client that saw seq 1 gets exactly what it missed, then live.
    bob.close().await;
    let mut bob = app.client("bob").await;
    let joined = bob.join("lobby", Some(1)).await;
    assert_eq!(
        (joined["head"].clone(), joined["missed"].clone()),
        (json!(5), json!(3))
    );
    let mut missed = Vec::new();
    for _ in 0..3 {
        missed.push(bob.expect_message("lobby").await);
    }
    assert_eq!(seqs(&missed), [3, 4, 5]);
    alice.send_ok("lobby", "six").await;
    assert_eq!(bob.expect_message("lobby").await["seq"], 6);
    bob.expect_silence(Duration::from_millis(200)).await;

    // Side effects reach the room through the outbox and the worker.
    let deadline = Instant::now() + WAIT;
    loop {
        let (last_at, outbox): (Option<chrono::NaiveDateTime>, i64) = sqlx::query_as(
            r#"SELECT (SELECT "lastMessageAt" FROM "ChatRoom" WHERE id = 'lobby'),
                      (SELECT count(*) FROM "ChatOutbox")"#,
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if last_at.is_some() && outbox == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lastMessageAt never set / outbox not drained"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_senders_500_each_get_seqs_1_to_4000_and_every_ack_is_already_committed() {
    const SENDERS: usize = 8;
    const EACH: usize = 500;
    let db = database!();
    let app = TestApp::spawn_on_postgres(&db.url, |s| s.database.max_connections = 8).await;
    let users: Vec<String> = (0..SENDERS).map(|i| format!("sender{i}")).collect();
    let members: Vec<&str> = users.iter().map(String::as_str).collect();
    app.room("busy", &members).await;
    // Acks are checked from connections of the test's own: a row they cannot see was acked
    // before its commit.
    let observer = db.pool().await;

    let mut tasks = Vec::new();
    for user in &users {
        let mut client = app.client(user).await;
        let observer = observer.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::with_capacity(EACH);
            for i in 0..EACH {
                let m = client.send_ok("busy", &format!("message {i}")).await;
                let id = m["id"].as_str().unwrap().to_string();
                let seq = m["seq"].as_i64().unwrap();
                let committed: Option<i64> =
                    sqlx::query_scalar(r#"SELECT seq FROM "ChatMessage" WHERE id = $1"#)
                        .bind(&id)
                        .fetch_optional(&observer)
                        .await
                        .unwrap();
                assert_eq!(committed, Some(seq), "acked before commit: {m}");
                mine.push(seq);
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        let mine = tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("senders finish within 2 minutes")
            .unwrap();
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "one sender's messages are in send order"
        );
        all.extend(mine);
    }
    all.sort_unstable();
    let expected: Vec<i64> = (1..=(SENDERS * EACH) as i64).collect();
    assert_eq!(all, expected, "every seq once, no gap");
    let (stored, head): (i64, i64) = sqlx::query_as(
        r#"SELECT (SELECT count(*) FROM "ChatMessage" WHERE "roomId" = 'busy'),
                  (SELECT "lastSeq" FROM "ChatRoom" WHERE id = 'busy')"#,
    )
    .fetch_one(&observer)
    .await
    .unwrap();
    assert_eq!((stored, head), (4000, 4000));
}

/// The node types and index names of a JSON plan, depth first.
fn plan_nodes(plan: &Value, out: &mut Vec<(String, Option<String>)>) {
    out.push((
        plan["Node Type"].as_str().unwrap_or_default().to_string(),
        plan["Index Name"].as_str().map(str::to_string),
    ));
    for child in plan["Plans"].as_array().into_iter().flatten() {
        plan_nodes(child, out);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_reads_one_index_with_no_seq_scan_and_no_sort_over_200k_messages() {
    let db = database!();
    let pool = db.migrated().await;
    let started = Instant::now();
    sqlx::raw_sql(
        r#"
        INSERT INTO "ChatRoom" (id, name, "lastSeq", "updatedAt")
        SELECT 'room-' || r, 'Room ' || r, 1000, now() FROM generate_series(1, 200) AS r;
        INSERT INTO "ChatMessage" (id, "roomId", seq, "senderId", "senderName", content,
                                   "moderationStatus", "createdAt")
        SELECT 'm-' || r || '-' || s, 'room-' || r, s, 'user-' || (s % 17), 'User ' || (s % 17),
               'message ' || s || ' in room ' || r,
               CASE WHEN s % 97 = 0 THEN 'REJECTED' ELSE 'APPROVED' END,
               TIMESTAMP '2026-01-01' + (s * INTERVAL '1 second')
        FROM generate_series(1, 200) AS r, generate_series(1, 1000) AS s;
        ANALYZE "ChatRoom";
        ANALYZE "ChatMessage";
        "#,
    )
    .execute(&pool)
    .await
    .unwrap();
    let loaded: i64 = sqlx::query_scalar(r#"SELECT count(*) FROM "ChatMessage""#)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(loaded, 200_000);
    common::say(&format!(
        "history EXPLAIN: loaded {loaded} messages in 200 rooms in {:.1} s",
        started.elapsed().as_secs_f64()
    ));

    // The latest page binds `before` = i64::MAX; the store asks for limit + 1 rows (the extra one
    // tells whether an older page exists).
    let pages = [
        ("latest page", "room-137", i64::MAX),
        ("older page", "room-42", 500),
    ];
    let mut conn = pool.acquire().await.unwrap();
    // The plan for the values bound (what the first executions of the statement use) ...
    let explain = format!("EXPLAIN (ANALYZE, FORMAT JSON) {HISTORY_SQL}");
    // ... and the generic plan a long-lived prepared statement may switch to, for the same text.
    conn.execute(&*format!(
        "PREPARE history_page (text, bigint, bigint) AS {HISTORY_SQL}"
    ))
    .await
    .unwrap();
    conn.execute("SET plan_cache_mode = force_generic_plan")
        .await
        .unwrap();
    for (page, room, before) in pages {
        let bound: Value = sqlx::query_scalar(&explain)
            .bind(room)
            .bind(before)
            .bind(31_i64)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        let generic: Value = sqlx::query_scalar(&format!(
            "EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE history_page('{room}', {before}, 31)"
        ))
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        for (plan, kind) in [(bound, "bound values"), (generic, "generic plan")] {
            let label = format!("{page}, {kind}");
            let top = &plan[0];
            let mut nodes = Vec::new();
            plan_nodes(&top["Plan"], &mut nodes);
            assert!(
                nodes.iter().any(|(node, index)| {
                    (node == "Index Scan" || node == "Index Only Scan")
                        && index.as_deref() == Some(SEQ_INDEX)
                }),
                "{label}: no index scan on {SEQ_INDEX}: {nodes:?}"
            );
            assert!(
                nodes
                    .iter()
                    .all(|(node, _)| !node.contains("Seq Scan") && !node.contains("Sort")),
                "{label}: {nodes:?}"
            );
            assert_eq!(
                top["Plan"]["Actual Rows"].as_f64(),
                Some(31.0),
                "{label}: a full page"
            );
            let ms = top["Execution Time"].as_f64().unwrap();
            common::say(&format!(
                "history EXPLAIN {label}: {nodes:?}, execution time {ms:.3} ms"
            ));
            assert!(ms < 100.0, "{label}: {ms} ms");
        }
    }

    // The seed's acceptance check, for the app's readers that page by time.
    let plan: Value = sqlx::query_scalar(
        r#"EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM "ChatMessage"
           WHERE "roomId" = $1 ORDER BY "createdAt" DESC LIMIT 30"#,
    )
    .bind("room-7")
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    let mut nodes = Vec::new();
    plan_nodes(&plan[0]["Plan"], &mut nodes);
    assert!(
        nodes.iter().any(|(node, index)| node == "Index Scan"
            && index.as_deref() == Some("ChatMessage_roomId_createdAt_idx")),
        "{nodes:?}"
    );
    assert!(
        nodes.iter().all(|(node, _)| !node.contains("Sort")),
        "{nodes:?}"
    );
    common::say(&format!(
        "history EXPLAIN seed's time-ordered page: {nodes:?}, execution time {:.3} ms",
        plan[0]["Execution Time"].as_f64().unwrap()
    ));
}

/// Legacy rows (no seq, no sender name) in `rooms`, `per_room` each, some sharing a createdAt.
async fn insert_legacy_rows(pool: &PgPool, rooms: &[&str], per_room: i64) {
    sqlx::raw_sql(
        r#"INSERT INTO "User" (id, name, image) VALUES
             ('ann', 'Ann', 'https://cdn/ann.png'), ('ben', 'Ben', NULL)"#,
    )
    .execute(pool)
    .await
    .unwrap();
    for room in rooms {
        sqlx::query(
            r#"INSERT INTO "ChatMessage" (id, "roomId", "senderId", content, "createdAt")
               SELECT 'legacy-' || $1 || '-' || lpad(i::text, 6, '0'), $1,
                      (ARRAY['ann', 'ben', 'gone'])[1 + i % 3], 'legacy ' || i,
                      TIMESTAMP '2026-01-01' + (i / 2) * INTERVAL '1 second'
               FROM generate_series(1, $2) AS i"#,
        )
        .bind(room)
        .bind(per_room)
        .execute(pool)
        .await
        .unwrap();
    }
}

/// Per room: the seqs are exactly 1..=lastSeq (none missing, none twice, none NULL), and legacy
/// rows are numbered in (createdAt, id) order.
async fn assert_rooms_consistent(pool: &PgPool, rooms: &[&str]) {
    for room in rooms {
        let (rows, distinct, min, max, nulls, head): (
            i64,
            i64,
            Option<i64>,
            Option<i64>,
            i64,
            i64,
        ) = sqlx::query_as(
            r#"SELECT count(*), count(DISTINCT seq), min(seq), max(seq),
                          count(*) FILTER (WHERE seq IS NULL),
                          (SELECT "lastSeq" FROM "ChatRoom" WHERE id = $1)
                   FROM "ChatMessage" WHERE "roomId" = $1"#,
        )
        .bind(room)
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(nulls, 0, "{room}: unnumbered rows left");
        assert_eq!(
            (distinct, min, max, head),
            (rows, Some(1), Some(rows), rows),
            "{room}: seqs are not exactly 1..=lastSeq"
        );
        let out_of_order: i64 = sqlx::query_scalar(
            r#"SELECT count(*) FROM (
                 SELECT seq, lag(seq) OVER (ORDER BY "createdAt", id) AS before
                 FROM "ChatMessage" WHERE "roomId" = $1 AND id LIKE 'legacy-%') AS t
               WHERE seq < before"#,
        )
        .bind(room)
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(out_of_order, 0, "{room}: legacy rows out of time order");
    }
}

/// Mid-way (stopped): the numbered rows of each room are exactly 1..=lastSeq.
async fn assert_rooms_consistent_so_far(pool: &PgPool, rooms: &[&str]) {
    for room in rooms {
        let (numbered, distinct, max, head): (i64, i64, Option<i64>, i64) = sqlx::query_as(
            r#"SELECT count(seq), count(DISTINCT seq), max(seq),
                      (SELECT "lastSeq" FROM "ChatRoom" WHERE id = $1)
               FROM "ChatMessage" WHERE "roomId" = $1"#,
        )
        .bind(room)
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(
            (distinct, max, head),
            (numbered, Some(numbered), numbered),
            "{room}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_numbers_legacy_rows_and_fills_senders_while_live_sends_continue() {
    let db = database!();
    let rooms = ["alpha", "beta", "gamma"];
    let app = TestApp::spawn_on_postgres(&db.url, |_| {}).await;
    for room in rooms {
        app.room(room, &["ann", "live"]).await;
    }
    let pool = db.pool().await;
    insert_legacy_rows(&pool, &rooms, 1500).await;
    // Live messages before the backfill get the first seqs.
    for room in rooms {
        let (status, _) = app
            .rest_send("live", room, "before the backfill", None)
            .await;
        assert_eq!(status, 201);
    }

    let options = BackfillOptions {
        batch: 500,
        pause: Duration::from_millis(1),
        dry_run: true,
    };
    let never = CancellationToken::new();
    let dry = backfill::run(&pool, &options, &never, &mut |_| {})
        .await
        .unwrap();
    // Ann's and Ben's rows (Ben has no image); nobody's for the user "gone".
    let expected_plan = Plan {
        senders: 3 * 1000,
        unsequenced: 3 * 1500,
        rooms: 3,
    };
    assert_eq!(dry.plan, expected_plan);
    assert_eq!(
        backfill::plan(&pool).await.unwrap(),
        expected_plan,
        "a dry run changes nothing"
    );

    // Live traffic into every room for the whole run.
    let sending = Arc::new(AtomicBool::new(true));
    let live = {
        let (sending, http, url, token) = (
            sending.clone(),
            app.http.clone(),
            app.url(""),
            app.token("live"),
        );
        tokio::spawn(async move {
            let mut sent = HashMap::<String, Vec<i64>>::new();
            let mut i = 0;
            while sending.load(Ordering::Relaxed) {
                let room = ["alpha", "beta", "gamma"][i % 3];
                i += 1;
                let r = http
                    .post(format!("{url}/api/chat/rooms/{room}/messages"))
                    .bearer_auth(&token)
                    .json(&json!({"content": format!("live {i}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
                let body: Value = r.json().await.unwrap();
                sent.entry(room.to_string())
                    .or_default()
                    .push(body["message"]["seq"].as_i64().unwrap());
            }
            sent
        })
    };

    // Stopped in the sequence pass (6 sender batches, then 2), as an operator's Ctrl-C would.
    let stop = CancellationToken::new();
    let mut batches = 0;
    let options = BackfillOptions {
        dry_run: false,
        ..options
    };
    let mut lines = Vec::new();
    let first = backfill::run(&pool, &options, &stop, &mut |p| {
        batches += 1;
        lines.push(p.to_string());
        if batches == 8 {
            stop.cancel();
        }
    })
    .await
    .unwrap();
    assert!(!first.finished);
    assert_eq!(first.sequenced, 1000, "{lines:?}");
    assert!(
        lines[0].starts_with("sender names: 500/3000 (16.7%), "),
        "{lines:?}"
    );
    assert!(
        lines[7].starts_with("sequence numbers: 1000/4500 (22.2%), "),
        "{lines:?}"
    );
    assert_rooms_consistent_so_far(&pool, &rooms).await;

    // Rerun to finish, traffic still flowing.
    let second = backfill::run(&pool, &options, &never, &mut |_| {})
        .await
        .unwrap();
    assert!(second.finished);
    assert_eq!(
        first.senders_filled + second.senders_filled,
        3000,
        "each row filled once"
    );
    assert_eq!(
        first.sequenced + second.sequenced,
        4500,
        "each row numbered once"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    sending.store(false, Ordering::Relaxed);
    let sent = tokio::time::timeout(WAIT, live).await.unwrap().unwrap();
    for room in rooms {
        let seqs = &sent[room];
        assert!(seqs.len() > 1, "{room}: live sends ran during the backfill");
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    }
    assert_rooms_consistent(&pool, &rooms).await;

    let (ann, ben, gone): (i64, i64, i64) = sqlx::query_as(
        r#"SELECT count(*) FILTER (WHERE "senderId" = 'ann' AND "senderName" = 'Ann'
                                     AND "senderAvatarUrl" = 'https://cdn/ann.png'),
                  count(*) FILTER (WHERE "senderId" = 'ben' AND "senderName" = 'Ben'
                                     AND "senderAvatarUrl" IS NULL),
                  count(*) FILTER (WHERE "senderId" = 'gone' AND "senderName" IS NULL)
           FROM "ChatMessage" WHERE id LIKE 'legacy-%'"#,
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((ann, ben, gone), (1500, 1500, 1500), "ann, ben, gone");
    let live_name: String = sqlx::query_scalar(
        r#"SELECT DISTINCT "senderName" FROM "ChatMessage" WHERE "senderId" = 'live'"#,
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(live_name, "live name", "names the gateway wrote are kept");

    // Idempotent: a rerun finds nothing and changes nothing.
    let third = backfill::run(&pool, &options, &never, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(
        third,
        Outcome {
            finished: true,
            ..Outcome::default()
        }
    );
    // And the gateway carries on from the new head.
    let (_, after) = app
        .rest_send("ann", "alpha", "after the backfill", None)
        .await;
    let head: i64 = sqlx::query_scalar(r#"SELECT "lastSeq" FROM "ChatRoom" WHERE id = 'alpha'"#)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(after["message"]["seq"], head);
    let (_, page) = app.rest_history("ann", "alpha", "?limit=50").await;
    let page_seqs = seqs(page["messages"].as_array().unwrap());
    assert_eq!(page_seqs.len(), 50);
    assert!(
        page_seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "{page_seqs:?}"
    );
}

/// Retries a send with the same clientMsgId until it is acknowledged; every failure on the way
/// must be the retriable `unavailable`.
async fn send_until_acked(client: &mut common::Client, room: &str, text: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reply = client.send(room, text, id).await;
        if reply["type"] == "result" {
            return reply["result"].clone();
        }
        assert_eq!(reply["error"]["code"], "unavailable", "{reply}");
        assert!(reply["error"]["retryAfterMs"].as_u64().is_some());
        assert!(Instant::now() < deadline, "the gateway did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_unreachable_sends_fail_retriably_unacked_and_the_gateway_recovers() {
    let db = database!();
    let proxy = CuttableProxy::start(postgres_addr(&db.url).await).await;
    let app = TestApp::spawn_on_postgres(&with_host(&db.url, proxy.addr), |s| {
        s.database.acquire_timeout_ms = 500;
    })
    .await;
    app.room("r", &["alice"]).await;
    let mut alice = app.client("alice").await;
    assert_eq!(alice.send_ok("r", "before").await["seq"], 1);

    proxy.cut();
    for attempt in 0..3 {
        let reply = alice.send("r", "during", "c-during").await;
        assert_eq!(
            reply["error"]["code"], "unavailable",
            "attempt {attempt}: {reply}"
        );
        assert!(reply["error"]["retryAfterMs"].as_u64().is_some());
    }
    let (status, body) = app.rest_send("alice", "r", "during", Some("c-rest")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "not ready without the database");

    let pool = db.pool().await;
    let stored: i64 = sqlx::query_scalar(r#"SELECT count(*) FROM "ChatMessage""#)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 1, "nothing was written while unreachable");

    proxy.restore();
    let during = send_until_acked(&mut alice, "r", "during", "c-during").await;
    assert_eq!(
        (
            during["message"]["seq"].clone(),
            during["duplicate"].clone()
        ),
        (json!(2), json!(false)),
        "the refused send was not stored: its retry is new, and no seq was lost"
    );
    assert_eq!(alice.send_ok("r", "after").await["seq"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_connections_fail_sends_retriably_and_the_pool_reconnects() {
    let db = database!();
    let app = TestApp::spawn_on_postgres(&db.url, |_| {}).await;
    app.room("r", &["alice"]).await;
    let mut alice = app.client("alice").await;
    let pool = db.pool().await;
    let mut acked = Vec::new();
    for round in 0..3 {
        // Warm several pooled connections, then kill every one of the gateway's.
        for i in 0..4 {
            acked.push(alice.send_ok("r", &format!("round {round} warm {i}")).await);
        }
        let killed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name LIKE 'chat-gateway%') AS t",
        )
        .bind(&db.name)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert!(killed >= 1, "the gateway holds connections");
        for i in 0..4 {
            let id = format!("round-{round}-after-{i}");
            let result = send_until_acked(&mut alice, "r", "after a kill", &id).await;
            acked.push(result["message"].clone());
        }
    }
    let acked_seqs = seqs(&acked);
    assert_eq!(
        acked_seqs,
        (1..=24).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
    let stored: Vec<i64> =
        sqlx::query_scalar(r#"SELECT seq FROM "ChatMessage" WHERE "roomId" = 'r' ORDER BY seq"#)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(stored, acked_seqs, "stored exactly what was acked");
}

/// A TCP proxy in front of Postgres that counts the `Sync` messages the gateway's writer
/// connections (application name `chat-gateway writer`) send: one per round trip of the extended
/// query protocol.
struct SyncCounter {
    addr: std::net::SocketAddr,
    writer_syncs: Arc<AtomicUsize>,
}

impl SyncCounter {
    async fn start(target: std::net::SocketAddr) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let writer_syncs = Arc::new(AtomicUsize::new(0));
        let syncs = writer_syncs.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let syncs = syncs.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut from_client, mut to_client) = inbound.into_split();
                    let (mut from_server, mut to_server) = outbound.into_split();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
                    });
                    let (mut pending, mut chunk) = (Vec::new(), vec![0u8; 16384]);
                    let (mut started, mut writer) = (false, false);
                    loop {
                        let n = match from_client.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if to_server.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                        pending.extend_from_slice(&chunk[..n]);
                        loop {
                            // Before the startup message: length, code, body; after: type,
                            // length (counting itself), body.
                            let header = if started { 5 } else { 8 };
                            if pending.len() < header {
                                break;
                            }
                            let at = usize::from(started);
                            let len = u32::from_be_bytes(pending[at..at + 4].try_into().unwrap());
                            let size = at + len as usize;
                            if pending.len() < size {
                                break;
                            }
                            let message: Vec<u8> = pending.drain(..size).collect();
                            if started {
                                if writer && message[0] == b'S' {
                                    syncs.fetch_add(1, Ordering::SeqCst);
                                }
                            } else if message[4..8] != [0x04, 0xd2, 0x16, 0x2f] {
                                // Not an SSLRequest (answered `N` with sslmode=disable): the
                                // startup message, with the application name.
                                started = true;
                                writer = message
                                    .windows(b"chat-gateway writer".len())
                                    .any(|w| w == b"chat-gateway writer");
                            }
                        }
                    }
                });
            }
        });
        SyncCounter { addr, writer_syncs }
    }

    fn writer_syncs(&self) -> usize {
        self.writer_syncs.load(Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_costs_its_writer_one_round_trip_and_no_test_of_the_connection_after_it() {
    let db = database!();
    let counter = SyncCounter::start(postgres_addr(&db.url).await).await;
    let url = with_host(&db.url, counter.addr);
    let separator = if url.contains('?') { '&' } else { '?' };
    let app = TestApp::spawn_on_postgres(&format!("{url}{separator}sslmode=disable"), |_| {}).await;
    app.room("r", &["alice"]).await;
    let mut alice = app.client("alice").await;
    // The first sends prepare the writer's statement on each connection.
    for i in 0..8 {
        alice.send_ok("r", &format!("warm {i}")).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = counter.writer_syncs();
    for i in 0..20 {
        alice.send_ok("r", &format!("message {i}")).await;
    }
    // A pool would test each connection given back to it after the ack, in the background.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let syncs = counter.writer_syncs() - before;
    assert!(before > 0, "the proxy saw the writers' connections");
    assert_eq!(
        syncs, 20,
        "20 sends one after another: one statement each, one round trip to Postgres, nothing more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_text_round_trips_byte_for_byte_and_nul_is_refused_through_both_doors() {
    let db = database!();
    let app = TestApp::spawn_on_postgres(&db.url, |_| {}).await;
    app.room("r", &["alice"]).await;
    let mut alice = app.client("alice").await;
    let texts = [
        r#"it's "quoted" `backticked` \back\slashed\ \x00 \0"#,
        "'); DROP TABLE \"ChatMessage\"; -- $1 %s :name ?",
        "emoji 👋🏽 family 👨‍👩‍👧 flag 🇫🇷 zero-width\u{200b}joiner",
        "مرحبا بالعالم \u{202e}RTL override\u{202c} שלום",
        "tab\tnew\nline\r\nend",
    ];
    let mut sent = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let m = if i % 2 == 0 {
            alice.send_ok("r", text).await
        } else {
            let (status, body) = app.rest_send("alice", "r", text, None).await;
            assert_eq!(status, 201, "{body}");
            body["message"].clone()
        };
        assert_eq!(m["content"], *text);
        sent.push(m);
    }
    let pool = db.pool().await;
    let stored: Vec<String> =
        sqlx::query_scalar(r#"SELECT content FROM "ChatMessage" ORDER BY seq"#)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(stored, texts, "stored byte for byte");
    let (_, page) = app.rest_history("alice", "r", "?limit=10").await;
    let page = page["messages"].as_array().unwrap();
    assert_eq!(page.len(), sent.len());
    // Socket results and REST messages are objects of their own doors; what both carry agrees.
    for (listed, sent) in page.iter().zip(&sent) {
        for field in [
            "id",
            "seq",
            "senderId",
            "content",
            "clientMsgId",
            "senderName",
        ] {
            assert_eq!(listed[field], sent[field], "{field}: {listed} vs {sent}");
        }
    }

    let reply = alice.send("r", "nul \u{0} inside", "c-nul").await;
    assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
    assert!(
        reply["error"]["message"].as_str().unwrap().contains("NUL"),
        "{reply}"
    );
    let reply = alice.send("r", "nul in the key", "c-\u{0}").await;
    assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
    let (status, body) = app.rest_send("alice", "r", "nul \u{0} inside", None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("NUL"));
    assert_eq!(
        alice.send_ok("r", "after").await["seq"],
        texts.len() + 1,
        "refused sends allocate no seq"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_maps_failures_to_retriable_and_invalid_errors() {
    let db = database!();
    db.migrated().await;
    let store = PgStore::connect(&db.url, 1, Duration::from_millis(500))
        .await
        .unwrap();
    store.ensure_room("r", "r").await.unwrap();
    let err = store
        .insert_message(new_message("r", "a", "x\0y", None))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    // NUL reaching Postgres some other way is classified the same.
    let err = store.access("r", "nul\0user").await.unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    assert!(matches!(
        store
            .insert_message(new_message("nope", "a", "x", None))
            .await,
        Err(StoreError::RoomNotFound)
    ));

    store.ping().await.unwrap();
    let pool = db.pool().await;
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND application_name LIKE 'chat-gateway%'",
    )
    .bind(&db.name)
    .execute(&pool)
    .await
    .unwrap();
    let err = store.ping().await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    let deadline = Instant::now() + WAIT;
    while store.ping().await.is_err() {
        assert!(Instant::now() < deadline, "the pool did not reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_migrates_says_what_it_skipped_and_backfills_dry() {
    let db = database!();
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_chat-gateway"))
            .args(args)
            .current_dir(dir.path())
            .env("DATABASE_URL", &db.url)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{args:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let out = run(&["migrate"]);
    assert!(
        out.contains("skipped migrations/postgres-maintenance/20261127000100_live_database.sql")
            && out.contains("maintenance window")
            && out.contains("migrate --maintenance"),
        "{out}"
    );
    let out = run(&["migrate", "--maintenance"]);
    assert!(out.contains("CREATE"), "{out}");
    let out = run(&["backfill", "--dry-run"]);
    assert!(
        out.contains("0 messages without a sequence") && out.contains("dry run: nothing changed"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_sends_of_one_client_msg_id_store_it_once_and_allocate_one_seq() {
    let db = database!();
    db.migrated().await;
    let store = Arc::new(PgStore::connect(&db.url, 8, WAIT).await.unwrap());
    store.ensure_room("r", "r").await.unwrap();
    for round in 0..20 {
        let key = format!("retry-{round}");
        let attempts: Vec<_> = (0..8)
            .map(|_| {
                let (store, key) = (store.clone(), key.clone());
                tokio::spawn(async move {
                    store
                        .insert_message(new_message("r", "alice", "once", Some(&key)))
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut originals = 0;
        let mut ids = std::collections::HashSet::new();
        for attempt in attempts {
            let inserted = attempt.await.unwrap();
            originals += usize::from(!inserted.duplicate);
            ids.insert((inserted.message.id, inserted.message.seq));
        }
        assert_eq!(originals, 1, "round {round}: stored once");
        assert_eq!(
            ids.len(),
            1,
            "round {round}: every attempt answered with the original"
        );
        assert_eq!(ids.into_iter().next().unwrap().1, round + 1, "no seq lost");
    }
    assert_eq!(store.room_head("r").await.unwrap(), Some(20));
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_marks_and_sends_from_many_nodes_in_any_order_never_deadlock() {
    use chat_gateway::store::{ReadMark, StoreMetrics};
    use rand::seq::SliceRandom;
    let db = database!();
    let store = Arc::new(PgStore::connect(&db.url, 8, WAIT).await.unwrap());
    store.migrate().await.unwrap();
    let rooms: Vec<String> = (0..20).map(|r| format!("room-{r}")).collect();
    let users: Vec<String> = (0..5).map(|u| format!("user-{u}")).collect();
    for room in &rooms {
        store.create_room(room, room).await.unwrap();
        for user in &users {
            store.add_member(room, user).await.unwrap();
        }
    }
    // Four workers (as on four nodes) write the same memberships, each batch in an order of its
    // own, as batches coalesced in hash maps come out; meanwhile sends lock the rooms' rows.
    let seq = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (store, rooms, users, seq) = (store.clone(), rooms.clone(), users.clone(), seq.clone());
        workers.push(tokio::spawn(async move {
            for i in 0..100 {
                let mut marks: Vec<ReadMark> = rooms
                    .iter()
                    .flat_map(|r| users.iter().map(move |u| (r.clone(), u.clone())))
                    .map(|(room_id, user_id)| ReadMark {
                        room_id,
                        user_id,
                        seq: seq.fetch_add(1, Ordering::Relaxed),
                        at: chrono::Utc::now(),
                    })
                    .collect();
                marks.shuffle(&mut rand::rng());
                store.mark_read(&marks).await.unwrap();
                let room = &rooms[(w * 7 + i) % rooms.len()];
                store
                    .insert_message(new_message(room, "user-0", "hi", None))
                    .await
                    .unwrap();
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let Some(StoreMetrics::Postgres(counted)) = store.metrics() else {
        panic!("the Postgres store counts its retries");
    };
    let retried = counted
        .retries
        .get_or_create(&vec![("reason", "deadlock")])
        .get();
    // The database's own count (its statistics are flushed within a second or so).
    let pool = db.pool().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let deadlocks: i64 = sqlx::query_scalar(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (deadlocks, retried),
        (0, 0),
        "deadlocks detected by Postgres, writes retried after one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_are_written_in_group_commits_with_every_rule_of_a_single_send() {
    use chat_gateway::store::StoreMetrics;
    let db = database!();
    let store = Arc::new(PgStore::connect(&db.url, 8, WAIT).await.unwrap());
    store.migrate().await.unwrap();
    let rooms: Vec<String> = (0..5).map(|r| format!("room-{r}")).collect();
    for room in &rooms {
        store.create_room(room, room).await.unwrap();
    }
    // A key stored before, sent again in the storm.
    let before = store
        .insert_message(new_message("room-0", "alice", "before", Some("k-before")))
        .await
        .unwrap();
    // 400 sends at once: most to the five rooms, some keys twice, some to a room that is gone.
    let mut sends = Vec::new();
    for i in 0..400 {
        let store = store.clone();
        let (room, key) = match i % 10 {
            9 => ("no-such-room".to_string(), Some(format!("k{i}"))),
            8 => ("room-0".to_string(), Some("k-before".to_string())),
            7 => ("room-1".to_string(), Some(format!("k{}", i - 1))),
            _ => (format!("room-{}", i % 5), Some(format!("k{i}"))),
        };
        sends.push(tokio::spawn(async move {
            let sender = if i % 10 == 8 { "alice" } else { "bob" };
            let outcome = store
                .insert_message(new_message(&room, sender, &format!("m{i}"), key.as_deref()))
                .await;
            (i, room, key, outcome)
        }));
    }
    let mut per_room: HashMap<String, Vec<i64>> = HashMap::new();
    let mut by_key: HashMap<String, String> = HashMap::new();
    let mut answers = vec![before.message.clone()];
    for send in sends {
        let (i, room, key, outcome) = send.await.unwrap();
        if let Ok(inserted) = &outcome {
            answers.push(inserted.message.clone());
        }
        match (i % 10, outcome) {
            (9, Err(StoreError::RoomNotFound)) => {}
            (8, Ok(inserted)) => {
                assert!(inserted.duplicate);
                assert_eq!(inserted.message, before.message, "the stored original");
            }
            (_, Ok(inserted)) => {
                let key = key.unwrap();
                // A key sent twice is stored once: both answers are the same message.
                match by_key.get(&key) {
                    Some(id) => assert_eq!(id, &inserted.message.id, "{key}"),
                    None => {
                        by_key.insert(key, inserted.message.id.clone());
                    }
                }
                if !inserted.duplicate {
                    per_room.entry(room).or_default().push(inserted.message.seq);
                }
            }
            (_, other) => panic!("send {i}: {other:?}"),
        }
    }
    // Every room's sequence is gap-free, one number per stored message.
    for (room, mut seqs) in per_room {
        seqs.sort_unstable();
        let first = if room == "room-0" { 2 } else { 1 };
        assert_eq!(
            seqs,
            (first..first + seqs.len() as i64).collect::<Vec<_>>(),
            "{room}"
        );
    }
    let pool = db.pool().await;
    let (stored, distinct): (i64, i64) = sqlx::query_as(
        r#"SELECT count(*), count(DISTINCT ("roomId", "clientMsgId")) FROM "ChatMessage""#,
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(stored, distinct, "no key stored twice");
    assert_eq!(stored as usize, by_key.len() + 1);
    // Every answer, fresh or repeated, single or batched, is the message as history reads it,
    // field for field (the time in whole milliseconds, though the send's had microseconds).
    let mut history = HashMap::new();
    for room in &rooms {
        for m in store.history(room, None, 1000).await.unwrap() {
            history.insert((m.room_id.clone(), m.seq), m);
        }
    }
    for answer in &answers {
        assert_eq!(
            Some(answer),
            history.get(&(answer.room_id.clone(), answer.seq))
        );
    }
    // And they were written together: fewer commits than sends.
    let Some(StoreMetrics::Postgres(counted)) = store.metrics() else {
        panic!("the Postgres store counts its batches");
    };
    let batches = common::observations(&counted.send_batch_size);
    common::say(&format!(
        "postgres group commit: 401 sends in {batches} commits"
    ));
    assert!(
        batches < 400.0,
        "{batches} commits for 400 concurrent sends"
    );
}

/// Two nodes (two stores on one database) change the same messages at once: reactions of many
/// users, edits of one sender, deletions. Each node writes its changes in batches; a batch that
/// meets a message the other node changed since its read is written again change by change.
/// Whatever interleaving happens, every change is stored once under its own seq, the room's
/// sequence has no gap, the counts match the rows, and nothing deadlocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_from_two_nodes_at_once_are_batched_and_lose_no_update() {
    use chat_gateway::store::StoreMetrics;
    let db = database!();
    let a = Arc::new(PgStore::connect(&db.url, 4, WAIT).await.unwrap());
    a.migrate().await.unwrap();
    let b = Arc::new(PgStore::connect(&db.url, 4, WAIT).await.unwrap());
    a.ensure_room("r", "r").await.unwrap();
    for i in 0..4 {
        a.insert_message(new_message("r", "alice", &format!("m{i}"), None))
            .await
            .unwrap();
    }
    let counters = |s: &PgStore| match s.metrics() {
        Some(StoreMetrics::Postgres(c)) => c,
        _ => panic!("the Postgres store counts its batches"),
    };
    let change = |target: i64, actor: String, op: ChangeOp| ChangeRequest {
        room_id: "r".into(),
        target: Target::Seq(target),
        actor,
        op,
        at: chrono::Utc::now(),
    };
    let mut stored = 0i64;
    let mut rounds = 0;
    // Rounds until both nodes have batched and at least one batch lost a race (bounded).
    while rounds < 10 {
        rounds += 1;
        let mut tasks = Vec::new();
        for i in 0..120 {
            let node = if i % 2 == 0 { a.clone() } else { b.clone() };
            let req = match i % 6 {
                // Alice's edits of message 4 from both nodes, each with a key of its own.
                5 => change(
                    4,
                    "alice".into(),
                    ChangeOp::Edit {
                        content: format!("edit {rounds}-{i}"),
                        client_change_id: Some(format!("e{rounds}-{i}")),
                        window: None,
                    },
                ),
                k => change(
                    1 + k % 3,
                    format!("u{rounds}-{i}"),
                    ChangeOp::React {
                        emoji: ["👍", "🎉"][(i % 2) as usize].into(),
                        max_keys: 20,
                    },
                ),
            };
            tasks.push(tokio::spawn(async move { node.change_message(req).await }));
        }
        for task in tasks {
            let changed = task.await.unwrap().expect("every change is stored");
            assert!(!changed.duplicate && changed.change.is_some());
            stored += 1;
        }
        let races = counters(&a).change_batch_races.get() + counters(&b).change_batch_races.get();
        if races > 0 {
            break;
        }
    }
    // Every change took one number, and the messages' counts and versions are their rows'.
    let pool = db.pool().await;
    let rows: Vec<(i64, String, i64)> = sqlx::query_as(common::REACTION_ROWS_SQL)
        .fetch_all(&pool)
        .await
        .unwrap();
    let last: Vec<(i64, i64)> = sqlx::query_as(common::LAST_CHANGES_SQL)
        .fetch_all(&pool)
        .await
        .unwrap();
    let head = common::assert_changes_add_up(a.as_ref(), "r", &[1, 2, 3, 4], &rows, &last).await;
    assert_eq!(head, 4 + stored);
    let races = counters(&a).change_batch_races.get() + counters(&b).change_batch_races.get();
    let batches = common::observations(&counters(&a).change_batch_size)
        + common::observations(&counters(&b).change_batch_size);
    common::say(&format!(
        "postgres change batches: {stored} changes from two nodes in {batches} batches, \
         {races} written again after a race, {rounds} round(s)"
    ));
    assert!(
        batches < stored as f64,
        "{batches} batches for {stored} changes"
    );
    assert!(
        races > 0,
        "no batch met the other node's change in {rounds} rounds"
    );
    let deadlocks: i64 = sqlx::query_scalar(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(deadlocks, 0);

    // What a node remembers of a message never decides against the store: node a changed
    // message 1 last; node b deletes it; a reaction through a is refused as the store says.
    let edit = |content: &str, key: &str| {
        change(
            4,
            "alice".into(),
            ChangeOp::Edit {
                content: content.into(),
                client_change_id: Some(key.into()),
                window: None,
            },
        )
    };
    let react = |user: &str| {
        let op = ChangeOp::React {
            emoji: "👍".into(),
            max_keys: 20,
        };
        change(1, user.into(), op)
    };
    a.change_message(react("late-1")).await.unwrap();
    b.change_message(change(1, "alice".into(), ChangeOp::Delete { any: false }))
        .await
        .unwrap();
    let refused = a.change_message(react("late-2")).await;
    assert!(
        matches!(refused, Err(StoreError::Refused(Refusal::Deleted))),
        "{refused:?}"
    );
    // An edit retried through the node that stored it is answered with the stored change.
    let first = a.change_message(edit("final", "k-final")).await.unwrap();
    let retry = a.change_message(edit("final", "k-final")).await.unwrap();
    assert!(retry.duplicate);
    assert_eq!(
        retry.change.map(|c| c.seq),
        first.change.map(|c| c.seq),
        "the retry's answer is the first attempt's change"
    );
}
