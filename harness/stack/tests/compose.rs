//! docker-compose.yml (and its docker/toxiproxy.json) describe the same topology as the
//! local stack: the same services, the same ports, the same proxies with the same names.

use serde_yaml::Value;
use squall_stack::links::{all_links, LinkKind};
use squall_stack::plan::{PortPlan, DEFAULT_BASE_PORT};
use std::collections::BTreeSet;
use std::path::PathBuf;

fn repo_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(name)
}

fn compose() -> Value {
    let text =
        std::fs::read_to_string(repo_file("docker-compose.yml")).expect("docker-compose.yml");
    let mut value: Value = serde_yaml::from_str(&text).expect("docker-compose.yml is YAML");
    value.apply_merge().expect("merge keys");
    value
}

fn plan() -> PortPlan {
    PortPlan::from_base(DEFAULT_BASE_PORT, 3).unwrap()
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    compose["services"]
        .get(name)
        .unwrap_or_else(|| panic!("service {name} missing from docker-compose.yml"))
}

fn env(svc: &Value, key: &str) -> String {
    let v = &svc["environment"][key];
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => panic!("environment {key}: {other:?}"),
    }
}

fn command(svc: &Value) -> Vec<String> {
    svc["command"]
        .as_sequence()
        .expect("command is a list")
        .iter()
        .map(|v| v.as_str().expect("string").to_string())
        .collect()
}

fn port_after(args: &[String], flag: &str) -> u16 {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} in {args:?}"));
    args[i + 1].parse().expect("port")
}

#[test]
fn compose_names_the_same_services_as_the_local_stack() {
    let c = compose();
    let names: BTreeSet<String> = c["services"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    let mut expected: BTreeSet<String> =
        ["toxiproxy", "redis", "postgres"].map(String::from).into();
    expected.extend((1..=plan().broker_count()).map(|i| format!("kafka-{i}")));
    assert!(
        expected.is_subset(&names),
        "compose services {names:?} lack some of {expected:?}"
    );
    let extra: Vec<_> = names.difference(&expected).collect();
    assert_eq!(extra, ["squall"], "unexpected services");
}

#[test]
fn compose_publishes_the_plan_s_client_ports_through_toxiproxy() {
    let c = compose();
    let plan = plan();
    let published: BTreeSet<u16> = service(&c, "toxiproxy")["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            p.as_str()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    let mut expected: BTreeSet<u16> =
        [plan.toxiproxy_api, plan.redis_proxy, plan.postgres_proxy].into();
    expected.extend(plan.brokers.iter().map(|b| b.client_proxy));
    assert_eq!(published, expected);
    let api = port_after(&command(service(&c, "toxiproxy")), "-port");
    assert_eq!(api, plan.toxiproxy_api);
}

#[test]
fn compose_servers_listen_on_the_plan_s_ports() {
    let c = compose();
    let plan = plan();
    assert_eq!(
        port_after(&command(service(&c, "redis")), "--port"),
        plan.redis
    );
    assert_eq!(
        port_after(&command(service(&c, "postgres")), "-p"),
        plan.postgres
    );
    let voters = (1..=3)
        .map(|i| {
            format!(
                "{i}@kafka-{i}.controller.squall:{}",
                plan.broker(i).unwrap().controller
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    for id in 1..=plan.broker_count() {
        let b = plan.broker(id).unwrap();
        let svc = service(&c, &format!("kafka-{id}"));
        assert_eq!(env(svc, "KAFKA_NODE_ID"), id.to_string());
        assert_eq!(
            env(svc, "KAFKA_LISTENERS"),
            format!(
                "CLIENT://0.0.0.0:{},INTERNAL://0.0.0.0:{},CONTROLLER://0.0.0.0:{}",
                b.client, b.replication, b.controller
            )
        );
        assert_eq!(
            env(svc, "KAFKA_ADVERTISED_LISTENERS"),
            format!(
                "CLIENT://127.0.0.1:{},INTERNAL://kafka-{id}.replication.squall:{},CONTROLLER://kafka-{id}.controller.squall:{}",
                b.client_proxy, b.replication, b.controller
            )
        );
        assert_eq!(env(svc, "KAFKA_CONTROLLER_QUORUM_VOTERS"), voters);
        assert_eq!(env(svc, "KAFKA_MIN_INSYNC_REPLICAS"), "2");
        assert_eq!(env(svc, "KAFKA_DEFAULT_REPLICATION_FACTOR"), "3");
        assert_eq!(env(svc, "KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"), "false");
        // Each broker resolves its peers to Toxiproxy on its own network, itself to loopback.
        let hosts: BTreeSet<String> = svc["extra_hosts"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap().to_string())
            .collect();
        for peer in 1..=plan.broker_count() {
            let ip = if peer == id {
                "127.0.0.1".to_string()
            } else {
                format!("172.28.{id}.100")
            };
            for kind in ["replication", "controller"] {
                let entry = format!("kafka-{peer}.{kind}.squall:{ip}");
                assert!(hosts.contains(&entry), "kafka-{id} lacks {entry}");
            }
        }
    }
}

#[test]
fn toxiproxy_config_has_every_local_link_with_the_same_ports() {
    let text =
        std::fs::read_to_string(repo_file("docker/toxiproxy.json")).expect("docker/toxiproxy.json");
    let proxies: Vec<serde_json::Value> = serde_json::from_str(&text).expect("JSON");
    let plan = plan();
    let links = all_links(&plan);
    assert_eq!(proxies.len(), links.len(), "proxy count");
    for link in &links {
        let p = proxies
            .iter()
            .find(|p| p["name"] == link.name.as_str())
            .unwrap_or_else(|| panic!("docker/toxiproxy.json lacks {}", link.name));
        let listen = p["listen"].as_str().unwrap();
        let upstream = p["upstream"].as_str().unwrap();
        let port = |s: &str| s.rsplit(':').next().unwrap().parse::<u16>().unwrap();
        assert_eq!(port(listen), link.port, "{} listen port", link.name);
        assert_eq!(
            port(upstream),
            port(&link.upstream),
            "{} upstream port",
            link.name
        );
        let (host, listen_ip) = match link.kind {
            LinkKind::KafkaClient { broker } => (format!("kafka-{broker}"), "0.0.0.0".to_string()),
            LinkKind::Replication { from, to } | LinkKind::Controller { from, to } => {
                (format!("kafka-{to}"), format!("172.28.{from}.100"))
            }
            LinkKind::Redis => ("redis".into(), "0.0.0.0".into()),
            LinkKind::Postgres => ("postgres".into(), "0.0.0.0".into()),
        };
        assert_eq!(
            upstream.split(':').next().unwrap(),
            host,
            "{} upstream host",
            link.name
        );
        assert_eq!(
            listen.split(':').next().unwrap(),
            listen_ip,
            "{} listen address",
            link.name
        );
    }
}
