//! Where an http task may connect: the networks its declaration allows and denies, and never a
//! loopback, link-local or unspecified address, nor a cloud metadata service, reached through a
//! name unless its URL names one. The check runs on every resolved address, so a name that
//! changes its answer cannot lead elsewhere; the client uses no proxy, which would resolve
//! names itself, past the check.

use super::fields::{field, FieldError};
use crate::domain::network::Network;

/// The IPv6 address of a cloud metadata service outside the link-local range (AWS's).
const METADATA_V6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// Whether `ip` is of the kinds a request is kept from unless declared: loopback, link-local
/// (169.254.0.0/16 and fe80::/10 hold cloud metadata services), unspecified, and AWS's IPv6
/// metadata address (fd00:ec2::254). Private networks (10/8, fc00::/7 …) are where services
/// live: narrow them with `deny_networks`.
fn guarded(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local() || v4.is_unspecified(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6 == METADATA_V6
                || v6.to_ipv4_mapped().is_some_and(|v4| guarded(v4.into()))
        }
    }
}

/// Where an http task may connect: not to loopback or link-local addresses (unless its URL
/// names one), not into `deny_networks`, and only into `allow_networks` when it lists any.
#[derive(Debug, Clone, Default)]
pub(super) struct Destinations {
    local_allowed: bool,
    allow: Vec<Network>,
    deny: Vec<Network>,
}

impl Destinations {
    fn permits(&self, ip: std::net::IpAddr) -> bool {
        (self.local_allowed || !guarded(ip))
            && !self.deny.iter().any(|n| n.contains(ip))
            && (self.allow.is_empty() || self.allow.iter().any(|n| n.contains(ip)))
    }
}

/// Resolves host names as the system does, keeping the addresses [`Destinations`] permits.
pub(super) struct GuardedResolver(pub(super) std::sync::Arc<Destinations>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        let destinations = self.0.clone();
        Box::pin(async move {
            let found: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|addr| destinations.permits(addr.ip()))
                .collect();
            if found.is_empty() {
                return Err(format!(
                    "{host} resolves to no address this task may reach (loopback and link-local only when its URL names them, allow_networks, deny_networks)"
                )
                .into());
            }
            Ok(Box::new(found.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Where the call may go: the declared networks, a loopback or link-local host only when the
/// URL names one; an address in the URL is checked now, as it is never resolved.
pub(super) fn destinations(
    url: &reqwest::Url,
    networks: (&[String], &[String]),
) -> Result<Destinations, FieldError> {
    // A host declared as loopback or link-local may be reached; otherwise no name may
    // lead there.
    let declared_local = match url.host() {
        Some(url::Host::Ipv4(ip)) => guarded(ip.into()),
        Some(url::Host::Ipv6(ip)) => guarded(ip.into()),
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    };
    let parse = |list: &[String], at: &str| {
        list.iter()
            .map(|text| {
                Network::parse(text).ok_or_else(|| {
                    field(at, format!("`{text}` is not an address or address/prefix"))
                })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let destinations = Destinations {
        local_allowed: declared_local,
        allow: parse(networks.0, "allow_networks")?,
        deny: parse(networks.1, "deny_networks")?,
    };
    // An address in the URL is never resolved: check it now.
    let literal = match url.host() {
        Some(url::Host::Ipv4(ip)) => Some(std::net::IpAddr::from(ip)),
        Some(url::Host::Ipv6(ip)) => Some(ip.into()),
        _ => None,
    };
    if let Some(ip) = literal.filter(|ip| !destinations.permits(*ip)) {
        return Err(field(
            "url",
            format!("{ip} is outside allow_networks or inside deny_networks"),
        ));
    }
    Ok(destinations)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_allow_and_deny_what_they_name() {
        let net = |t: &str| Network::parse(t).unwrap();
        let ip = |t: &str| t.parse::<std::net::IpAddr>().unwrap();
        assert!(net("10.0.0.0/8").contains(ip("10.200.1.1")));
        assert!(!net("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(net("0.0.0.0/0").contains(ip("93.184.216.34")));
        assert!(net("192.168.1.7").contains(ip("192.168.1.7")));
        assert!(!net("192.168.1.7").contains(ip("192.168.1.8")));
        assert!(net("2001:db8::/32").contains(ip("2001:db8:1::5")));
        assert!(!net("2001:db8::/32").contains(ip("10.0.0.1")));
        assert!(Network::parse("10.0.0.0/33").is_none());
        assert!(Network::parse("ten").is_none());
        let only_private = Destinations {
            local_allowed: false,
            allow: vec![net("10.0.0.0/8")],
            deny: vec![net("10.9.0.0/16")],
        };
        assert!(only_private.permits(ip("10.1.2.3")));
        assert!(
            !only_private.permits(ip("10.9.2.3")),
            "denied within the allowed"
        );
        assert!(
            !only_private.permits(ip("93.184.216.34")),
            "outside the allowed"
        );
        assert!(!only_private.permits(ip("127.0.0.1")));
        assert!(Destinations::default().permits(ip("93.184.216.34")));
        assert!(!Destinations::default().permits(ip("169.254.169.254")));
    }

    #[test]
    fn loopback_and_link_local_addresses_are_guarded() {
        for ip in [
            "127.0.0.1",
            "169.254.169.254",
            "::1",
            "fe80::1",
            "0.0.0.0",
            "::ffff:127.0.0.1",
            "fd00:ec2::254",
        ] {
            assert!(guarded(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.1.2.3", "93.184.216.34", "2001:db8::1", "fd12::1"] {
            assert!(!guarded(ip.parse().unwrap()), "{ip}");
        }
    }
}
