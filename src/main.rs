//! The `chat-gateway` binary: parses the command line, loads settings, starts logging, binds, and
//! hands over to the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;

use chat_gateway::auth::{self, Role, TokenMinter};
use chat_gateway::config::{JwtAlgorithm, Settings};
use chat_gateway::store::backfill::{self, BackfillOptions};
use chat_gateway::store::postgres::{self, PgStore};

#[derive(Parser)]
#[command(name = "chat-gateway", version, about = "Realtime chat gateway")]
struct Cli {
    /// Settings file overriding config/default.toml (environment variables override both).
    #[arg(long, global = true, env = "CHAT_GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate {
        /// Postgres: first run the maintenance-window statements (CREATE INDEX CONCURRENTLY, ...)
        /// one by one outside a transaction. Run by hand, in a maintenance window.
        #[arg(long)]
        maintenance: bool,
    },
    /// Postgres: fill what rows written before the gateway lack (sender names and avatars, sequence
    /// numbers), in batches, while the gateway runs. Stop it any time; rerun it to finish.
    Backfill {
        /// Rows per batch (one transaction each).
        #[arg(long, default_value_t = 1000)]
        batch_size: u32,
        /// Pause between batches, in milliseconds.
        #[arg(long, default_value_t = 100)]
        pause_ms: u64,
        /// Only count what would change.
        #[arg(long)]
        dry_run: bool,
    },
    /// Relay the outbox and perform side-effect jobs from the Redis queue, without serving sockets
    /// (run gateways with CHAT_GATEWAY__QUEUE__RUN_WORKER=false to leave the jobs to it).
    Worker,
    /// Mint JWTs for local use (dev mode secret, JWT_SECRET, or --private-key).
    Token {
        /// User id (`sub`). With --count, the prefix: users are <user>1 .. <user>N.
        #[arg(long)]
        user: String,
        /// Display name (`name` claim); defaults to the user id.
        #[arg(long)]
        name: Option<String>,
        /// USER, ADMIN or SERVICE.
        #[arg(long, default_value = "USER", value_parser = parse_role)]
        role: Role,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: i64,
        /// Mint this many tokens, one per line (`<user><i> <token>`), for load tests.
        #[arg(long)]
        count: Option<u32>,
        /// PEM private key for RS256/ES256 (auth.algorithm says which).
        #[arg(long)]
        private_key: Option<PathBuf>,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    match s.to_ascii_uppercase().as_str() {
        "USER" => Ok(Role::User),
        "ADMIN" => Ok(Role::Admin),
        "SERVICE" => Ok(Role::Service),
        _ => Err(format!("unknown role {s:?}: USER, ADMIN or SERVICE")),
    }
}

fn main() {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("chat-gateway: {e}");
            std::process::exit(2);
        }
    };
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
        .and_then(|rt| rt.block_on(dispatch(cli.command.unwrap_or(Command::Serve), settings)));
    if let Err(e) = result {
        eprintln!("chat-gateway: {e:#}");
        std::process::exit(1);
    }
}

async fn dispatch(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Serve => serve(settings).await,
        Command::Worker => {
            chat_gateway::telemetry::init(&settings.log);
            chat_gateway::run_worker(settings, shutdown_signal()).await
        }
        Command::Migrate { maintenance } => {
            chat_gateway::telemetry::init(&settings.log);
            let url = settings.database.url.expose_secret();
            if url.is_empty() {
                if maintenance {
                    anyhow::bail!("--maintenance is for Postgres: set DATABASE_URL");
                }
                chat_gateway::open_store(&settings, true).await?;
                println!("migrations applied to {}", settings.sqlite_path().display());
                return Ok(());
            }
            if maintenance {
                println!("running {}:", postgres::MAINTENANCE_FILE);
                postgres::run_maintenance(url, &mut |line| println!("  {line}")).await?;
            } else {
                println!(
                    "skipped {}: it runs by hand in a maintenance window (CREATE INDEX \
                     CONCURRENTLY cannot run inside a migration's transaction); run \
                     `chat-gateway migrate --maintenance` for it",
                    postgres::MAINTENANCE_FILE
                );
            }
            chat_gateway::open_store(&settings, true).await?;
            println!("automatic migrations applied (migrations/postgres)");
            Ok(())
        }
        Command::Backfill {
            batch_size,
            pause_ms,
            dry_run,
        } => {
            chat_gateway::telemetry::init(&settings.log);
            backfill(&settings, batch_size, pause_ms, dry_run).await
        }
        Command::Token {
            user,
            name,
            role,
            ttl,
            count,
            private_key,
        } => {
            let minter = minter(&settings, private_key)?;
            let mint = |user: &str| {
                let name = name.as_deref().unwrap_or(user);
                minter.mint(&auth::claims_for(user, Some(name), role, ttl))
            };
            match count {
                None => println!("{}", mint(&user)),
                Some(n) => {
                    for i in 1..=n {
                        let user = format!("{user}{i}");
                        println!("{user} {}", mint(&user));
                    }
                }
            }
            Ok(())
        }
    }
}

fn minter(settings: &Settings, private_key: Option<PathBuf>) -> anyhow::Result<TokenMinter> {
    if let Some(path) = private_key {
        let pem = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        return TokenMinter::from_private_pem(settings.auth.algorithm, &pem);
    }
    if settings.auth.algorithm != JwtAlgorithm::HS256 {
        anyhow::bail!("{:?} tokens need --private-key", settings.auth.algorithm);
    }
    if !settings.auth.jwt_secret.expose_secret().is_empty() {
        return Ok(TokenMinter::hs256(&settings.auth.jwt_secret));
    }
    let secret = auth::read_dev_secret(settings).context(
        "no signing key: set JWT_SECRET, or start the server once in dev mode to create its secret",
    )?;
    Ok(TokenMinter::hs256(&secret))
}

async fn backfill(
    settings: &Settings,
    batch: u32,
    pause_ms: u64,
    dry_run: bool,
) -> anyhow::Result<()> {
    let url = settings.database.url.expose_secret();
    if url.is_empty() {
        anyhow::bail!("backfill is for Postgres: set DATABASE_URL");
    }
    let store = PgStore::connect(url, 2, std::time::Duration::from_secs(30))
        .await
        .context("connecting to PostgreSQL (database.url)")?;
    let stop = tokio_util::sync::CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            eprintln!("stopping after the current batch (rerun to finish)");
            stop.cancel();
        });
    }
    let options = BackfillOptions {
        batch,
        pause: std::time::Duration::from_millis(pause_ms),
        dry_run,
    };
    let outcome = backfill::run(store.pool(), &options, &stop, &mut |p| println!("{p}")).await?;
    let plan = &outcome.plan;
    println!(
        "to do at start: {} sender names/avatars, {} messages without a sequence in {} rooms",
        plan.senders, plan.unsequenced, plan.rooms
    );
    if dry_run {
        println!("dry run: nothing changed");
    } else {
        println!(
            "filled {} sender names/avatars, numbered {} messages; {}",
            outcome.senders_filled,
            outcome.sequenced,
            if outcome.finished {
                "done"
            } else {
                "stopped before the end: rerun to finish"
            }
        );
    }
    store.close().await;
    Ok(())
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    chat_gateway::telemetry::init(&settings.log);
    let listener =
        chat_gateway::admission::bind(settings.server.bind_addr, settings.server.listen_backlog)
            .with_context(|| format!("binding {}", settings.server.bind_addr))?;
    chat_gateway::run(listener, settings, shutdown_signal()).await
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received");
}
