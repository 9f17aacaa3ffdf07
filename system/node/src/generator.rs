//! The stand-in for the model behind a stream: deterministic and seedable, so a node
//! taking a session over generates the same chunks the first owner would have, and tests
//! know in advance how a prompt's stream goes (how many chunks, where it fails).

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

use crate::config::StreamConfig;

const WORDS: &[&str] = &[
    "the",
    "event",
    "stream",
    "replays",
    "every",
    "chunk",
    "in",
    "order",
    "so",
    "clients",
    "resume",
    "where",
    "they",
    "left",
    "off",
    "after",
    "a",
    "reconnect",
    "kafka",
    "keeps",
    "history",
    "while",
    "redis",
    "fans",
    "out",
    "live",
    "messages",
    "across",
    "nodes",
    "and",
    "postgres",
    "stores",
];

/// What the generator will do for a prompt: how many chunks, and where it fails (if it does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub chunks: i64,
    pub fail_at: Option<i64>,
}

pub struct Generator {
    cfg: StreamConfig,
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Generator {
    pub fn new(cfg: StreamConfig) -> Self {
        Generator { cfg }
    }

    pub fn config(&self) -> &StreamConfig {
        &self.cfg
    }

    /// Same seed and prompt, same plan.
    pub fn plan(&self, prompt: &str) -> Plan {
        let mut rng = Pcg64::seed_from_u64(self.cfg.seed ^ fnv(prompt));
        let fails = rng.random_bool(self.cfg.error_rate);
        Plan {
            chunks: self.cfg.chunks,
            fail_at: fails.then(|| rng.random_range(0..self.cfg.chunks)),
        }
    }

    /// The text of chunk `index` (same seed, prompt and index: same text).
    pub fn chunk_text(&self, prompt: &str, index: i64) -> String {
        let mut rng = Pcg64::seed_from_u64(
            self.cfg.seed ^ fnv(prompt) ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let words: Vec<&str> = (0..self.cfg.words_per_chunk)
            .map(|_| WORDS[rng.random_range(0..WORDS.len())])
            .collect();
        format!("{} ", words.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_is_deterministic_and_seedable() {
        let a = Generator::new(StreamConfig::default());
        let b = Generator::new(StreamConfig::default());
        assert_eq!(a.chunk_text("hello", 3), b.chunk_text("hello", 3));
        assert_ne!(a.chunk_text("hello", 3), a.chunk_text("hello", 4));
        let other = Generator::new(StreamConfig {
            seed: 7,
            ..StreamConfig::default()
        });
        assert_ne!(a.chunk_text("hello", 3), other.chunk_text("hello", 3));
        assert_eq!(a.chunk_text("x", 0).split_whitespace().count(), 5);
    }

    #[test]
    fn error_rate_decides_failures() {
        let never = Generator::new(StreamConfig {
            error_rate: 0.0,
            ..StreamConfig::default()
        });
        let always = Generator::new(StreamConfig {
            error_rate: 1.0,
            ..StreamConfig::default()
        });
        for p in ["a", "b", "c"] {
            assert_eq!(never.plan(p).fail_at, None);
            let at = always.plan(p).fail_at.unwrap();
            assert!((0..20).contains(&at));
            assert_eq!(always.plan(p), always.plan(p));
        }
    }
}
