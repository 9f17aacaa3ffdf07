//! The stack's links: every connection path that runs through its own Toxiproxy proxy, so
//! that each can be cut or degraded alone. Pure data derived from the port plan.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;

use crate::plan::{PortPlan, LOOPBACK};

/// How the stack's clients and brokers reach each other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkMode {
    /// Every link through its own Toxiproxy proxy, so that any can be cut or degraded.
    #[default]
    Proxied,
    /// Straight to the servers, no Toxiproxy: for measuring the system without the
    /// proxies' cost (about a tenth of two cores in `steady`); links cannot be faulted.
    Direct,
}

/// What a link carries, and between whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LinkKind {
    /// Any client (producer, consumer, chatstream) → broker `broker`.
    KafkaClient { broker: u8 },
    /// Broker `from` fetching from (replicating) broker `to`.
    Replication { from: u8, to: u8 },
    /// Broker `from` talking to the KRaft controller listener of broker `to`.
    Controller { from: u8, to: u8 },
    /// Any client → Redis.
    Redis,
    /// Any client → PostgreSQL.
    Postgres,
}

/// One Toxiproxy proxy: it listens on `listen_ip:port` and forwards to `upstream`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub name: String,
    pub kind: LinkKind,
    pub listen_ip: Ipv4Addr,
    pub port: u16,
    pub upstream: String,
}

impl Link {
    pub fn listen(&self) -> String {
        format!("{}:{}", self.listen_ip, self.port)
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} -> {})", self.name, self.listen(), self.upstream)
    }
}

/// The loopback address of the proxy that carries traffic from broker `from` to broker `to`.
/// `class` separates replication (10) from controller (20) traffic.
pub fn peer_proxy_ip(class: u8, from: u8, to: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, class, from, to)
}

pub const REPLICATION_CLASS: u8 = 10;
pub const CONTROLLER_CLASS: u8 = 20;

/// Host name under which every broker reaches broker `id`'s replication listener.
pub fn replication_host(id: u8) -> String {
    format!("kafka-{id}.replication.squall")
}

/// Host name under which every broker reaches broker `id`'s controller listener.
pub fn controller_host(id: u8) -> String {
    format!("kafka-{id}.controller.squall")
}

/// The broker↔broker links (both directions of every pair, replication and controller).
pub fn peer_links(plan: &PortPlan) -> Vec<Link> {
    let n = plan.broker_count();
    let mut out = Vec::new();
    for from in 1..=n {
        for to in 1..=n {
            if from == to {
                continue;
            }
            let target = &plan.brokers[usize::from(to - 1)];
            out.push(Link {
                name: format!("kafka-{from}-to-{to}-replication"),
                kind: LinkKind::Replication { from, to },
                listen_ip: peer_proxy_ip(REPLICATION_CLASS, from, to),
                port: target.replication,
                upstream: format!("{LOOPBACK}:{}", target.replication),
            });
            out.push(Link {
                name: format!("kafka-{from}-to-{to}-controller"),
                kind: LinkKind::Controller { from, to },
                listen_ip: peer_proxy_ip(CONTROLLER_CLASS, from, to),
                port: target.controller,
                upstream: format!("{LOOPBACK}:{}", target.controller),
            });
        }
    }
    out
}

/// Every link of the stack, in a stable order.
pub fn all_links(plan: &PortPlan) -> Vec<Link> {
    let mut out: Vec<Link> = plan
        .brokers
        .iter()
        .enumerate()
        .map(|(idx, b)| {
            let broker = idx as u8 + 1;
            Link {
                name: format!("kafka-{broker}-client"),
                kind: LinkKind::KafkaClient { broker },
                listen_ip: LOOPBACK,
                port: b.client_proxy,
                upstream: format!("{LOOPBACK}:{}", b.client),
            }
        })
        .collect();
    out.extend(peer_links(plan));
    out.push(Link {
        name: "redis".into(),
        kind: LinkKind::Redis,
        listen_ip: LOOPBACK,
        port: plan.redis_proxy,
        upstream: format!("{LOOPBACK}:{}", plan.redis),
    });
    out.push(Link {
        name: "postgres".into(),
        kind: LinkKind::Postgres,
        listen_ip: LOOPBACK,
        port: plan.postgres_proxy,
        upstream: format!("{LOOPBACK}:{}", plan.postgres),
    });
    out
}

/// The links that join broker `id` to its peers, in both directions: cutting all of them
/// isolates the broker from the quorum while clients can still reach it.
pub fn isolation_links(plan: &PortPlan, id: u8) -> Vec<Link> {
    peer_links(plan)
        .into_iter()
        .filter(|l| match l.kind {
            LinkKind::Replication { from, to } | LinkKind::Controller { from, to } => {
                from == id || to == id
            }
            _ => false,
        })
        .collect()
}

/// The links that carry traffic from broker `from` to broker `to` only (a one-way partition).
pub fn one_way_links(plan: &PortPlan, from: u8, to: u8) -> Vec<Link> {
    peer_links(plan)
        .into_iter()
        .filter(|l| {
            matches!(l.kind, LinkKind::Replication { from: f, to: t } | LinkKind::Controller { from: f, to: t } if f == from && t == to)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> PortPlan {
        PortPlan::from_base(30000, 3).unwrap()
    }

    #[test]
    fn every_ordered_pair_has_its_own_proxy_address() {
        let links = peer_links(&plan());
        assert_eq!(links.len(), 3 * 2 * 2);
        let l = links
            .iter()
            .find(|l| l.name == "kafka-2-to-3-replication")
            .unwrap();
        assert_eq!(l.listen(), "127.10.2.3:30033");
        assert_eq!(l.upstream, "127.0.0.1:30033");
        let back = links
            .iter()
            .find(|l| l.name == "kafka-3-to-2-controller")
            .unwrap();
        assert_eq!(back.listen(), "127.20.3.2:30042");
    }

    #[test]
    fn isolation_cuts_both_directions_and_nothing_else() {
        let cut = isolation_links(&plan(), 1);
        // 2 peers * 2 directions * 2 kinds
        assert_eq!(cut.len(), 8);
        assert!(cut
            .iter()
            .all(|l| l.name.contains("kafka-1-") || l.name.contains("-to-1-")));
        let one_way = one_way_links(&plan(), 1, 2);
        let names: Vec<_> = one_way.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(
            names,
            ["kafka-1-to-2-replication", "kafka-1-to-2-controller"]
        );
    }

    #[test]
    fn all_links_have_unique_names() {
        let links = all_links(&plan());
        let mut names: Vec<_> = links.iter().map(|l| l.name.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), links.len());
        assert_eq!(links.len(), 3 + 12 + 2);
    }
}
