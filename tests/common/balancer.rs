//! [`Balancer`]: a small TCP load balancer in the test process, round-robin with no
//! affinity, like a plain L4 balancer in front of pgfanout pods.
//!
//! Each incoming connection goes to the next backend in turn; a backend that refuses the
//! connection (a node that stopped accepting, or is down) is skipped and the next one is
//! tried, as haproxy does with `option redispatch`. With no backend that answers, the
//! incoming connection is closed. Dropping the balancer closes everything it carries.
//!
//! Started with [`Balancer::start_http`], it reads a connection's first line (the HTTP request
//! line) before choosing a backend, so it can report where each WebSocket went
//! ([`Balancer::open_websocket_backends`]) and hold new WebSocket connections back on request
//! while other HTTP requests pass ([`Balancer::hold_websockets`]): a test can then change
//! things while a client is away. ([`Balancer::start`] reads nothing: any TCP protocol.)

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The WebSocket path of pgfanout.
const WEBSOCKET_PATH: &str = "/connection/websocket";
/// Bytes read at most while looking for the end of the request line.
const MAX_REQUEST_LINE: usize = 8 * 1024;

/// One connection the balancer carried.
#[derive(Debug, Clone)]
pub struct Carried {
    /// The path of its first HTTP request ("" when it did not start with one).
    pub path: String,
    /// The backend it went to.
    pub backend: SocketAddr,
    /// Still open.
    pub open: bool,
}

struct Shared {
    backends: Mutex<Vec<SocketAddr>>,
    next: AtomicUsize,
    /// Connections handed to each backend so far, by address.
    routed: Mutex<Vec<(SocketAddr, u64)>>,
    /// Every connection carried, in order.
    carried: Mutex<Vec<Carried>>,
    /// While true, new WebSocket connections wait before a backend is chosen.
    hold: watch::Sender<bool>,
    /// Read the HTTP request line before choosing (only for HTTP clients).
    http: bool,
}

/// The balancer; its accept loop and every proxied connection stop when it is dropped.
pub struct Balancer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Balancer {
    /// Listens on a free port of 127.0.0.1 and forwards to `backends`, any TCP protocol.
    pub async fn start(backends: Vec<SocketAddr>) -> Balancer {
        Balancer::start_with(backends, false).await
    }

    /// Like [`Balancer::start`], for HTTP and WebSocket clients only: it reads the request line
    /// first, which [`Balancer::hold_websockets`] and [`Balancer::carried`]'s paths need.
    pub async fn start_http(backends: Vec<SocketAddr>) -> Balancer {
        Balancer::start_with(backends, true).await
    }

    async fn start_with(backends: Vec<SocketAddr>, http: bool) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the balancer");
        let addr = listener.local_addr().expect("balancer address");
        let shared = Arc::new(Shared {
            backends: Mutex::new(backends),
            next: AtomicUsize::new(0),
            routed: Mutex::new(Vec::new()),
            carried: Mutex::new(Vec::new()),
            hold: watch::channel(false).0,
            http,
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Balancer { addr, shared, task }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `ws://127.0.0.1:<port>/connection/websocket`.
    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}{WEBSOCKET_PATH}", self.addr.port())
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.addr.port())
    }

    /// Holds new WebSocket connections (connected to the balancer only) until released.
    pub fn hold_websockets(&self, hold: bool) {
        self.shared.hold.send_replace(hold);
    }

    /// Every connection carried so far, in order.
    pub fn carried(&self) -> Vec<Carried> {
        self.shared.carried.lock().expect("carried lock").clone()
    }

    /// Backend ports of the WebSocket connections open now.
    pub fn open_websocket_backends(&self) -> Vec<u16> {
        self.carried()
            .into_iter()
            .filter(|c| c.open && c.path.starts_with(WEBSOCKET_PATH))
            .map(|c| c.backend.port())
            .collect()
    }

    /// Replaces the backends (connections already made stay where they are).
    pub fn set_backends(&self, backends: Vec<SocketAddr>) {
        *self.shared.backends.lock().expect("backends lock") = backends;
    }

    /// Connections handed to each backend so far.
    pub fn routed(&self) -> Vec<(SocketAddr, u64)> {
        self.shared.routed.lock().expect("routed lock").clone()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// 127.0.0.1:`port`.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Owned here: aborting the loop drops the set, which aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((incoming, _)) = accepted else { continue };
                connections.spawn(forward(incoming, shared.clone()));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn forward(mut incoming: TcpStream, shared: Arc<Shared>) {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while shared.http && !head.contains(&b'\n') && head.len() < MAX_REQUEST_LINE {
        match incoming.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
    let path = request_path(&head);
    if path.starts_with(WEBSOCKET_PATH) {
        let mut hold = shared.hold.subscribe();
        if hold.wait_for(|held| !held).await.is_err() {
            return;
        }
    }
    let backends = shared.backends.lock().expect("backends lock").clone();
    if backends.is_empty() {
        return;
    }
    let first = shared.next.fetch_add(1, Ordering::Relaxed);
    for i in 0..backends.len() {
        let backend = backends[(first + i) % backends.len()];
        let Ok(Ok(mut outgoing)) =
            tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend)).await
        else {
            continue;
        };
        let _ = outgoing.set_nodelay(true);
        let _ = incoming.set_nodelay(true);
        {
            let mut routed = shared.routed.lock().expect("routed lock");
            match routed.iter_mut().find(|(a, _)| *a == backend) {
                Some((_, n)) => *n += 1,
                None => routed.push((backend, 1)),
            }
        }
        let index = {
            let mut carried = shared.carried.lock().expect("carried lock");
            carried.push(Carried {
                path,
                backend,
                open: true,
            });
            carried.len() - 1
        };
        if head.is_empty() || outgoing.write_all(&head).await.is_ok() {
            let _ = tokio::io::copy_bidirectional(&mut incoming, &mut outgoing).await;
        }
        shared.carried.lock().expect("carried lock")[index].open = false;
        return;
    }
}

/// The path of an HTTP request line (`GET /path HTTP/1.1`), or "" when it is not one.
fn request_path(head: &[u8]) -> String {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    String::from_utf8_lossy(line)
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string()
}
