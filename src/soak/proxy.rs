//! A TCP proxy in front of a replica that breaks connections the ways networks do: it delays
//! bytes, resets connections at random moments, and drops a connection right after a request
//! went through but before its response came back (the lost response). Faults stop when the
//! soak's quiet tail begins.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Chance that a connection is reset at a random moment within its first seconds. Clients
/// reconnect at once, so a connection's life is short and faults keep coming.
const RESET_CHANCE: f64 = 0.5;
/// Chance that a connection loses the first response that follows a request.
const LOST_RESPONSE_CHANCE: f64 = 0.3;
/// Chance that a forwarded chunk waits, and the longest wait.
const DELAY_CHANCE: f64 = 0.2;
const MAX_DELAY: Duration = Duration::from_millis(20);

#[derive(Default)]
pub(super) struct ProxyCounters {
    pub(super) connections: AtomicU64,
    pub(super) resets: AtomicU64,
    pub(super) lost_responses: AtomicU64,
    pub(super) delays: AtomicU64,
}

pub(super) struct FaultProxy {
    pub(super) address: String,
    pub(super) faults_on: Arc<AtomicBool>,
    pub(super) counters: Arc<ProxyCounters>,
}

impl FaultProxy {
    /// Listens on a free loopback port, forwarding to `upstream`.
    pub(super) async fn start(upstream: String, seed: u64) -> anyhow::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let faults_on = Arc::new(AtomicBool::new(true));
        let counters = Arc::new(ProxyCounters::default());
        let (on, counted) = (faults_on.clone(), counters.clone());
        tokio::spawn(async move {
            let mut connection_seed = seed;
            while let Ok((client, _)) = listener.accept().await {
                connection_seed = connection_seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
                counted.connections.fetch_add(1, Ordering::Relaxed);
                let plan = Plan::draw(connection_seed, on.load(Ordering::Relaxed));
                tokio::spawn(forward(
                    client,
                    upstream.clone(),
                    plan,
                    on.clone(),
                    counted.clone(),
                    connection_seed,
                ));
            }
        });
        Ok(FaultProxy {
            address,
            faults_on,
            counters,
        })
    }

    pub(super) fn stop_faults(&self) {
        self.faults_on.store(false, Ordering::Relaxed);
    }
}

/// What will go wrong with one connection.
struct Plan {
    reset_after: Option<Duration>,
    lose_a_response: bool,
}

impl Plan {
    fn draw(seed: u64, faults_on: bool) -> Plan {
        let mut rng = StdRng::seed_from_u64(seed);
        if !faults_on {
            return Plan {
                reset_after: None,
                lose_a_response: false,
            };
        }
        Plan {
            reset_after: rng
                .random_bool(RESET_CHANCE)
                .then(|| Duration::from_millis(rng.random_range(200..4000))),
            lose_a_response: rng.random_bool(LOST_RESPONSE_CHANCE),
        }
    }
}

async fn forward(
    client: TcpStream,
    upstream: String,
    plan: Plan,
    faults_on: Arc<AtomicBool>,
    counters: Arc<ProxyCounters>,
    seed: u64,
) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        // The replica is down: the client sees a refused (closed) connection.
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Set when a request went upstream; the next response is then dropped, once.
    let request_sent = Arc::new(AtomicBool::new(false));
    let sent = request_sent.clone();
    let (up_on, up_counters) = (faults_on.clone(), counters.clone());
    let upstream_half = async move {
        let mut rng = StdRng::seed_from_u64(seed ^ 1);
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            let read = client_read.read(&mut buffer).await.unwrap_or(0);
            if read == 0 {
                break;
            }
            delay(&mut rng, &up_on, &up_counters).await;
            if server_write.write_all(&buffer[..read]).await.is_err() {
                break;
            }
            sent.store(true, Ordering::Relaxed);
        }
    };
    let lose = plan.lose_a_response;
    let reset_counters = counters.clone();
    let reset_on = faults_on.clone();
    let downstream_half = async move {
        let mut rng = StdRng::seed_from_u64(seed ^ 2);
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            let read = server_read.read(&mut buffer).await.unwrap_or(0);
            if read == 0 {
                break;
            }
            if lose && faults_on.load(Ordering::Relaxed) && request_sent.load(Ordering::Relaxed) {
                counters.lost_responses.fetch_add(1, Ordering::Relaxed);
                break;
            }
            delay(&mut rng, &faults_on, &counters).await;
            if client_write.write_all(&buffer[..read]).await.is_err() {
                break;
            }
        }
    };
    let reset = async {
        match plan.reset_after {
            Some(after) => {
                tokio::time::sleep(after).await;
                if reset_on.load(Ordering::Relaxed) {
                    reset_counters.resets.fetch_add(1, Ordering::Relaxed);
                } else {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending::<()>().await,
        }
    };
    // Whichever half ends (or the reset fires) ends the connection both ways.
    tokio::select! {
        () = upstream_half => {}
        () = downstream_half => {}
        () = reset => {}
    }
}

async fn delay(rng: &mut StdRng, faults_on: &AtomicBool, counters: &ProxyCounters) {
    if faults_on.load(Ordering::Relaxed) && rng.random_bool(DELAY_CHANCE) {
        counters.delays.fetch_add(1, Ordering::Relaxed);
        let millis = rng.random_range(0..u64::try_from(MAX_DELAY.as_millis()).unwrap_or(20));
        tokio::time::sleep(Duration::from_millis(millis)).await;
    }
}
