//! The `pgfanout` schema in the database: versioned, applied idempotently by
//! `pgfanout migrate` and at start (unless `PGFANOUT_MIGRATE=false`).
//!
//! `pgfanout.schema_version` holds one row per applied version. Migrations run in one
//! transaction under an advisory lock, so nodes starting together apply each version once.
//! A database at a version newer than this binary knows is refused: an older binary must
//! not write into a schema whose meaning changed.

use std::time::Duration;

use tokio_postgres::NoTls;

/// The schema version this binary writes and reads.
pub const SCHEMA_VERSION: i32 = 1;
/// Per version, the SQL that brings the previous version to it.
const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("schema_v1.sql"))];
/// Advisory lock key of migrations (`pgfx` in ASCII).
const MIGRATION_LOCK: i64 = 0x7067_6678;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(
        "the database's pgfanout schema is at version {found}, newer than this pgfanout \
         supports ({supported}); upgrade pgfanout, or point it at another database"
    )]
    Newer { found: i32, supported: i32 },
    #[error("the pgfanout schema is not installed (run `pgfanout migrate`, or start with PGFANOUT_MIGRATE=true)")]
    Missing,
    #[error("postgres connect timed out")]
    Timeout,
}

impl MigrateError {
    /// Whether retrying later may help (the database is unreachable) or not (a version
    /// conflict an operator must resolve).
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Newer { .. })
    }
}

/// What a migration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    pub from: i32,
    pub to: i32,
}

pub(crate) async fn connect(url: &str) -> Result<tokio_postgres::Client, MigrateError> {
    let mut config: tokio_postgres::Config = url.parse()?;
    config
        .application_name("pgfanout-migrate")
        .connect_timeout(Duration::from_secs(5));
    let (client, connection) = tokio::time::timeout(Duration::from_secs(10), config.connect(NoTls))
        .await
        .map_err(|_| MigrateError::Timeout)??;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "migration connection ended");
        }
    });
    Ok(client)
}

/// Applies every version this binary knows and the database lacks, and sets the event size
/// limit.
///
/// # Errors
/// The database is unreachable or refuses, or its schema is newer than [`SCHEMA_VERSION`].
pub async fn migrate(url: &str, max_event_bytes: u32) -> Result<Migrated, MigrateError> {
    let mut client = connect(url).await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    // No "already exists, skipping" notices in the logs of every start.
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await?;
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS pgfanout;
         CREATE TABLE IF NOT EXISTS pgfanout.schema_version (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         );",
    )
    .await?;
    let from: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM pgfanout.schema_version",
            &[],
        )
        .await?
        .get(0);
    if from > SCHEMA_VERSION {
        return Err(MigrateError::Newer {
            found: from,
            supported: SCHEMA_VERSION,
        });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > from) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO pgfanout.schema_version (version) VALUES ($1)",
            &[version],
        )
        .await?;
        tracing::info!(version, "pgfanout schema migrated");
    }
    let limit = i32::try_from(max_event_bytes).unwrap_or(i32::MAX);
    tx.execute(
        "UPDATE pgfanout.settings SET max_event_bytes = $1 WHERE max_event_bytes <> $1",
        &[&limit],
    )
    .await?;
    tx.commit().await?;
    Ok(Migrated {
        from,
        to: SCHEMA_VERSION,
    })
}

/// The version installed, checked against this binary, without changing anything.
///
/// # Errors
/// Unreachable, not installed ([`MigrateError::Missing`]), or newer.
pub async fn check(url: &str) -> Result<i32, MigrateError> {
    let client = connect(url).await?;
    let installed: bool = client
        .query_one(
            "SELECT to_regclass('pgfanout.schema_version') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !installed {
        return Err(MigrateError::Missing);
    }
    let found: i32 = client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM pgfanout.schema_version",
            &[],
        )
        .await?
        .get(0);
    match found {
        0 => Err(MigrateError::Missing),
        v if v > SCHEMA_VERSION => Err(MigrateError::Newer {
            found: v,
            supported: SCHEMA_VERSION,
        }),
        v => Ok(v),
    }
}
