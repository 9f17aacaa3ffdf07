//! Retention: deleting published outbox rows and workers' processed-event markers once
//! they are older than their keep time. Deletes go in bounded batches (one short
//! statement each) so a large backlog never holds locks or a transaction for long.

use crate::{Result, Store};

impl Store {
    /// Deletes outbox rows published before `before_ms`, `batch` rows per statement
    /// (oldest ids first); pending rows are never touched. Returns the rows deleted.
    pub async fn prune_published_outbox(&self, before_ms: i64, batch: i64) -> Result<u64> {
        let mut total = 0;
        loop {
            let n = sqlx::query(
                "DELETE FROM outbox WHERE id IN (
                    SELECT id FROM outbox WHERE published_at_ms < $1 ORDER BY id LIMIT $2)",
            )
            .bind(before_ms)
            .bind(batch.max(1))
            .execute(&self.pool)
            .await?
            .rows_affected();
            total += n;
            if n < batch.max(1) as u64 {
                return Ok(total);
            }
        }
    }

    /// Deletes processed-event markers (every consumer group) written before `before_ms`,
    /// `batch` rows per statement. Returns the rows deleted.
    ///
    /// A marker only matters while its event can still be delivered again: keep them
    /// longer than the longest retention of the topics the workers read (the default
    /// keep time of `chatstream workers` is 30 days, the `notifications` retention).
    pub async fn prune_processed_events(&self, before_ms: i64, batch: i64) -> Result<u64> {
        let mut total = 0;
        loop {
            // Markers are never updated, so their ctids are stable: a TID scan deletes
            // exactly the batch the subquery found.
            let n = sqlx::query(
                "DELETE FROM processed_events WHERE ctid = ANY(ARRAY(
                    SELECT ctid FROM processed_events WHERE processed_at_ms < $1 LIMIT $2))",
            )
            .bind(before_ms)
            .bind(batch.max(1))
            .execute(&self.pool)
            .await?
            .rows_affected();
            total += n;
            if n < batch.max(1) as u64 {
                return Ok(total);
            }
        }
    }
}
