//! The port and address plan: where every server listens and where every Toxiproxy proxy
//! sits in front of it. Pure data, derived from one base port unless given field by field.
//!
//! Layout (offsets from the base port, default 29000; brokers numbered from 1):
//!
//! | offset    | what                                                                  |
//! |-----------|-----------------------------------------------------------------------|
//! | +0        | Toxiproxy HTTP API                                                    |
//! | +10+i     | Kafka broker i, client proxy (what clients bootstrap to and are told) |
//! | +20+i     | Kafka broker i, client listener (the broker binds it; proxy upstream) |
//! | +30+i     | Kafka broker i, replication listener on 127.0.0.1; the proxy for the  |
//! |           | ordered pair j→i listens on 127.10.j.i with the same port             |
//! | +40+i     | Kafka broker i, KRaft controller listener on 127.0.0.1; the proxy for |
//! |           | the ordered pair j→i listens on 127.20.j.i with the same port         |
//! | +50 / +51 | Redis proxy / Redis server                                            |
//! | +60 / +61 | PostgreSQL proxy / PostgreSQL server                                  |
//!
//! Broker j reaches its peer i through host names (`kafka-i.replication.squall`,
//! `kafka-i.controller.squall`) that only broker j's own hosts file (`-Djdk.net.hosts.file`)
//! maps to 127.10.j.i / 127.20.j.i, so every direction between two brokers is a proxy of
//! its own and can be cut alone. A stack with direct links (`LinkMode::Direct`) binds no
//! proxy: clients are told the brokers' own client listeners, and each hosts file maps the
//! peers' names to 127.0.0.1.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use crate::error::{Result, StackError};
use crate::links::LinkMode;

pub const DEFAULT_BASE_PORT: u16 = 29000;
pub const DEFAULT_BROKERS: u8 = 3;
pub const LOOPBACK: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

/// The ports of one Kafka broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerPorts {
    /// Toxiproxy's client-facing proxy; the broker advertises this port to clients.
    pub client_proxy: u16,
    /// The broker's own client listener (upstream of `client_proxy`).
    pub client: u16,
    /// The broker's replication (inter-broker) listener.
    pub replication: u16,
    /// The broker's KRaft controller listener.
    pub controller: u16,
}

/// Every port the stack uses. Serialised into the state file and accepted as `--port-plan`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortPlan {
    pub toxiproxy_api: u16,
    pub brokers: Vec<BrokerPorts>,
    pub redis_proxy: u16,
    pub redis: u16,
    pub postgres_proxy: u16,
    pub postgres: u16,
}

/// One socket address the stack will bind, with a human name for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub purpose: String,
}

impl PortPlan {
    /// The default layout for `brokers` brokers starting at `base` (see the module table).
    pub fn from_base(base: u16, brokers: u8) -> Result<Self> {
        if !(1..=9).contains(&brokers) {
            return Err(StackError::InvalidPlan(format!(
                "{brokers} brokers requested; the plan supports 1 to 9"
            )));
        }
        if !(1024..=u16::MAX - 100).contains(&base) {
            return Err(StackError::InvalidPlan(format!(
                "base port {base} is out of range; use 1024..={}",
                u16::MAX - 100
            )));
        }
        let broker = |i: u16| BrokerPorts {
            client_proxy: base + 10 + i,
            client: base + 20 + i,
            replication: base + 30 + i,
            controller: base + 40 + i,
        };
        Ok(PortPlan {
            toxiproxy_api: base,
            brokers: (1..=u16::from(brokers)).map(broker).collect(),
            redis_proxy: base + 50,
            redis: base + 51,
            postgres_proxy: base + 60,
            postgres: base + 61,
        })
    }

    pub fn broker_count(&self) -> u8 {
        self.brokers.len() as u8
    }

    /// Ports of broker `id` (1-based).
    pub fn broker(&self, id: u8) -> Result<&BrokerPorts> {
        id.checked_sub(1)
            .and_then(|i| self.brokers.get(usize::from(i)))
            .ok_or_else(|| StackError::Unknown {
                kind: "broker",
                name: id.to_string(),
                known: format!("1..={}", self.brokers.len()),
            })
    }

    /// The bootstrap list clients use: every broker's client proxy.
    pub fn kafka_bootstrap(&self) -> String {
        self.kafka_bootstrap_via(LinkMode::Proxied)
    }

    /// Redis URL through its proxy.
    pub fn redis_url(&self) -> String {
        self.redis_url_via(LinkMode::Proxied)
    }

    /// PostgreSQL URL through its proxy.
    pub fn postgres_url(&self, database: &str) -> String {
        self.postgres_url_via(database, LinkMode::Proxied)
    }

