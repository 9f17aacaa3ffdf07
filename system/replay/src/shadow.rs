//! A projection table's shadow, for bulk rebuilds: an empty copy of the table with none of
//! its indexes, filled by COPY, then indexed with one sorted build per index (all of them
//! at once, each on its own connection), then swapped in for the table in one short
//! transaction. Readers see the old projection until the new one is whole, and a rebuild
//! that dies leaves the old one as it was (and a shadow the next rebuild drops).

use sqlx::PgPool;

/// Memory for each index build's sort (PostgreSQL's default, 64 MB, spills a GIN build of
/// a few hundred thousand documents to disk).
const INDEX_BUILD_MEMORY: &str = "256MB";

/// One index of the table, to be built on the shadow under a temporary name.
#[derive(Debug, Clone)]
struct Index {
    name: String,
    unique: bool,
    /// The definition from `USING` on (`USING btree (event_id)`), as PostgreSQL prints it.
    method_and_columns: String,
    /// The primary key (`PRIMARY KEY`) or unique constraint (`UNIQUE`) the index backs.
    constraint: Option<(String, &'static str)>,
}

impl Index {
    fn shadow_name(&self) -> String {
        format!("{}_rebuild", self.name)
    }
}

/// An index as the catalog lists it: name, definition, unique, constraint and its kind.
type IndexRow = (String, String, bool, Option<String>, Option<String>);

/// The shadow of `table`: created empty by [`Shadow::create`], filled by the caller (COPY
/// into [`Shadow::name`]), then [`Shadow::build_indexes`] and [`Shadow::swap`].
#[derive(Debug)]
pub struct Shadow {
    table: String,
    name: String,
    indexes: Vec<Index>,
    /// The table's storage parameters (`fillfactor=90`, …), given to the shadow at the swap.
    options: Vec<String>,
}

impl Shadow {
    /// Drops a shadow left by a rebuild that died, and creates `table`'s shadow: the same
    /// columns, defaults, generated columns and checks, no index, and autovacuum off until
    /// the swap (an ANALYZE of a half-loaded shadow would only take CPU from the load).
    pub async fn create(pool: &PgPool, table: &str) -> Result<Shadow, sqlx::Error> {
        let name = format!("{table}_rebuild");
        sqlx::query(&format!("DROP TABLE IF EXISTS {name}"))
            .execute(pool)
            .await?;
        sqlx::query(&format!(
            "CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS INCLUDING GENERATED
                                  INCLUDING CONSTRAINTS INCLUDING STORAGE)
             WITH (autovacuum_enabled = false)"
        ))
        .execute(pool)
        .await?;
        let (options,): (Vec<String>,) = sqlx::query_as(
            "SELECT coalesce(reloptions, '{}') FROM pg_class WHERE oid = $1::regclass",
        )
        .bind(table)
        .fetch_one(pool)
        .await?;
        let rows: Vec<IndexRow> = sqlx::query_as(
            "SELECT c.relname::text, pg_get_indexdef(i.indexrelid), i.indisunique,
                    con.conname::text, con.contype::text
             FROM pg_index i
             JOIN pg_class c ON c.oid = i.indexrelid
             LEFT JOIN pg_constraint con
               ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
             WHERE i.indrelid = $1::regclass
             ORDER BY c.relname",
        )
        .bind(table)
        .fetch_all(pool)
        .await?;
        let mut indexes = Vec::with_capacity(rows.len());
        for (index, definition, unique, constraint, kind) in rows {
            let unsupported =
                |why: &str| sqlx::Error::Protocol(format!("index {index} of {table}: {why}"));
            let method_and_columns = definition
                .find(" USING ")
                .map(|at| definition[at + 1..].to_string())
                .ok_or_else(|| unsupported(&format!("no USING in {definition:?}")))?;
            let constraint = match (constraint, kind.as_deref()) {
                (None, _) => None,
                (Some(c), Some("p")) => Some((c, "PRIMARY KEY")),
                (Some(c), Some("u")) => Some((c, "UNIQUE")),
                (Some(c), _) => {
                    return Err(unsupported(&format!(
                        "backs constraint {c}, which a rebuild cannot re-create from an index"
                    )))
                }
            };
            // PostgreSQL cuts longer names to 63 bytes, and the swap renames by name.
            if index.len() + "_rebuild".len() > 63 {
                return Err(unsupported("name too long for a shadow name"));
            }
            indexes.push(Index {
                name: index,
                unique,
                method_and_columns,
                constraint,
            });
        }
        Ok(Shadow {
            table: table.to_string(),
            name,
            indexes,
            options,
        })
    }

    /// The shadow table's name, to fill.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Builds every index of the table on the filled shadow, all at once, one connection
    /// each (a sorted build of a full table costs a fraction of keeping the index up
    /// row by row), each build on its own backend only: the builds already run side by
    /// side, and parallel workers for each would only share the same cores.
    pub async fn build_indexes(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let builds = self.indexes.iter().map(|index| async move {
            let mut tx = pool.begin().await?;
            sqlx::query(&format!(
                "SET LOCAL maintenance_work_mem = '{INDEX_BUILD_MEMORY}'"
            ))
            .execute(&mut *tx)
            .await?;
            sqlx::query("SET LOCAL max_parallel_maintenance_workers = 0")
                .execute(&mut *tx)
                .await?;
            sqlx::query(&format!(
                "CREATE {unique}INDEX {shadow_index} ON {shadow} {how}",
                unique = if index.unique { "UNIQUE " } else { "" },
                shadow_index = index.shadow_name(),
                shadow = self.name,
                how = index.method_and_columns,
            ))
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        });
        futures::future::try_join_all(builds).await?;
        Ok(())
    }

    /// Replaces the table by the shadow in one transaction: the table dropped, the shadow
    /// renamed to it, its indexes and constraints given the table's names, its storage
    /// parameters the table's (autovacuum back on, unless the table had it off).
    pub async fn swap(self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let Shadow {
            table,
            name,
            indexes,
            options,
        } = self;
        let mut tx = pool.begin().await?;
        sqlx::query(&format!("DROP TABLE {table}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!("ALTER TABLE {name} RENAME TO {table}"))
            .execute(&mut *tx)
            .await?;
        for index in &indexes {
            let shadow_index = index.shadow_name();
            let sql = match &index.constraint {
                Some((constraint, kind)) => format!(
                    "ALTER TABLE {table} ADD CONSTRAINT {constraint} {kind} USING INDEX {shadow_index}"
                ),
                None => format!("ALTER INDEX {shadow_index} RENAME TO {}", index.name),
            };
            sqlx::query(&sql).execute(&mut *tx).await?;
        }
        sqlx::query(&format!("ALTER TABLE {table} RESET (autovacuum_enabled)"))
            .execute(&mut *tx)
            .await?;
        if !options.is_empty() {
            sqlx::query(&format!("ALTER TABLE {table} SET ({})", options.join(", ")))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }
}
