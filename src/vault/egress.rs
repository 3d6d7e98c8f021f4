//! Where the worker may send a request to a tenant's Vault. Every tenant
//! controls a Vault address, so the address is a way into the worker's own
//! network unless it is checked: the shape of the address (only
//! `https://host[:port]`), and each address its host resolves to (no
//! loopback, link-local, private or other internal address unless an
//! operator lists its network). The check is made on the addresses the
//! connection then uses ([`Resolver`]): a name that resolves once to a
//! public address and then to an internal one (DNS rebinding) gains
//! nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// A network in CIDR notation: `10.0.0.0/8`, `fd00::/8`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    base: IpAddr,
    bits: u8,
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || format!("`{text}` is not a network in CIDR notation (10.0.0.0/8)");
        let (addr, bits) = match text.split_once('/') {
            Some((addr, bits)) => (addr, Some(bits)),
            None => (text, None),
        };
        let base: IpAddr = addr.trim().parse().map_err(|_| invalid())?;
        let most = if base.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            Some(bits) => bits.trim().parse::<u8>().map_err(|_| invalid())?,
            None => most,
        };
        if bits > most {
            return Err(invalid());
        }
        Ok(Self { base, bits })
    }
}

impl Network {
    const fn v4(a: u8, b: u8, c: u8, d: u8, bits: u8) -> Self {
        Self {
            base: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
            bits,
        }
    }

    const fn v6(first: u16, bits: u8) -> Self {
        Self {
            base: IpAddr::V6(Ipv6Addr::new(first, 0, 0, 0, 0, 0, 0, 0)),
            bits,
        }
    }

    /// Whether `ip` lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (base, ip, width) = match (self.base, canonical(ip)) {
            (IpAddr::V4(base), IpAddr::V4(ip)) => {
                (u128::from(base.to_bits()), u128::from(ip.to_bits()), 32)
            }
            (IpAddr::V6(base), IpAddr::V6(ip)) => (base.to_bits(), ip.to_bits(), 128),
            _ => return false,
        };
        let host_bits = width - u32::from(self.bits);
        (base ^ ip).checked_shr(host_bits).unwrap_or(0) == 0
    }
}

/// An IPv4 address written as IPv6 (`::ffff:127.0.0.1`) is the IPv4
/// address: it reaches the same host.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Networks a Vault address must not reach unless listed: this host, the
/// link, private and carrier-grade NAT ranges, multicast and "no address".
const INTERNAL: &[Network] = &[
    Network::v4(0, 0, 0, 0, 8),
    Network::v4(10, 0, 0, 0, 8),
    Network::v4(100, 64, 0, 0, 10),
    Network::v4(127, 0, 0, 0, 8),
    Network::v4(169, 254, 0, 0, 16),
    Network::v4(172, 16, 0, 0, 12),
    Network::v4(192, 168, 0, 0, 16),
    Network::v4(224, 0, 0, 0, 4),
    Network::v4(240, 0, 0, 0, 4),
    Network::v6(0, 127), // :: and ::1
    Network::v6(0xfc00, 7),
    Network::v6(0xfe80, 10),
    Network::v6(0xff00, 8),
];

/// Why an address is refused; the message is the contract's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Not `https://host[:port]` (or `http://` without `allow_http`).
    #[error("Vault address not allowed: {0}")]
    Shape(&'static str),
    /// The host is, or resolves only to, an address in a refused range.
    #[error("Vault address not allowed")]
    Internal,
}

/// The egress policy: which Vault addresses the worker may reach.
#[derive(Debug, Clone, Default)]
pub struct Egress {
    allow_http: bool,
    allowed: Arc<[Network]>,
}

impl Egress {
    /// The policy of `vault.allow_http` and `vault.allowed_networks`.
    pub fn new(allow_http: bool, allowed: &[Network]) -> Self {
        Self {
            allow_http,
            allowed: allowed.into(),
        }
    }

