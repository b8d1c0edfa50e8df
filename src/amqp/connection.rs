//! Opening AMQP connections the way Kobe needs them: TCP_NODELAY on, bounded connect time,
//! credentials from the URL, and several brokers to choose from.
//!
//! `RABBITMQ_URL` may list the nodes of a cluster, comma-separated. Every connection — the
//! publisher's, the consumer's, a health check's — goes to the first node that answers, so when a
//! connection is lost the reconnect that follows lands on the next live node, and a node that
//! comes back is used again by the connections opened after it did; nothing needs a restart.
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

/// The URL of each node `url` names (one, or a cluster's, comma-separated), in order.
pub(crate) fn node_urls(url: &ServiceUrl) -> impl Iterator<Item = &str> {
    url.expose()
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
}

/// Each node `url` names, as `(shown, host:port)`: without resolving names, so async code can
/// probe them; `None` for a node whose URL does not parse.
pub fn node_addresses(url: &ServiceUrl) -> Vec<(String, Option<String>)> {
    node_urls(url)
        .map(|node| {
            let address = url::Url::parse(node).ok().map(|u| {
                format!(
                    "{}:{}",
                    u.host_str().unwrap_or("localhost"),
                    u.port().unwrap_or(5672)
                )
            });
            (crate::config::redact_url(node), address)
        })
        .collect()
}

/// One broker node: where it is and how to log in.
#[derive(Clone, Debug)]
struct Node {
    /// Resolved at every connect, not once: a name that does not resolve yet, or whose address
    /// changes (a node rescheduled elsewhere), is followed without a restart.
    host: String,
    port: u16,
    username: String,
    password: String,
    vhost: String,
    heartbeat: u16,
    /// Shown in logs and errors instead of the URL, which may carry a password.
    display: String,
}

/// The broker nodes a connection may go to, in order of preference.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    nodes: Vec<Node>,
    /// Shown in logs and errors instead of the URLs, which may carry passwords.
    pub(crate) display: String,
}

impl Endpoint {
    /// Parses one `amqp://user:password@host:port/vhost?heartbeat=N` URL or several,
    /// comma-separated (the nodes of a cluster). A missing user and password mean
    /// `guest`/`guest`, a missing vhost means `/`, as in RabbitMQ's URI specification.
    pub(crate) fn parse(url: &ServiceUrl) -> Result<Self, AmqpError> {
        let nodes = node_urls(url)
            .map(Node::parse)
            .collect::<Result<Vec<_>, _>>()?;
        if nodes.is_empty() {
            return Err(AmqpError::Connect {
                endpoint: url.to_string(),
                reason: "no broker URL given".into(),
            });
        }
        Ok(Self {
            nodes,
            display: url.to_string(),
        })
    }

    /// Each node as an endpoint of its own, for a report per node.
    pub(crate) fn each_node(&self) -> Vec<Endpoint> {
        self.nodes
            .iter()
            .map(|node| Endpoint {
                nodes: vec![node.clone()],
                display: node.display.clone(),
            })
            .collect()
    }
}

impl Node {
    fn parse(text: &str) -> Result<Self, AmqpError> {
        let display = crate::config::redact_url(text);
        let parsed = url::Url::parse(text).map_err(|e| AmqpError::Connect {
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
            host,
            port,
            username,
            password,
            vhost,
            heartbeat,
            display,
        })
    }
}

impl Endpoint {
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
        let mut errors = Vec::new();
        for (index, node) in self.nodes.iter().enumerate() {
            match node.connect(timeout, name) {
                Ok(connection) => {
                    if index > 0 {
                        tracing::warn!(node = %node.display, unreachable = %errors.join("; "), "connected to a later RabbitMQ node; the earlier ones did not answer");
                    }
                    return Ok(connection);
                }
                Err(e) => errors.push(format!("{}: {e}", node.display)),
            }
        }
        Err(AmqpError::Connect {
            endpoint: self.display.clone(),
            reason: errors.join("; ").into(),
        })
    }
}

impl Node {
    fn addrs(&self) -> Result<Vec<SocketAddr>, String> {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        (host, self.port)
            .to_socket_addrs()
            .map(Iterator::collect)
            .map_err(|e| format!("cannot resolve {}: {e}", self.host))
    }

    fn connect(&self, timeout: Duration, name: &str) -> Result<Connection, String> {
        let mut last_error = String::from("no address to connect to");
        for addr in &self.addrs()? {
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
        Err(last_error)
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
        let n = &e.nodes[0];
        assert_eq!(n.username, "user");
        assert_eq!(n.password, "p@ss");
        assert_eq!(n.vhost, "my/vhost");
        assert_eq!(n.heartbeat, 10);
        assert_eq!(n.port, 5673);
        assert!(!e.display.contains("p%40ss"));
    }

    #[test]
    fn defaults_follow_the_rabbitmq_uri_spec() {
        let e = Endpoint::parse(&ServiceUrl::new("amqp://127.0.0.1")).unwrap();
        let n = &e.nodes[0];
        assert_eq!(
            (n.username.as_str(), n.password.as_str()),
            ("guest", "guest")
        );
        assert_eq!(n.vhost, "/");
        assert_eq!(n.port, 5672);
        let e = Endpoint::parse(&ServiceUrl::new("amqp://127.0.0.1/%2f")).unwrap();
        assert_eq!(e.nodes[0].vhost, "/");
    }

    #[test]
    fn a_list_names_the_nodes_in_order_and_hides_every_password() {
        let e = Endpoint::parse(&ServiceUrl::new(
            "amqp://a:secret1@127.0.0.1:5673, amqp://b:secret2@127.0.0.1:5674/v",
        ))
        .unwrap();
        let ports: Vec<u16> = e.nodes.iter().map(|n| n.port).collect();
        assert_eq!(ports, [5673, 5674]);
        assert_eq!(e.nodes[1].vhost, "v");
        assert!(!e.display.contains("secret"), "{}", e.display);
        assert_eq!(e.each_node().len(), 2);
        assert!(Endpoint::parse(&ServiceUrl::new("amqp://x,http://y")).is_err());
    }

    #[test]
    fn a_name_that_does_not_resolve_is_tried_at_each_connect_not_refused_at_start() {
        let e = Endpoint::parse(&ServiceUrl::new(
            "amqp://no-such-node.invalid:5672,amqp://127.0.0.1:5672",
        ))
        .expect("a name is not resolved when parsed");
        let refused = Endpoint::parse(&ServiceUrl::new("amqp://no-such-node.invalid:5672"))
            .unwrap()
            .connect(Duration::from_secs(2))
            .map(drop)
            .expect_err("an unresolvable node cannot be connected to")
            .to_string();
        assert!(
            refused.contains("cannot resolve no-such-node.invalid"),
            "{refused}"
        );
        // The list still reaches the node that resolves (where the machine has its broker).
        if let Ok(connection) = e.connect(Duration::from_secs(5)) {
            drop(connection.close());
        }
    }

    #[test]
    fn the_first_node_that_answers_is_used() {
        // Nothing listens on a port just freed; the machine's broker does on 5672.
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = Endpoint::parse(&ServiceUrl::new(format!(
            "amqp://127.0.0.1:{free},amqp://127.0.0.1:5672"
        )))
        .unwrap();
        match e.connect(Duration::from_secs(5)) {
            Ok(connection) => drop(connection.close()),
            // A machine without the local broker: the error names both nodes.
            Err(error) => {
                let text = error.to_string();
                assert!(
                    text.contains(&free.to_string()) && text.contains("5672"),
                    "{text}"
                );
            }
        }
    }
}
