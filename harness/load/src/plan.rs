//! The plan of a run, computed from the scenario and its seed before anything starts: who
//! the users are and which node each connects to first, which conversations exist and
//! who is in them, and the open-loop arrival schedule (every operation's intended time).
//! The same scenario and seed give the same plan, so a run is reproducible from them.

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use squall_scenario::{OpKind, Placement, Scenario};
use std::time::Duration;

/// A simulated user.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedUser {
    pub id: String,
    pub tenant: String,
    /// Index into the run's nodes (0-based).
    pub home: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlannedConversation {
    pub id: String,
    pub tenant: String,
    /// User indices; the first creates the conversation.
    pub members: Vec<u32>,
}

/// Users and conversations.
#[derive(Debug, Clone, PartialEq)]
pub struct Population {
    pub users: Vec<PlannedUser>,
    pub conversations: Vec<PlannedConversation>,
}

impl Population {
    /// `tag` keeps ids of this run apart from earlier runs' on a reused database.
    pub fn plan(scenario: &Scenario, nodes: usize, tag: &str) -> Population {
        let load = &scenario.load;
        let nodes = nodes.max(1);
        let mut rng = Pcg64::seed_from_u64(scenario.seed ^ 0x5eed_0001);
        let tenants = load.tenants.max(1) as usize;
        let random_homes = matches!(load.conversations.placement, Placement::Random);
        let users: Vec<PlannedUser> = (0..load.users as usize)
            .map(|i| PlannedUser {
                id: format!("{tag}-u{i}"),
                tenant: format!("{tag}-t{}", i % tenants),
                // Round-robin over the users of a tenant keeps every tenant on every node.
                home: if random_homes {
                    rng.random_range(0..nodes)
                } else {
                    (i / tenants) % nodes
                },
            })
            .collect();
        let by_tenant: Vec<Vec<u32>> = (0..tenants)
            .map(|t| {
                (t..users.len())
                    .step_by(tenants)
                    .map(|i| i as u32)
                    .collect()
            })
            .collect();
        let conversations = (0..load.conversations.count as usize)
            .map(|j| {
                let tenant_users = &by_tenant[j % tenants];
                let wanted = (load.conversations.members.sample(rng.random::<f64>()) as usize)
                    .clamp(1, tenant_users.len());
                let members = pick_members(
                    &mut rng,
                    tenant_users,
                    &users,
                    wanted,
                    &load.conversations.placement,
                    nodes,
                );
                PlannedConversation {
                    id: format!("{tag}-c{j}"),
                    tenant: users[members[0] as usize].tenant.clone(),
                    members,
                }
            })
            .collect();
        Population {
            users,
            conversations,
        }
    }

    /// Each user's conversations (indices), in conversation order.
    pub fn memberships(&self) -> Vec<Vec<u32>> {
        let mut out = vec![Vec::new(); self.users.len()];
        for (c, conv) in self.conversations.iter().enumerate() {
            for &m in &conv.members {
                out[m as usize].push(c as u32);
            }
        }
        out
    }
}

fn pick_members(
    rng: &mut Pcg64,
    pool: &[u32],
    users: &[PlannedUser],
    wanted: usize,
    placement: &Placement,
    nodes: usize,
) -> Vec<u32> {
    let anchor = pool[rng.random_range(0..pool.len())];
    let mut chosen = vec![anchor];
    let candidates: Vec<u32> = match placement {
        Placement::SameNode => {
            let home = users[anchor as usize].home;
            pool.iter()
                .copied()
                .filter(|&u| users[u as usize].home == home)
                .collect()
        }
        _ => pool.to_vec(),
    };
    let mut remaining: Vec<u32> = candidates.into_iter().filter(|&u| u != anchor).collect();
    while chosen.len() < wanted && !remaining.is_empty() {
        let pick = match placement {
            Placement::CrossNode => {
                // Prefer a user on the node least represented so far.
                let mut per_node = vec![0usize; nodes];
                for &c in &chosen {
                    per_node[users[c as usize].home] += 1;
                }
                let least = per_node.iter().copied().min().unwrap_or(0);
                let on_least: Vec<usize> = remaining
                    .iter()
                    .enumerate()
                    .filter(|(_, &u)| per_node[users[u as usize].home] == least)
                    .map(|(i, _)| i)
                    .collect();
                if on_least.is_empty() {
                    rng.random_range(0..remaining.len())
                } else {
                    on_least[rng.random_range(0..on_least.len())]
                }
            }
            _ => rng.random_range(0..remaining.len()),
        };
        chosen.push(remaining.swap_remove(pick));
    }
    chosen
}

/// One operation of the open-loop schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Arrival {
    /// Intended time since the start of the load (warm-up included).
    pub due: Duration,
    pub kind: OpKind,
    pub conversation: u32,
    /// The acting user (a member of `conversation`).
    pub user: u32,
    /// Message size in bytes (chat messages and stream prompts).
    pub size: u32,
}

/// The arrival schedule, generated lazily: arrivals are spaced by the inverse of the
/// instantaneous rate (deterministic spacing, as Vegeta's constant pacer does), the kind
/// drawn from the mix, the conversation uniformly, the sender among its members.
pub struct Arrivals<'a> {
    scenario: &'a Scenario,
    population: &'a Population,
    rng: Pcg64,
    t: f64,
    end: f64,
    weights: Vec<(OpKind, f64)>,
    total_weight: f64,
}

impl<'a> Arrivals<'a> {
    pub fn new(scenario: &'a Scenario, population: &'a Population) -> Self {
        let weights: Vec<(OpKind, f64)> = scenario
            .load
            .mix
            .weights()
            .into_iter()
            .filter(|(_, w)| *w > 0.0)
            .collect();
        let total_weight = weights.iter().map(|(_, w)| w).sum();
        Arrivals {
            scenario,
            population,
            rng: Pcg64::seed_from_u64(scenario.seed ^ 0xa441_0002),
            t: 0.0,
            end: (scenario.load.warmup + scenario.load.duration).as_secs_f64(),
            weights,
            total_weight,
        }
    }

    fn kind(&mut self) -> OpKind {
        let mut x = self.rng.random::<f64>() * self.total_weight;
        for (k, w) in &self.weights {
            if x < *w {
                return *k;
            }
            x -= w;
        }
        self.weights.last().map(|(k, _)| *k).unwrap_or(OpKind::Chat)
    }
}

impl Iterator for Arrivals<'_> {
    type Item = Arrival;

    fn next(&mut self) -> Option<Arrival> {
        if self.population.conversations.is_empty() || self.weights.is_empty() {
            return None;
        }
        // Skip silent stretches (rate 0) in 10 ms steps.
        let mut rate = self.scenario.load.rate.at(Duration::from_secs_f64(self.t));
        while rate <= 0.0 {
            self.t += 0.01;
            if self.t >= self.end {
                return None;
            }
            rate = self.scenario.load.rate.at(Duration::from_secs_f64(self.t));
        }
        if self.t >= self.end {
            return None;
        }
        let due = Duration::from_secs_f64(self.t);
        self.t += 1.0 / rate;
        let kind = self.kind();
        let conversation = self
            .rng
            .random_range(0..self.population.conversations.len());
        let members = &self.population.conversations[conversation].members;
        let user = members[self.rng.random_range(0..members.len())];
        let size = self
            .scenario
            .load
            .message_size
            .sample(self.rng.random::<f64>())
            .clamp(1, u64::from(u32::MAX)) as u32;
        Some(Arrival {
            due,
            kind,
            conversation: conversation as u32,
            user,
            size,
        })
    }
}
