//! A TCP proxy the test controls, between Kobe and one of its services, to break connections the
//! way networks do: pass bytes through, blackhole them (connections stay open, nothing arrives
//! either way: a partition or a hung server; traffic resumes when it passes again), or reset every connection (RST, as after a crash or
//! a middlebox timeout) and refuse new ones until it passes again, or hold every answer a while
//! (a slow server).

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass,
    /// Accept and hold connections, delivering no byte either way.
    Blackhole,
    /// Reset every open connection, and reset new ones as they come.
    Reset,
    /// Pass traffic, each answer from the service held this long first (a slow server).
    Slow(std::time::Duration),
}

pub struct Proxy {
    /// Where Kobe connects instead of the service.
    pub port: u16,
    mode: watch::Sender<Mode>,
    accepted: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// A proxy on a free port of 127.0.0.1 to `upstream` (`host:port`), passing traffic.
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let (mode, watching) = watch::channel(Mode::Pass);
        let accepted = Arc::new(Mutex::new(0));
        let counted = accepted.clone();
        let upstream = upstream.to_owned();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                *counted.lock().unwrap() += 1;
                let _ = client.set_nodelay(true);
                tokio::spawn(relay(client, upstream.clone(), watching.clone()));
            }
        });
        Self {
            port,
            mode,
            accepted,
            task,
        }
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Connections accepted so far (a reconnect shows here).
    pub fn accepted(&self) -> usize {
        *self.accepted.lock().unwrap()
    }

    /// `url` (a `scheme://[user:password@]host:port/…` URL) with its host and port replaced by
    /// the proxy's.
    pub fn url_for(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
        let (credentials, rest) = match rest.rsplit_once('@') {
            Some((credentials, rest)) => (format!("{credentials}@"), rest),
            None => (String::new(), rest),
        };
        let tail = rest.find(['/', '?']).map_or("", |i| &rest[i..]);
        format!("{scheme}://{credentials}127.0.0.1:{}{tail}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.set(Mode::Reset);
        self.task.abort();
    }
}

fn reset(stream: &TcpStream) {
    // Linger 0: close sends RST instead of FIN.
    let _ = stream.set_zero_linger();
}

async fn relay(mut client: TcpStream, upstream: String, mut mode: watch::Receiver<Mode>) {
    let initial = *mode.borrow_and_update();
    match initial {
        Mode::Reset => return reset(&client),
        Mode::Blackhole => {
            // Hold it open, answering nothing, until the mode changes.
            let mut sink = [0u8; 4096];
            loop {
                tokio::select! {
                    read = client.read(&mut sink) => if matches!(read, Ok(0) | Err(_)) { return },
                    changed = mode.changed() => {
                        if changed.is_err() || *mode.borrow() != Mode::Blackhole {
                            return reset(&client);
                        }
                    }
                }
            }
        }
        Mode::Pass | Mode::Slow(_) => {}
    }
    let Ok(mut server) = TcpStream::connect(&upstream).await else {
        return reset(&client);
    };
    let _ = server.set_nodelay(true);
    let (mut from_client, mut to_client) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let current = *mode.borrow();
        if matches!(current, Mode::Blackhole | Mode::Reset) {
            // Blackholed: nothing is read, so nothing arrives either way (the peers' bytes wait
            // in the sockets, as packets a partition holds do), until the mode changes.
            if mode.changed().await.is_err() || *mode.borrow() == Mode::Reset {
                reset(&client);
                reset(&server);
                return;
            }
            continue;
        }
        tokio::select! {
            read = client.read(&mut from_client) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => if server.write_all(&from_client[..n]).await.is_err() { return },
            },
            read = server.read(&mut to_client) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if let Mode::Slow(delay) = current {
                        tokio::time::sleep(delay).await;
                    }
                    if client.write_all(&to_client[..n]).await.is_err() { return }
                }
            },
            changed = mode.changed() => {
                if changed.is_err() || *mode.borrow() == Mode::Reset {
                    reset(&client);
                    reset(&server);
                    return;
                }
            }
        }
    }
}
