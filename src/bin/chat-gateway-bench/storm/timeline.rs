//! The storm as it happened: CPU and RSS between two moments, the step-by-step timeline around
//! the drop, and the slow messages (`--slow-ms`).

use std::collections::HashMap;

use super::member::MemberReport;
use super::probe::{ProbeSide, Sampled};
use crate::gateway::ProcSample;
use crate::report::histogram_of;

/// CPU (% of a core) and the highest RSS (KiB) between two moments, from the samples.
pub(super) fn usage_between(
    samples: &[Sampled],
    from: u64,
    to: u64,
    of: impl Fn(&Sampled) -> Option<ProcSample>,
) -> Option<(f64, u64)> {
    let within: Vec<(u64, ProcSample)> = samples
        .iter()
        .filter(|s| s.t >= from && s.t <= to)
        .filter_map(|s| of(s).map(|p| (s.t, p)))
        .collect();
    let (first, last) = (within.first()?, within.last()?);
    let secs = (last.0 - first.0) as f64 / 1e6;
    let cpu = if secs > 0.0 {
        100.0 * (last.1.cpu_secs - first.1.cpu_secs) / secs
    } else {
        0.0
    };
    let rss = within.iter().map(|(_, p)| p.rss_kib).max().unwrap_or(0);
    Some((cpu, rss))
}

/// The storm step by step (a quarter of a second, or longer so that it fits in 40 lines): from a
/// second before the drop to two seconds after the last client is back.
pub(super) fn print_timeline(
    probes: &ProbeSide,
    clients: &[MemberReport],
    dropped: u64,
    back: u64,
    end: u64,
) {
    let mut from = dropped.saturating_sub(1_000_000);
    let until = (back + 2_000_000).min(end);
    let step = (until.saturating_sub(from) / 40)
        .max(250_000)
        .div_ceil(250_000)
        * 250_000;
    println!(
        "timeline               from the drop, per {} ms: clients back (total); probe messages sent, their delivery p50 and max; gateway and generator CPU; presence backlog; median split of the send ack (ms until the gateway's createdAt stamp + ms from it to the ack)",
        step / 1000
    );
    let mut backs: Vec<u64> = clients.iter().filter_map(|c| c.back_at).collect();
    backs.sort_unstable();
    while from < until {
        let to = from + step;
        let h = histogram_of(
            probes
                .probes
                .iter()
                .flat_map(|p| p.samples.iter())
                .filter(|(t, _)| (from..to).contains(t))
                .map(|(_, l)| *l),
        );
        let in_step: Vec<&Sampled> = probes
            .samples
            .iter()
            .filter(|s| s.t >= from && s.t <= to)
            .collect();
        let cpu = match (
            in_step.first().and_then(|s| s.server),
            in_step.last().and_then(|s| s.server),
            in_step.first().zip(in_step.last()),
        ) {
            (Some(a), Some(b), Some((sa, sb))) if sb.t > sa.t => format!(
                "{:>4.0}%",
                100.0 * (b.cpu_secs - a.cpu_secs) / ((sb.t - sa.t) as f64 / 1e6)
            ),
            _ => "    -".into(),
        };
        let backlog = in_step
            .iter()
            .filter_map(|s| s.backlog)
            .fold(None, |m: Option<f64>, b| Some(m.map_or(b, |m| m.max(b))))
            .map_or("-".into(), |b| format!("{b:.0}"));
        let ms = |v: u64| v as f64 / 1000.0;
        let (p50, max) = if h.is_empty() {
            ("-".to_string(), "-".to_string())
        } else {
            (
                format!("{:.1}", ms(h.value_at_quantile(0.5))),
                format!("{:.1}", ms(h.max())),
            )
        };
        let mut split: Vec<(i64, i64)> = probes
            .probes
            .iter()
            .flat_map(|p| p.split.iter())
            .filter(|(t, _, _)| (from..to).contains(t))
            .map(|(_, a, b)| (*a, *b))
            .collect();
        split.sort_unstable();
        let split = split
            .get(split.len() / 2)
            .map_or("-".into(), |(a, b)| format!("{a}+{b}"));
        let gen_cpu = match (in_step.first(), in_step.last()) {
            (Some(sa), Some(sb)) if sb.t > sa.t => match (sa.generator, sb.generator) {
                (Some(a), Some(b)) => format!(
                    "{:>4.0}%",
                    100.0 * (b.cpu_secs - a.cpu_secs) / ((sb.t - sa.t) as f64 / 1e6)
                ),
                _ => "    -".into(),
            },
            _ => "    -".into(),
        };
        println!(
            "  {:>+6.2}s  back {:>6}  sent {:>4}  p50 {:>8}ms  max {:>8}ms  cpu {cpu}  gen {gen_cpu}  backlog {backlog}  split {split}",
            (from as f64 - dropped as f64) / 1e6,
            backs.partition_point(|b| *b < to),
            h.len(),
            p50,
            max,
        );
        from = to;
    }
}

/// Every probe message sent from a second before the drop on that took longer than `slow_ms` to
/// deliver: when, its delivery and ack latency, and the ack's split (ms until the gateway's
/// createdAt stamp + ms from it to the ack). A stall shows as a staircase of messages released
/// together; the split tells a late read (first part) from a late write or fan-out (second).
pub(super) fn print_slow(probes: &ProbeSide, dropped: u64, slow_ms: f64) {
    let mut acks: HashMap<u64, u64> = HashMap::new();
    let mut splits: HashMap<u64, (i64, i64)> = HashMap::new();
    for p in &probes.probes {
        acks.extend(p.acks.iter().copied());
        splits.extend(p.split.iter().map(|(t, a, b)| (*t, (*a, *b))));
    }
    let from = dropped.saturating_sub(1_000_000);
    let mut slow: Vec<(u64, u64)> = probes
        .probes
        .iter()
        .flat_map(|p| p.samples.iter().copied())
        .filter(|(t, l)| *t >= from && *l as f64 > slow_ms * 1000.0)
        .collect();
    slow.sort_unstable();
    println!(
        "slow messages          {} delivered in over {slow_ms} ms (from 1 s before the drop)",
        slow.len()
    );
    for (t, l) in slow {
        let split = splits
            .get(&t)
            .map_or("-".into(), |(a, b)| format!("{a}+{b}"));
        println!(
            "  {:>+8.4}s  delivery {:>7.1}ms  ack {:>7.1}ms  split {split}",
            (t as f64 - dropped as f64) / 1e6,
            l as f64 / 1000.0,
            acks.get(&t).copied().unwrap_or(0) as f64 / 1000.0,
        );
    }
}
