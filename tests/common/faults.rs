//! Faults the suites cause for real: a Redis server of the test's own that can be stopped and
//! started again empty, and a TCP proxy in front of Postgres that can be cut.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{WAIT, redis_url};

/// A Redis server of the test's own, so it can be stopped and restarted without disturbing others.
pub struct OwnRedis {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    pub fn start(port: Option<u16>) -> Option<OwnRedis> {
        let port = port.unwrap_or_else(|| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        });
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        Some(OwnRedis {
            port,
            child: Some(child),
        })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis server of the test's own, started and answering, or `None` when the test is skipped.
pub async fn own_redis(port: Option<u16>) -> Option<OwnRedis> {
    // Needs a redis-server binary; the shared Redis is the gate for the suite.
    redis_url().await?;
    let Some(redis) = OwnRedis::start(port) else {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "redis-server is needed in CI"
        );
        eprintln!("SKIPPED: own redis-server test (no redis-server binary)");
        return None;
    };
    let url = redis.url();
    let deadline = Instant::now() + WAIT;
    while redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "own redis-server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some(redis)
}

/// A TCP proxy in front of Postgres that can be cut: what the gateway sees when the database goes
/// away (connections reset, new ones refused) and comes back.
pub struct CuttableProxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    /// Replaced on every cut; each piped connection ends when its generation is cancelled.
    generation: Arc<std::sync::Mutex<CancellationToken>>,
}

impl CuttableProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let (up2, generation2) = (up.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees its connection closed
                }
                let cut = generation2.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.cancelled() => {}
                    }
                });
            }
        });
        CuttableProxy {
            addr,
            up,
            generation,
        }
    }

    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        let old = std::mem::take(&mut *self.generation.lock().unwrap());
        old.cancel();
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

pub async fn postgres_addr(url: &str) -> SocketAddr {
    use std::str::FromStr;
    let options = sqlx::postgres::PgConnectOptions::from_str(url).unwrap();
    tokio::net::lookup_host((options.get_host(), options.get_port()))
        .await
        .unwrap()
        .next()
        .unwrap()
}
