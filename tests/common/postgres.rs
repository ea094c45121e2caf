//! [`TestDb`]: a uniquely named database on the local Postgres server, one per test.
//!
//! The server comes from `PGFANOUT_TEST_DATABASE_URL` (a URL naming any database the test may
//! connect to, default `postgres://postgres@127.0.0.1:5432/postgres`). The database is dropped
//! `WITH (FORCE)` when the `TestDb` is dropped, panicking test included; databases left behind
//! by a killed test process are swept by the next test after an hour (their name carries the
//! creation time).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use tokio_postgres::{Client as PgClient, NoTls};

/// The `application_name` the gateway sets on its LISTEN connection.
pub const LISTEN_APPLICATION_NAME: &str = "pgfanout-listen";

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const NAME_PREFIX: &str = "pgfanout_t_";
/// Test databases older than this are assumed orphaned (their test process was killed).
const ORPHAN_AGE: Duration = Duration::from_secs(3600);

/// A fresh database for one test.
pub struct TestDb {
    /// Database name, `pgfanout_t_<unix seconds>_<random>`.
    name: String,
    /// URL of the fresh database, handed to the nodes as `PGFANOUT_DATABASE_URL`.
    url: String,
    /// URL of the server's maintenance database, used to create, block and drop the test one.
    admin_url: String,
    /// One connection kept open for `notify`, so a burst of notifications costs no connects.
    client: PgClient,
}

impl TestDb {
    /// Creates a uniquely named database and connects to it.
    ///
    /// # Panics
    /// When the server cannot be reached: the message names the URL and `scripts/deps.sh`.
    pub async fn create() -> TestDb {
        let admin_url = std::env::var("PGFANOUT_TEST_DATABASE_URL")
            .unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_string());
        let admin = connect(&admin_url).await.unwrap_or_else(|err| {
            panic!(
                "cannot connect to the test Postgres server at {admin_url} \
                 (set PGFANOUT_TEST_DATABASE_URL, or run scripts/deps.sh): {err:#}"
            )
        });
        sweep_orphans(&admin).await;
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let name = format!("{NAME_PREFIX}{created}_{}", super::random_tag());
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|err| panic!("CREATE DATABASE {name}: {err}"));
        let url = with_database(&admin_url, &name);
        let client = connect(&url)
            .await
            .unwrap_or_else(|err| panic!("connect to {url}: {err:#}"));
        TestDb {
            name,
            url,
            admin_url,
            client,
        }
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL of the fresh database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL of the server's maintenance database (from `PGFANOUT_TEST_DATABASE_URL`).
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// Sends one notification: `SELECT pg_notify(channel, payload)` in its own transaction.
    pub async fn notify(&self, channel: &str, payload: &str) -> anyhow::Result<()> {
        self.client
            .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
            .await
            .with_context(|| format!("pg_notify({channel:?}, {payload:?})"))?;
        Ok(())
    }

    /// Runs arbitrary SQL on the test database (e.g. a transaction with many notifications).
    pub async fn execute(&self, sql: &str) -> anyhow::Result<()> {
        self.client
            .batch_execute(sql)
            .await
            .with_context(|| format!("execute {sql:?}"))
    }

    /// Process ids of the gateway's LISTEN backends on this database right now.
    pub async fn listener_pids(&self) -> anyhow::Result<Vec<i32>> {
        let admin = connect(&self.admin_url).await?;
        let rows = admin
            .query(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
                &[&self.name, &LISTEN_APPLICATION_NAME],
            )
            .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// Kills the gateway's LISTEN backends on this database (`pg_terminate_backend`) and returns
    /// their process ids (empty when there was none to kill).
    pub async fn terminate_listeners(&self) -> anyhow::Result<Vec<i32>> {
        let admin = connect(&self.admin_url).await?;
        let rows = admin
            .query(
                "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND application_name = $2",
                &[&self.name, &LISTEN_APPLICATION_NAME],
            )
            .await?;
        Ok(rows
            .iter()
            .filter(|row| row.get::<_, bool>(1))
            .map(|row| row.get(0))
            .collect())
    }

    /// Allows or refuses new connections to the test database (`ALTER DATABASE …
    /// ALLOW_CONNECTIONS`), to hold a Postgres outage open; open connections (`notify`'s) stay.
    pub async fn set_allow_connections(&self, allow: bool) -> anyhow::Result<()> {
        let admin = connect(&self.admin_url).await?;
        admin
            .batch_execute(&format!(
                "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS {allow}",
                self.name
            ))
            .await?;
        Ok(())
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop may run inside the test's runtime (which cannot be blocked on), so the DROP runs
        // on a thread of its own with a runtime of its own, and we wait for it.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || drop_database_blocking(&admin_url, &name)).join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!(
                "warning: could not drop test database {}: {err:#}",
                self.name
            ),
            Err(_) => eprintln!("warning: dropping test database {} panicked", self.name),
        }
    }
}

async fn connect(url: &str) -> anyhow::Result<PgClient> {
    let (client, connection) =
        tokio::time::timeout(Duration::from_secs(10), tokio_postgres::connect(url, NoTls))
            .await
            .with_context(|| format!("connect to {url} timed out"))?
            .with_context(|| format!("connect to {url}"))?;
    tokio::spawn(async move {
        // Ends with an error when the database is dropped or the backend is terminated.
        let _ = connection.await;
    });
    Ok(client)
}

fn drop_database_blocking(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let admin = connect(admin_url).await?;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await?;
        Ok(())
    })
}

/// Drops test databases whose creation time (in their name) is older than [`ORPHAN_AGE`].
/// Best effort: a failure here must not fail the test that happened to start next.
async fn sweep_orphans(admin: &PgClient) {
    let Ok(rows) = admin
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE 'pgfanout\\_t\\_%'",
            &[],
        )
        .await
    else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    for row in rows {
        let name: String = row.get(0);
        let created = name
            .strip_prefix(NAME_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|secs| secs.parse::<u64>().ok());
        if created.is_some_and(|created| now.saturating_sub(created) > ORPHAN_AGE.as_secs()) {
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .await;
        }
    }
}

/// `url` with its database (the path) replaced by `database`; query parameters are kept.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |at| at + 3);
    let authority_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |at| scheme_end + at);
    let mut out = format!("{}/{database}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}
