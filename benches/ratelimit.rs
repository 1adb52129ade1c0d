//! The in-process send rate limit: every send checks the user's budget, then the room's.
//!
//! - `ratelimit/allowed`: both budgets have room (a quota no sender reaches), keys spread over
//!   1,000 users and 100 rooms that already have buckets: the path of every accepted send.
//! - `ratelimit/refused`: the default quota (3/s, burst 5) and one user past it: the refusal and
//!   its `retry_after`, what a flooding client costs.

mod common;

use std::hint::black_box;

use chat_gateway::config::Settings;
use chat_gateway::ratelimit::{MemoryRateLimiter, RateLimiter, Scope};
use criterion::{Criterion, criterion_group, criterion_main};

fn ratelimit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("ratelimit");

    let mut roomy = Settings::defaults().rate_limit;
    roomy.user_per_second = 1_000_000_000;
    roomy.room_per_second = 1_000_000_000;
    roomy.user_burst = 1_000;
    roomy.room_burst = 1_000;
    let limiter = MemoryRateLimiter::new(&roomy);
    let users: Vec<String> = (0..1_000).map(|i| format!("user-{i}")).collect();
    let rooms: Vec<String> = (0..100).map(|i| format!("room-{i}")).collect();
    let pair = |i: usize| (&users[i % users.len()], &rooms[i % rooms.len()]);
    for i in 0..users.len() {
        let (user, room) = pair(i);
        assert!(rt.block_on(limiter.check_send(user, room)).is_ok());
    }
    let mut i = 0;
    group.bench_function("allowed", |b| {
        b.to_async(&rt).iter(|| {
            i += 1;
            let (user, room) = pair(i);
            limiter.check_send(black_box(user), black_box(room))
        })
    });
    let (user, room) = pair(i + 1);
    assert!(rt.block_on(limiter.check_send(user, room)).is_ok());

    let defaults = Settings::defaults().rate_limit;
    let limiter = MemoryRateLimiter::new(&defaults);
    for _ in 0..defaults.user_burst {
        assert!(
            rt.block_on(limiter.check_send("flooder", "general"))
                .is_ok()
        );
    }
    group.bench_function("refused", |b| {
        b.to_async(&rt)
            .iter(|| limiter.check_send(black_box("flooder"), black_box("general")))
    });
    let refused = rt.block_on(limiter.check_send("flooder", "general"));
    assert_eq!(refused.map_err(|r| r.scope), Err(Scope::User));
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = ratelimit
}
criterion_main!(benches);