    /// The port clients reach broker `b` at: its proxy, or its own listener.
    pub fn broker_client_port(b: &BrokerPorts, mode: LinkMode) -> u16 {
        match mode {
            LinkMode::Proxied => b.client_proxy,
            LinkMode::Direct => b.client,
        }
    }

    pub fn kafka_bootstrap_via(&self, mode: LinkMode) -> String {
        self.brokers
            .iter()
            .map(|b| format!("{LOOPBACK}:{}", Self::broker_client_port(b, mode)))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn redis_url_via(&self, mode: LinkMode) -> String {
        let port = match mode {
            LinkMode::Proxied => self.redis_proxy,
            LinkMode::Direct => self.redis,
        };
        format!("redis://{LOOPBACK}:{port}/")
    }

    pub fn postgres_url_via(&self, database: &str, mode: LinkMode) -> String {
        let port = match mode {
            LinkMode::Proxied => self.postgres_proxy,
            LinkMode::Direct => self.postgres,
        };
        format!("postgres://postgres@{LOOPBACK}:{port}/{database}")
    }

    /// Every address something in the stack binds, servers and proxies alike.
    pub fn bindings(&self) -> Vec<Binding> {
        let bind = |ip: Ipv4Addr, port: u16, purpose: String| Binding { ip, port, purpose };
        let mut out = vec![bind(LOOPBACK, self.toxiproxy_api, "toxiproxy API".into())];
        for (idx, b) in self.brokers.iter().enumerate() {
            let id = idx as u8 + 1;
            out.push(bind(
                LOOPBACK,
                b.client_proxy,
                format!("kafka-{id} client proxy"),
            ));
            out.push(bind(
                LOOPBACK,
                b.client,
                format!("kafka-{id} client listener"),
            ));
            out.push(bind(
                LOOPBACK,
                b.replication,
                format!("kafka-{id} replication listener"),
            ));
            out.push(bind(
                LOOPBACK,
                b.controller,
                format!("kafka-{id} controller listener"),
            ));
        }
        for link in crate::links::peer_links(self) {
            out.push(bind(
                link.listen_ip,
                link.port,
                format!("proxy {}", link.name),
            ));
        }
        out.push(bind(LOOPBACK, self.redis_proxy, "redis proxy".into()));
        out.push(bind(LOOPBACK, self.redis, "redis server".into()));
        out.push(bind(LOOPBACK, self.postgres_proxy, "postgres proxy".into()));
        out.push(bind(LOOPBACK, self.postgres, "postgres server".into()));
        out
    }

    /// Rejects plans where two bindings collide (possible when given field by field).
    pub fn validate(&self) -> Result<()> {
        if self.brokers.is_empty() || self.brokers.len() > 9 {
            return Err(StackError::InvalidPlan(format!(
                "{} brokers in the plan; it supports 1 to 9",
                self.brokers.len()
            )));
        }
        let mut seen = BTreeSet::new();
        for b in self.bindings() {
            if b.port == 0 {
                return Err(StackError::InvalidPlan(format!("{} has port 0", b.purpose)));
            }
            if !seen.insert((b.ip, b.port)) {
                return Err(StackError::InvalidPlan(format!(
                    "{}:{} is used twice (again by {})",
                    b.ip, b.port, b.purpose
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_plan_has_no_collisions() {
        let plan = PortPlan::from_base(DEFAULT_BASE_PORT, 3).unwrap();
        plan.validate().unwrap();
        assert_eq!(
            plan.kafka_bootstrap(),
            "127.0.0.1:29011,127.0.0.1:29012,127.0.0.1:29013"
        );
        // 1 API + 4 per broker + 6 peer pairs * 2 kinds + 4 redis/postgres
        assert_eq!(plan.bindings().len(), 1 + 12 + 12 + 4);
    }

    #[test]
    fn collisions_and_ranges_are_rejected() {
        let mut plan = PortPlan::from_base(30000, 3).unwrap();
        plan.redis = plan.postgres;
        let err = plan.validate().unwrap_err().to_string();
        assert!(err.contains("used twice"), "{err}");
        assert!(PortPlan::from_base(80, 3).is_err());
        assert!(PortPlan::from_base(30000, 0).is_err());
        assert!(PortPlan::from_base(30000, 10).is_err());
    }

    #[test]
    fn unknown_broker_is_named() {
        let plan = PortPlan::from_base(30000, 3).unwrap();
        assert!(plan.broker(3).is_ok());
        let err = plan.broker(4).unwrap_err().to_string();
        assert!(err.contains("1..=3"), "{err}");
        assert!(plan.broker(0).is_err());
    }

    #[test]
    fn plan_file_rejects_unknown_fields() {
        let mut json = serde_json::to_value(PortPlan::from_base(30000, 3).unwrap()).unwrap();
        json["redis_prxy"] = 1.into();
        assert!(serde_json::from_value::<PortPlan>(json).is_err());
    }
}
