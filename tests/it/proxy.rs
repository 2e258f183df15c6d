//! A TCP proxy a test can cut and restore: the server under test reaches PostgreSQL through
//! it, so a test can take the database away (every open connection broken, new ones refused
//! as by a host that is down) without touching the machine's shared PostgreSQL.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct CuttableProxy {
    pub address: SocketAddr,
    /// True while the link is up.
    up: watch::Sender<bool>,
}

impl CuttableProxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> CuttableProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (up, watching) = watch::channel(true);
        tokio::spawn(serve(Some(listener), address, upstream, watching));
        CuttableProxy { address, up }
    }

    /// Breaks every open connection and refuses new ones until [`CuttableProxy::restore`].
    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}

/// While up: listens and forwards. While cut: not listening at all, so connecting is refused.
/// Ends when the proxy is dropped.
async fn serve(
    mut listener: Option<TcpListener>,
    address: SocketAddr,
    upstream: SocketAddr,
    mut up: watch::Receiver<bool>,
) {
    loop {
        if !*up.borrow_and_update() {
            listener = None;
            if up.changed().await.is_err() {
                return;
            }
            continue;
        }
        let Some(open) = &listener else {
            listener = TcpListener::bind(address).await.ok();
            if listener.is_none() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            continue;
        };
        tokio::select! {
            changed = up.changed() => if changed.is_err() { return },
            accepted = open.accept() => if let Ok((client, _)) = accepted {
                tokio::spawn(forward(client, upstream, up.clone()));
            },
        }
    }
}

/// Copies both ways until either side closes or the link is cut.
async fn forward(mut client: TcpStream, upstream: SocketAddr, mut up: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    tokio::select! {
        _ = up.wait_for(|up| !*up) => {}
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
    }
}

/// A proxy whose answers (upstream → client) arrive `latency` late, as over a slow link, so a
/// test can cancel a call while one of its round trips is in flight. Runs until the test ends.
pub async fn with_latency(upstream: SocketAddr, latency: std::time::Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(forward_late(client, upstream, latency));
        }
    });
    address
}

async fn forward_late(client: TcpStream, upstream: SocketAddr, latency: std::time::Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let (late, mut due) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let requests = async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    };
    let answers_read = async move {
        let mut buffer = vec![0u8; 16 * 1024];
        while let Ok(read) = server_read.read(&mut buffer).await {
            if read == 0
                || late
                    .send((
                        tokio::time::Instant::now() + latency,
                        buffer[..read].to_vec(),
                    ))
                    .is_err()
            {
                break;
            }
        }
    };
    let answers_written = async move {
        while let Some((at, bytes)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if client_write.write_all(&bytes).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        () = requests => {}
        () = async { tokio::join!(answers_read, answers_written); } => {}
    }
}
