//! Dead letters: a poison event (undecodable, unknown version, failing validation) is
//! copied to `<topic>-dlq` unchanged, with why and where it came from in headers, so a
//! person can inspect it and replay it once fixed.

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use std::time::Duration;

pub const H_ERROR: &str = "dlq-error";
pub const H_TOPIC: &str = "dlq-source-topic";
pub const H_PARTITION: &str = "dlq-source-partition";
pub const H_OFFSET: &str = "dlq-source-offset";
pub const H_WORKER: &str = "dlq-worker";

pub fn dlq_topic(topic: &str) -> String {
    format!("{topic}-dlq")
}

/// Writes the dead letter and waits for its acknowledgement (acks=all): the source offset
/// is committed only after the dead letter is safe.
#[allow(clippy::too_many_arguments)]
pub async fn send(
    producer: &FutureProducer,
    worker: &str,
    topic: &str,
    partition: i32,
    offset: i64,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    error: &str,
) -> Result<(), String> {
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: H_ERROR,
            value: Some(error),
        })
        .insert(Header {
            key: H_TOPIC,
            value: Some(topic),
        })
        .insert(Header {
            key: H_PARTITION,
            value: Some(&partition.to_string()),
        })
        .insert(Header {
            key: H_OFFSET,
            value: Some(&offset.to_string()),
        })
        .insert(Header {
            key: H_WORKER,
            value: Some(worker),
        });
    let dlq = dlq_topic(topic);
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&dlq).headers(headers);
    if let Some(k) = key {
        record = record.key(k);
    }
    if let Some(p) = payload {
        record = record.payload(p);
    }
    producer
        .send(record, Timeout::After(Duration::from_secs(30)))
        .await
        .map(|_| ())
        .map_err(|(e, _)| format!("dead letter to {dlq}: {e}"))
}
