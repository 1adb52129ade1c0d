//! Frame decode and encode: every request a socket sends is decoded once, every message is
//! encoded once per room (and shared by all its sockets), every request gets one reply.

mod common;

use std::hint::black_box;

use chat_gateway::protocol::{self, ClientFrame, HistoryPage, SendResult, ServerFrame};
use chat_gateway::wire;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const SEND: &str = r#"{"type":"send","id":42,"room":"general","content":"Shipping the release at five; shout in this room if anything in the checklist is still open.","clientMsgId":"c-5f0e2a71"}"#;
const JOIN: &str = r#"{"type":"join","id":"j-7","room":"general","since":1041}"#;

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for (name, text) in [("send", SEND), ("join", JOIN)] {
        // A bench that decodes into an error would measure the error path instead.
        assert!(protocol::decode(text).is_ok(), "{name} frame decodes");
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                protocol::decode(black_box(text))
                    .map(|f: ClientFrame| black_box(f).id().is_number())
            })
        });
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    let message = common::message("general", 1042);

    // The `message` push: built once per message, whatever the number of receivers (the
    // message serialized once, the push cut from it).
    group.bench_function("message_push", |b| {
        b.iter(|| {
            wire::published(
                black_box(&message.room_id),
                &wire::message_json(black_box(&message)),
            )
        })
    });

    // The reply to `send` (the sender's ack).
    let id = serde_json::json!(42);
    group.bench_function("send_result", |b| {
        b.iter(|| {
            protocol::encode(&ServerFrame::Result {
                id: black_box(&id),
                result: SendResult {
                    message: wire::socket_message(black_box(&message)),
                    duplicate: false,
                },
            })
        })
    });

    // A history page of the default size (`limits.history_default_limit` = 30): what every cache
    // miss serializes.
    let rows: Vec<_> = (1013..1043)
        .map(|seq| common::message("general", seq))
        .collect();
    let page = |rows: &[chat_gateway::store::Message]| {
        protocol::encode(&HistoryPage {
            room: "general".into(),
            messages: rows.iter().map(wire::socket_message).collect(),
            next_before: rows.first().map(|m| m.seq),
            my_reactions: None,
        })
    };
    group.throughput(Throughput::Bytes(page(&rows).len() as u64));
    group.bench_function("history_page_30", |b| b.iter(|| page(black_box(&rows))));
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = decode, encode
}
criterion_main!(benches);
