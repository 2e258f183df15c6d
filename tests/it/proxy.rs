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
