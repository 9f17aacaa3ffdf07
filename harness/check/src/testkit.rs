//! Test helpers (compiled for tests only): a builder for small hand-written histories.
//! Times are given in milliseconds and recorded in µs; users are `u0..`, conversations
//! `conv0..`, all in tenant `t`.

use squall_history::{
    ConversationInfo, Header, Kind, Op, UserInfo, Value, Via, HARNESS, NEMESIS, RECOVERY,
};

use crate::Facts;

pub struct H {
    pub header: Header,
    pub ops: Vec<Op>,
}

fn us(ms: u64) -> u64 {
    ms * 1000
}

impl H {
    pub fn new(users: usize, convs: &[&[u32]]) -> H {
        H {
            header: Header {
                format: squall_history::FORMAT.into(),
                version: squall_history::VERSION,
                run_id: "r".into(),
                scenario: "test".into(),
                seed: 1,
                origin_wall_ms: 0,
                nodes: vec!["http://127.0.0.1:1".into()],
                users: (0..users)
                    .map(|i| UserInfo {
                        id: format!("u{i}"),
                        tenant: "t".into(),
                        node: 1,
                    })
                    .collect(),
                conversations: convs
                    .iter()
                    .enumerate()
                    .map(|(i, m)| ConversationInfo {
                        id: format!("conv{i}"),
                        tenant: "t".into(),
                        members: m.to_vec(),
                    })
                    .collect(),
            },
            ops: Vec::new(),
        }
    }

    pub fn op(&mut self, ms: u64, p: u32, k: Kind, v: Value) -> &mut H {
        self.ops.push(Op { t: us(ms), p, k, v });
        self
    }

    pub fn facts(&self) -> Facts {
        Facts::from_history(&self.header, self.ops.iter().cloned())
    }

    pub fn connect(&mut self, ms: u64, p: u32) -> &mut H {
        self.op(ms, p, Kind::Invoke, Value::Connect { node: 1, err: None });
        self.op(ms, p, Kind::Ok, Value::Connect { node: 1, err: None })
    }

    pub fn disconnect(&mut self, ms: u64, p: u32) -> &mut H {
        self.op(
            ms,
            p,
            Kind::Info,
            Value::Disconnect {
                node: 1,
                reason: "closed".into(),
            },
        )
    }

    fn send_v(c: u32, m: &str) -> Value {
        Value::Send {
            c,
            m: m.into(),
            due: None,
            size: None,
            seq: None,
            mid: None,
            dup: None,
            err: None,
        }
    }

    /// A send invoke, due at its own time.
    pub fn send(&mut self, ms: u64, p: u32, c: u32, m: &str) -> &mut H {
        self.send_due(ms, ms, p, c, m)
    }

    pub fn send_due(&mut self, ms: u64, due_ms: u64, p: u32, c: u32, m: &str) -> &mut H {
        let mut v = Self::send_v(c, m);
        if let Value::Send { due, size, .. } = &mut v {
            *due = Some(us(due_ms));
            *size = Some(10);
        }
        self.op(ms, p, Kind::Invoke, v)
    }

    pub fn ok(&mut self, ms: u64, p: u32, c: u32, m: &str, s: i64, message_id: &str) -> &mut H {
        let mut v = Self::send_v(c, m);
        if let Value::Send { seq, mid, dup, .. } = &mut v {
            *seq = Some(s);
            *mid = Some(message_id.into());
            *dup = Some(false);
        }
        self.op(ms, p, Kind::Ok, v)
    }

    pub fn fail(&mut self, ms: u64, p: u32, c: u32, m: &str) -> &mut H {
        let mut v = Self::send_v(c, m);
        if let Value::Send { err, .. } = &mut v {
            *err = Some("refused".into());
        }
        self.op(ms, p, Kind::Fail, v)
    }

