//! How wide a network an operator may ban or allowlist in one call.
//!
//! A ban of `0.0.0.0/0` bans every client, and allowlisting it turns every
//! limit off: one typo away from an outage. Networks wider than
//! `ban.min_prefix_v4` / `ban.min_prefix_v6` (default /8 and /32) are
//! refused unless the request says `"force": true`. Apart from the admin
//! handlers so the policy is stated and tested once.

use ipnet::IpNet;

/// The narrowest prefixes accepted without `force`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Breadth {
    pub(crate) min_prefix_v4: u8,
    pub(crate) min_prefix_v6: u8,
}

impl Breadth {
    /// `Err` with a message for the operator if `net` is too wide.
    pub(crate) fn check(&self, net: &IpNet, force: bool) -> Result<(), String> {
        let min = match net {
            IpNet::V4(_) => self.min_prefix_v4,
            IpNet::V6(_) => self.min_prefix_v6,
        };
        if net.prefix_len() < min && !force {
            return Err(format!(
                "{net} is wider than /{min} (ban.min_prefix_v{}) and would cover {}; add \"force\": true if you mean it",
                if matches!(net, IpNet::V4(_)) { 4 } else { 6 },
                if net.prefix_len() == 0 { "every client".to_string() } else { "a very large share of clients".to_string() }
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wide_networks_need_force() {
        let b = Breadth {
            min_prefix_v4: 8,
            min_prefix_v6: 32,
        };
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert!(b.check(&net("0.0.0.0/0"), false).is_err());
        assert!(b.check(&net("0.0.0.0/0"), true).is_ok());
        assert!(b.check(&net("10.0.0.0/7"), false).is_err());
        assert!(b.check(&net("10.0.0.0/8"), false).is_ok());
        assert!(b.check(&net("::/0"), false).is_err());
        assert!(b.check(&net("2001:db8::/31"), false).is_err());
        assert!(b.check(&net("2001:db8::/32"), false).is_ok());
    }
}
