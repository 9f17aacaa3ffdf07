//! A minimal Kafka protocol client for one request: Metadata v4 to one chosen broker.
//! librdkafka routes a metadata request to whichever connected broker it likes, but a
//! partition test must compare what each broker itself believes (an isolated broker's
//! view is stale), so this asks exactly the broker at the address given.

use std::collections::BTreeMap;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::{Result, StackError};
use crate::kafka::{ClusterView, PartitionView};

const API_METADATA: i16 = 3;
const VERSION: i16 = 4;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        let end = end.ok_or_else(|| StackError::Kafka("metadata response ended early".into()))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn i16(&mut self) -> Result<i16> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self) -> Result<i32> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self) -> Result<Option<String>> {
        let len = self.i16()?;
        if len < 0 {
            return Ok(None);
        }
        Ok(Some(
            String::from_utf8_lossy(self.take(len as usize)?).into_owned(),
        ))
    }
    fn count(&mut self) -> Result<usize> {
        Ok(self.i32()?.max(0) as usize)
    }
    fn i32s(&mut self) -> Result<Vec<i32>> {
        let n = self.count()?;
        (0..n).map(|_| self.i32()).collect()
    }
}

fn request(correlation: i32) -> Vec<u8> {
    let client = b"squall";
    let mut body = Vec::new();
    body.extend_from_slice(&API_METADATA.to_be_bytes());
    body.extend_from_slice(&VERSION.to_be_bytes());
    body.extend_from_slice(&correlation.to_be_bytes());
    body.extend_from_slice(&(client.len() as i16).to_be_bytes());
    body.extend_from_slice(client);
    body.extend_from_slice(&(-1i32).to_be_bytes()); // all topics
    body.push(0); // allow_auto_topic_creation = false
    let mut out = (body.len() as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

fn parse(buf: &[u8], correlation: i32, node_id_hint: Option<i32>) -> Result<ClusterView> {
    let mut r = Reader { buf, pos: 0 };
    if r.i32()? != correlation {
        return Err(StackError::Kafka(
            "metadata response with the wrong correlation id".into(),
        ));
    }
    let _throttle = r.i32()?;
    let mut brokers = Vec::new();
    for _ in 0..r.count()? {
        brokers.push(r.i32()?);
        r.string()?;
        r.i32()?;
        r.string()?; // rack
    }
    brokers.sort();
    r.string()?; // cluster id
    let _controller = r.i32()?;
    let mut topics = BTreeMap::new();
    for _ in 0..r.count()? {
        let _error = r.i16()?;
        let name = r.string()?.unwrap_or_default();
        let _internal = r.take(1)?;
        let mut parts = Vec::new();
        for _ in 0..r.count()? {
            let _error = r.i16()?;
            let partition = r.i32()?;
            let leader = r.i32()?;
            let replicas = r.i32s()?;
            let isr = r.i32s()?;
            parts.push(PartitionView {
                partition,
                leader,
                replicas,
                isr,
            });
        }
        parts.sort_by_key(|p| p.partition);
        if !name.starts_with("__") {
            topics.insert(name, parts);
        }
    }
    Ok(ClusterView {
        answered_by: node_id_hint.unwrap_or(-1),
        brokers,
        topics,
    })
}

/// Asks the broker at `addr` (and only it) for its metadata. `node_id` is recorded as the
/// answering broker.
pub async fn metadata_from(addr: &str, node_id: i32, timeout: Duration) -> Result<ClusterView> {
    let fail = |e: String| StackError::Kafka(format!("metadata from {addr}: {e}"));
    let exchange = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let correlation = 7;
        s.write_all(&request(correlation))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut len = [0u8; 4];
        s.read_exact(&mut len)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let len = i32::from_be_bytes(len);
        if !(0..=64 * 1024 * 1024).contains(&len) {
            return Err(fail(format!("implausible response size {len}")));
        }
        let mut buf = vec![0u8; len as usize];
        s.read_exact(&mut buf)
            .await
            .map_err(|e| fail(e.to_string()))?;
        parse(&buf, correlation, Some(node_id))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| fail(format!("no answer within {timeout:?}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_is_length_prefixed_metadata_v4() {
        let r = request(7);
        assert_eq!(
            i32::from_be_bytes([r[0], r[1], r[2], r[3]]) as usize,
            r.len() - 4
        );
        assert_eq!(&r[4..8], &[0, 3, 0, 4]);
        assert_eq!(*r.last().unwrap(), 0);
    }

    #[test]
    fn parses_a_hand_built_response() {
        let mut b = Vec::new();
        b.extend_from_slice(&7i32.to_be_bytes()); // correlation
        b.extend_from_slice(&0i32.to_be_bytes()); // throttle
        b.extend_from_slice(&1i32.to_be_bytes()); // one broker
        b.extend_from_slice(&2i32.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        b.push(b'h');
        b.extend_from_slice(&9092i32.to_be_bytes());
        b.extend_from_slice(&(-1i16).to_be_bytes()); // rack null
        b.extend_from_slice(&(-1i16).to_be_bytes()); // cluster id null
        b.extend_from_slice(&2i32.to_be_bytes()); // controller
        b.extend_from_slice(&1i32.to_be_bytes()); // one topic
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        b.push(b't');
        b.push(0);
        b.extend_from_slice(&1i32.to_be_bytes()); // one partition
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&0i32.to_be_bytes());
        b.extend_from_slice(&2i32.to_be_bytes()); // leader
        b.extend_from_slice(&1i32.to_be_bytes());
        b.extend_from_slice(&2i32.to_be_bytes()); // replicas [2]
        b.extend_from_slice(&1i32.to_be_bytes());
        b.extend_from_slice(&2i32.to_be_bytes()); // isr [2]
        let v = parse(&b, 7, Some(2)).unwrap();
        assert_eq!(v.brokers, vec![2]);
        assert_eq!(v.topics["t"][0].leader, 2);
        assert!(parse(&b[..b.len() - 2], 7, None).is_err());
    }
}