    /// Whether the worker may connect to `ip`.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        !INTERNAL.iter().any(|n| n.contains(ip)) || self.allowed.iter().any(|n| n.contains(ip))
    }

    /// Checks an address as written: `https://host[:port]` (`http://` with
    /// `allow_http`), no path but `/`, no query, fragment or credentials,
    /// and a host given as an IP literal in an allowed range. A host name
    /// is checked again, on each address it resolves to, when the worker
    /// connects.
    pub fn check(&self, address: &str) -> Result<url::Url, Refused> {
        let url = url::Url::parse(address).map_err(|_| Refused::Shape("not a URL"))?;
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            "http" => return Err(Refused::Shape("http:// is not admitted (vault.allow_http)")),
            _ => return Err(Refused::Shape("the scheme must be https")),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Refused::Shape("credentials in the address"));
        }
        if url.path() != "/" && !url.path().is_empty() {
            return Err(Refused::Shape("a path in the address"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(Refused::Shape("a query or fragment in the address"));
        }
        match url.host() {
            None => Err(Refused::Shape("no host")),
            Some(url::Host::Ipv4(ip)) if !self.allows(IpAddr::V4(ip)) => Err(Refused::Internal),
            Some(url::Host::Ipv6(ip)) if !self.allows(IpAddr::V6(ip)) => Err(Refused::Internal),
            Some(_) => Ok(url),
        }
    }

    /// The resolver the Vault client connects through.
    pub(super) fn resolver(&self) -> Arc<Resolver> {
        Arc::new(Resolver {
            egress: self.clone(),
        })
    }
}

/// Resolves a Vault's host name and keeps only the addresses the policy
/// allows; the client connects to what it returns and to nothing else.
#[derive(Debug)]
pub(super) struct Resolver {
    egress: Egress,
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let egress = self.egress.clone();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|addr| egress.allows(addr.ip()))
                .collect();
            if allowed.is_empty() && !found.is_empty() {
                return Err(Box::new(Refused::Internal) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Whether `error`, or an error it was caused by, is an egress refusal.
pub(super) fn refused_in(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.downcast_ref::<Refused>().is_some() {
            return true;
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn internal_ranges_are_refused_and_public_ones_allowed() {
        let egress = Egress::default();
        for refused in [
            "127.0.0.1",
            "127.255.0.9",
            "0.0.0.0",
            "10.1.2.3",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(!egress.allows(ip(refused)), "{refused}");
        }
        for allowed in [
            "8.8.8.8",
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.169.0.1",
            "2001:4860::8888",
            "::ffff:8.8.8.8",
        ] {
            assert!(egress.allows(ip(allowed)), "{allowed}");
        }
    }

    #[test]
    fn a_listed_network_is_allowed_and_only_it() {
        let listed: Network = "10.20.0.0/16".parse().unwrap();
        let loopback: Network = "127.0.0.1".parse().unwrap();
        let egress = Egress::new(false, &[listed, loopback]);
        assert!(egress.allows(ip("10.20.3.4")));
        assert!(!egress.allows(ip("10.21.0.1")));
        assert!(egress.allows(ip("127.0.0.1")));
        assert!(!egress.allows(ip("127.0.0.2")));
        let v6: Network = "fd00::/8".parse().unwrap();
        assert!(Egress::new(false, &[v6]).allows(ip("fd12::1")));
        for bad in ["10.0.0.0/33", "fd00::/129", "ten", "10.0.0.0/x", ""] {
            assert!(bad.parse::<Network>().is_err(), "{bad}");
        }
        let all: Network = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("127.0.0.1")));
    }

    #[test]
    fn only_a_bare_https_origin_is_an_address() {
        let egress = Egress::default();
        for ok in [
            "https://vault.example.com",
            "https://vault.example.com:8200",
            "https://vault.example.com:8200/",
            "https://8.8.8.8:8200",
        ] {
            assert!(egress.check(ok).is_ok(), "{ok}");
        }
        for refused in [
            "http://vault.example.com",
            "https://vault.example.com/v1",
            "https://vault.example.com/?x=",
            "https://vault.example.com#",
            "https://vault.example.com#frag",
            "https://user:pw@vault.example.com",
            "ftp://vault.example.com",
            "https://127.0.0.1:9464",
            "https://169.254.169.254",
            "https://[::1]:8200",
            "https://[::ffff:10.0.0.1]",
            "vault.example.com",
        ] {
            assert!(egress.check(refused).is_err(), "{refused}");
        }
        let http = Egress::new(true, &["127.0.0.0/8".parse().unwrap()]);
        assert!(http.check("http://127.0.0.1:8200").is_ok());
        assert!(http.check("http://127.0.0.1:9464/metrics#").is_err());
    }
}
