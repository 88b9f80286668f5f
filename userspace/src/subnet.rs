//! A node's pod subnet, parsed once: the gateway address the bridge holds and the prefix
//! length, as `up --subnet 198.18.0.1/24` gives it. The node record keeps its text form, so
//! node.json reads as before.

use std::{fmt, net::Ipv4Addr, str::FromStr};

/// Longest prefix a pod subnet may have: a /31 or /32 has no room for a gateway and a pod.
const MAX_PREFIX: u8 = 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subnet {
    /// The bridge's address, the pods' default gateway.
    pub gateway: Ipv4Addr,
    pub prefix: u8,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid subnet {input:?}: {why}")]
pub struct SubnetError {
    input: String,
    why: &'static str,
}

impl Subnet {
    pub fn mask(self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    /// The network address.
    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.gateway) & self.mask())
    }

    pub fn contains(self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == u32::from(self.gateway) & self.mask()
    }

    /// The addresses a pod may have, lowest first: every host address but the gateway.
    pub fn pod_addresses(self) -> impl Iterator<Item = Ipv4Addr> {
        let net = u32::from(self.network());
        let gateway = self.gateway;
        (1..!self.mask())
            .map(move |host| Ipv4Addr::from(net | host))
            .filter(move |a| *a != gateway)
    }
}

impl FromStr for Subnet {
    type Err = SubnetError;

    fn from_str(input: &str) -> Result<Self, SubnetError> {
        let err = |why| SubnetError {
            input: input.to_owned(),
            why,
        };
        let (addr, len) = input
            .split_once('/')
            .ok_or_else(|| err("expected GATEWAY/PREFIX, e.g. 198.18.0.1/24"))?;
        let gateway: Ipv4Addr = addr.parse().map_err(|_| err("not an IPv4 address"))?;
        let prefix: u8 = len
            .parse()
            .ok()
            .filter(|p| (1..=MAX_PREFIX).contains(p))
            .ok_or_else(|| err("the prefix length must be 1 to 30"))?;
        let subnet = Subnet { gateway, prefix };
        let host = u32::from(gateway) & !subnet.mask();
        if host == 0 || host == !subnet.mask() {
            return Err(err(
                "the gateway must be a host address, not the network or broadcast address",
            ));
        }
        Ok(subnet)
    }
}

impl TryFrom<String> for Subnet {
    type Error = SubnetError;

    fn try_from(text: String) -> Result<Self, SubnetError> {
        text.parse()
    }
}

impl From<Subnet> for String {
    fn from(s: Subnet) -> String {
        s.to_string()
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.gateway, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_checks_and_enumerates() {
        let s: Subnet = "198.18.0.1/24".parse().unwrap();
        assert_eq!(s.network(), Ipv4Addr::new(198, 18, 0, 0));
        assert!(s.contains(Ipv4Addr::new(198, 18, 0, 200)));
        assert!(!s.contains(Ipv4Addr::new(198, 18, 1, 2)));
        let pods: Vec<Ipv4Addr> = s.pod_addresses().collect();
        assert_eq!(pods.len(), 253);
        assert_eq!(pods[0], Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(pods[252], Ipv4Addr::new(198, 18, 0, 254));
        assert_eq!(s.to_string(), "198.18.0.1/24");
        for (bad, why) in [
            ("198.18.0.1", "GATEWAY/PREFIX"),
            ("198.18.0.300/24", "IPv4"),
            ("198.18.0.1/31", "1 to 30"),
            ("198.18.0.0/24", "host address"),
            ("198.18.0.255/24", "host address"),
        ] {
            let e = bad.parse::<Subnet>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