    pub fn info(&mut self, ms: u64, p: u32, c: u32, m: &str) -> &mut H {
        let mut v = Self::send_v(c, m);
        if let Value::Send { err, .. } = &mut v {
            *err = Some("no ack within the ack timeout".into());
        }
        self.op(ms, p, Kind::Info, v)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn deliver(
        &mut self,
        ms: u64,
        p: u32,
        c: u32,
        s: i64,
        m: &str,
        from: u32,
        via: Via,
    ) -> &mut H {
        self.op(
            ms,
            p,
            Kind::Ok,
            Value::Deliver {
                c,
                s,
                m: m.into(),
                from,
                via,
            },
        )
    }

    pub fn sync(&mut self, ms: u64, p: u32, c: u32, after: i64) -> &mut H {
        self.op(
            ms,
            p,
            Kind::Invoke,
            Value::Sync {
                c,
                after,
                last: None,
                n: None,
                err: None,
            },
        )
    }

    pub fn sync_ok(&mut self, ms: u64, p: u32, c: u32, after: i64, last: i64, n: u32) -> &mut H {
        self.op(
            ms,
            p,
            Kind::Ok,
            Value::Sync {
                c,
                after,
                last: Some(last),
                n: Some(n),
                err: None,
            },
        )
    }

    pub fn sync_fail(&mut self, ms: u64, p: u32, c: u32, after: i64, err: &str) -> &mut H {
        self.op(
            ms,
            p,
            Kind::Fail,
            Value::Sync {
                c,
                after,
                last: None,
                n: None,
                err: Some(err.into()),
            },
        )
    }

    pub fn phase(&mut self, ms: u64, name: &str) -> &mut H {
        self.op(ms, HARNESS, Kind::Info, Value::Phase { name: name.into() })
    }

    pub fn fault(&mut self, start_ms: u64, end_ms: u64, id: u32) -> &mut H {
        let v = Value::Fault {
            id,
            kind: "partition".into(),
            target: "node1".into(),
            err: None,
        };
        self.op(start_ms, NEMESIS, Kind::Invoke, v.clone());
        self.op(end_ms, NEMESIS, Kind::Ok, v)
    }

    pub fn stream(&mut self, ms: u64, due_ms: u64, p: u32, c: u32) -> &mut H {
        self.op(
            ms,
            p,
            Kind::Invoke,
            Value::Stream {
                c,
                due: Some(us(due_ms)),
                session: None,
                http: false,
                err: None,
            },
        )
    }

    pub fn stream_ok(&mut self, ms: u64, p: u32, c: u32, session: &str) -> &mut H {
        self.op(
            ms,
            p,
            Kind::Ok,
            Value::Stream {
                c,
                due: None,
                session: Some(session.into()),
                http: false,
                err: None,
            },
        )
    }

    pub fn resume(&mut self, ms: u64, p: u32, session: &str, after: i64) -> &mut H {
        self.op(
            ms,
            p,
            Kind::Invoke,
            Value::Resume {
                session: session.into(),
                after,
            },
        )
    }

    pub fn chunk(&mut self, ms: u64, p: u32, session: &str, idx: i64) -> &mut H {
        self.op(
            ms,
            p,
            Kind::Ok,
            Value::Chunk {
                session: session.into(),
                idx,
            },
        )
    }

    pub fn stream_end(
        &mut self,
        ms: u64,
        p: u32,
        session: &str,
        outcome: &str,
        total: i64,
    ) -> &mut H {
        self.op(
            ms,
            p,
            Kind::Ok,
            Value::StreamEnd {
                session: session.into(),
                outcome: outcome.into(),
                total,
            },
        )
    }

    /// A completed recovery read of `c` (as member `u`) returning `msgs` as `(seq, m)`.
    pub fn recovery(&mut self, ms: u64, c: u32, u: u32, msgs: &[(i64, &str)]) -> &mut H {
        self.op(
            ms,
            RECOVERY,
            Kind::Invoke,
            Value::RecoveryRead {
                c,
                u,
                last: None,
                n: None,
                err: None,
            },
        );
        for &(s, m) in msgs {
            self.op(
                ms,
                RECOVERY,
                Kind::Ok,
                Value::RecoveryMsg {
                    c,
                    s,
                    m: m.into(),
                    from: 0,
                },
            );
        }
        let last = msgs.iter().map(|x| x.0).max().unwrap_or(0);
        self.op(
            ms,
            RECOVERY,
            Kind::Ok,
            Value::RecoveryRead {
                c,
                u,
                last: Some(last),
                n: Some(msgs.len() as u32),
                err: None,
            },
        )
    }

    /// A recovery read of `c` that failed.
    pub fn recovery_fail(&mut self, ms: u64, c: u32, u: u32) -> &mut H {
        self.op(
            ms,
            RECOVERY,
            Kind::Invoke,
            Value::RecoveryRead {
                c,
                u,
                last: None,
                n: None,
                err: None,
            },
        );
        self.op(
            ms,
            RECOVERY,
            Kind::Fail,
            Value::RecoveryRead {
                c,
                u,
                last: None,
                n: None,
                err: Some("no node answered".into()),
            },
        )
    }
}
