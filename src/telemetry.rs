//! Logging setup: human-readable by default, JSON for log collectors; `RUST_LOG` overrides the
//! configured level. Called once by the binary; tests stay quiet unless `RUST_LOG` is set.
//!
//! A filter is a comma-separated list of `level` (the default) and `target=level` directives,
//! for example `info,chat_gateway::rooms=debug,sqlx=warn`; a target matches its submodules too.
//! (tracing-subscriber's `Targets`: the span and field filters of its `EnvFilter` are not
//! supported; that filter's regex engine was a long pole of the build.)

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, LogSettings};

pub fn init(settings: &LogSettings) {
    let filter = from_env().unwrap_or_else(|| {
        format!("{},sqlx=warn", settings.level)
            .parse()
            .unwrap_or_else(|e| {
                eprintln!(
                    "log.level {:?} ignored ({e}); logging at info",
                    settings.level
                );
                Targets::new()
                    .with_default(LevelFilter::INFO)
                    .with_target("sqlx", LevelFilter::WARN)
            })
    });
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match settings.format {
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().flatten_event(true))
            .try_init(),
        LogFormat::Pretty => registry.with(tracing_subscriber::fmt::layer()).try_init(),
    };
}

/// For tests: logs only when `RUST_LOG` is set.
pub fn init_for_tests() {
    if let Some(filter) = from_env() {
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(tracing_subscriber::fmt::layer().with_test_writer())
            .try_init();
    }
}

/// `RUST_LOG`'s filter, when it is set; an invalid one is reported on stderr and ignored.
fn from_env() -> Option<Targets> {
    let spec = std::env::var("RUST_LOG").ok()?;
    match spec.parse() {
        Ok(filter) => Some(filter),
        Err(e) => {
            eprintln!("RUST_LOG={spec:?} ignored: {e}");
            None
        }
    }
}
