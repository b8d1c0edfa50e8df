//! Opening AMQP connections the way Kobe needs them: TCP_NODELAY on, bounded connect time,
//! credentials from the URL.
//!
//! amiquip's `Connection::insecure_open` leaves Nagle's algorithm on, which holds every small frame
//! (a publish, a confirm, an ack) for up to 40 ms waiting for more data: publish-then-confirm runs at
//! about 30 messages a second that way. We open the socket ourselves, turn Nagle off, and hand the
//! socket to amiquip.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use amiquip::{Auth, Connection, ConnectionOptions, ConnectionTuning};

use super::AmqpError;
use crate::cause::Cause;
use crate::config::ServiceUrl;

/// What a connection needs besides the socket.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    addrs: Vec<SocketAddr>,
    username: String,
    password: String,
    vhost: String,
    heartbeat: u16,
    /// Shown in logs and errors instead of the URL, which may carry a password.
    pub(crate) display: String,
}

impl Endpoint {
    /// Parses `amqp://user:password@host:port/vhost?heartbeat=N`. A missing user and password mean
    /// `guest`/`guest`, a missing vhost means `/`, as in RabbitMQ's URI specification.
    pub(crate) fn parse(url: &ServiceUrl) -> Result<Self, AmqpError> {
        let display = url.to_string();
        let parsed = url::Url::parse(url.expose()).map_err(|e| AmqpError::Connect {
            endpoint: display.clone(),
            reason: Cause::context("invalid URL", e),
        })?;
        if parsed.scheme() != "amqp" {
            return Err(AmqpError::Connect {
                endpoint: display,
                reason: "only amqp:// URLs are supported (terminate TLS in front of the broker)"
                    .into(),
            });
        }
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let host = parsed.host_str().unwrap_or("localhost").to_owned();
        let port = parsed.port().unwrap_or(5672);
        let addrs: Vec<SocketAddr> = (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| AmqpError::Connect {
                endpoint: display.clone(),
                reason: Cause::context(format!("cannot resolve {host}"), e),
            })?
            .collect();
        let username = match parsed.username() {
            "" => "guest".to_owned(),
            user => decode(user),
        };
        let password = parsed
            .password()
            .map(decode)
            .unwrap_or_else(|| "guest".to_owned());
        let vhost = match parsed.path().trim_start_matches('/') {
            "" => "/".to_owned(),
            path => decode(path),
        };
        let heartbeat = parsed
            .query_pairs()
            .find(|(k, _)| k == "heartbeat")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(30);
        Ok(Self {
            addrs,
            username,
            password,
            vhost,
            heartbeat,
            display,
        })
    }

    /// Connects within `timeout` (TCP connect plus AMQP handshake each get it).
    pub(crate) fn connect(&self, timeout: Duration) -> Result<Connection, AmqpError> {
        self.connect_as(timeout, "kobe")
    }

    /// Connects, naming the connection `name` in the broker's client properties (`information`),
    /// so an operator can tell Kobe's connections apart in `rabbitmqctl list_connections`.
    pub(crate) fn connect_as(
        &self,
        timeout: Duration,
        name: &str,
    ) -> Result<Connection, AmqpError> {
        let mut last_error = String::from("no address to connect to");
        for addr in &self.addrs {
            match TcpStream::connect_timeout(addr, timeout) {
                Ok(stream) => {
                    let opened = stream
                        .set_nodelay(true)
                        .and_then(|()| mio::net::TcpStream::from_stream(stream))
                        .map_err(|e| e.to_string())
                        .and_then(|stream| {
                            let options = ConnectionOptions::default()
                                .auth(Auth::Plain {
                                    username: self.username.clone(),
                                    password: self.password.clone(),
                                })
                                .virtual_host(self.vhost.clone())
                                .heartbeat(self.heartbeat)
                                .connection_timeout(Some(timeout))
                                .information(Some(name.to_owned()));
                            Connection::insecure_open_stream(
                                stream,
                                options,
                                ConnectionTuning::default(),
                            )
                            .map_err(|e| e.to_string())
                        });
                    match opened {
                        Ok(connection) => return Ok(connection),
                        Err(e) => last_error = format!("{addr}: {e}"),
                    }
                }
                Err(e) => last_error = format!("{addr}: {e}"),
            }
        }
        Err(AmqpError::Connect {
            endpoint: self.display.clone(),
            reason: last_error.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_credentials_vhost_and_heartbeat() {
        let e = Endpoint::parse(&ServiceUrl::new(
            "amqp://user:p%40ss@127.0.0.1:5673/my%2fvhost?heartbeat=10",
        ))
        .unwrap();
        assert_eq!(e.username, "user");
        assert_eq!(e.password, "p@ss");
        assert_eq!(e.vhost, "my/vhost");
        assert_eq!(e.heartbeat, 10);
        assert_eq!(e.addrs[0].port(), 5673);
        assert!(!e.display.contains("p%40ss"));
    }

    #[test]
    fn defaults_follow_the_rabbitmq_uri_spec() {
        let e = Endpoint::parse(&ServiceUrl::new("amqp://127.0.0.1")).unwrap();
        assert_eq!(
            (e.username.as_str(), e.password.as_str()),
            ("guest", "guest")
        );
        assert_eq!(e.vhost, "/");
        assert_eq!(e.addrs[0].port(), 5672);
        let e = Endpoint::parse(&ServiceUrl::new("amqp://127.0.0.1/%2f")).unwrap();
        assert_eq!(e.vhost, "/");
    }
}
